#include "services/inference/model_manager.h"

#include <glog/logging.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/image/image.h"
#include "common/sha256.h"
#include "common/status.h"

namespace kennel::inference {
namespace {

// Timed forward passes per batch size when tuning, and how much faster per
// image a larger batch must be to raise the cap.
constexpr int kTimedPasses = 2;
constexpr double kBatchGain = 1.05;

std::string Describe(const ModelCandidate& c) {
  if (c.version > 0) return absl::StrCat(c.name, ":", c.version);
  return c.path;
}

// Runs `inputs` (count images) through the model in chunks of at most
// `max_batch`, returning all logits.
absl::StatusOr<std::vector<float>> ForwardAll(Model& model,
                                              const std::vector<float>& inputs,
                                              int count, int size,
                                              int max_batch) {
  const size_t per_image = static_cast<size_t>(3) * size * size;
  std::vector<float> logits;
  for (int begin = 0; begin < count; begin += max_batch) {
    const int n = std::min(max_batch, count - begin);
    ASSIGN_OR_RETURN(std::vector<float> part,
                     model.Forward(inputs.data() + per_image * begin, n, size));
    logits.insert(logits.end(), part.begin(), part.end());
  }
  return logits;
}

}  // namespace

std::string PrecisionLabel(kennel::v1::Precision precision) {
  return precision == kennel::v1::PRECISION_BF16 ? "bf16" : "fp32";
}

std::vector<int> ArgmaxRows(const std::vector<float>& values, int rows) {
  std::vector<int> out;
  if (rows <= 0 || values.empty()) return out;
  const size_t cols = values.size() / rows;
  for (int r = 0; r < rows; ++r) {
    const auto begin = values.begin() + cols * r;
    out.push_back(
        static_cast<int>(std::max_element(begin, begin + cols) - begin));
  }
  return out;
}

ModelManager::ModelManager(ModelLoader* loader, ManagerOptions options,
                           InferenceMetrics* metrics)
    : loader_(loader), options_(std::move(options)), metrics_(metrics) {}

std::shared_ptr<const LoadedModel> ModelManager::Current() const {
  absl::MutexLock lock(&mu_);
  return current_;
}

ManagerStatus ModelManager::Status() const {
  absl::MutexLock lock(&mu_);
  return {current_, last_error_, last_failed_version_, waiting_for_};
}

void ModelManager::SetWaitingFor(std::string reason) {
  absl::MutexLock lock(&mu_);
  waiting_for_ = std::move(reason);
}

void ModelManager::SetOnPublished(
    std::function<void(const LoadedModel&)> callback) {
  absl::MutexLock lock(&mu_);
  on_published_ = std::move(callback);
}

void ModelManager::RecordFailure(const ModelCandidate& candidate,
                                 const absl::Status& status) {
  std::shared_ptr<const LoadedModel> serving;
  {
    absl::MutexLock lock(&mu_);
    serving = current_;
    last_error_ = absl::StrCat(Describe(candidate), ": ", status.message());
    last_failed_version_ = candidate.version;
  }
  if (metrics_ != nullptr) metrics_->loads_failure.Increment();
  // Says what actually answers requests now, so nobody reads "keeps
  // serving" in the log of a server that answers UNAVAILABLE.
  LOG(ERROR) << "model " << Describe(candidate) << " was not loaded; "
             << (serving != nullptr
                     ? absl::StrCat(serving->name, ":", serving->version,
                                    " keeps serving")
                     : std::string("no version is serving"))
             << ": " << status;
}

absl::Status ModelManager::Load(const ModelCandidate& candidate) {
  absl::MutexLock load_lock(&load_mu_);
  absl::StatusOr<std::shared_ptr<LoadedModel>> prepared = Prepare(candidate);
  if (!prepared.ok()) {
    const absl::Status status = Annotate(
        prepared.status(), absl::StrCat("loading ", Describe(candidate)));
    RecordFailure(candidate, prepared.status());
    return status;
  }
  Publish(*std::move(prepared));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> ModelManager::WarmupInputs(
    const kennel::v1::Preprocessing& spec, int* count) const {
  const size_t per_image = image::TensorSize(spec);
  std::vector<float> inputs;
  image::DecodeLimits limits;
  int n = 0;
  for (const std::string& bytes : options_.warmup_images) {
    inputs.resize(per_image * (n + 1));
    RETURN_IF_ERROR(
        Annotate(image::DecodeAndPreprocess(bytes, spec, limits,
                                            inputs.data() + per_image * n),
                 "warm-up image"));
    ++n;
  }
  if (n == 0) {
    // Photo-sized synthetic pictures, so the path is the one requests take.
    for (int i = 0; i < std::max(1, options_.synthetic_warmup_images); ++i) {
      inputs.resize(per_image * (n + 1));
      const cv::Mat rgb = image::SyntheticImage(320 + 16 * i, 240 + 8 * i,
                                                /*seed=*/1000 + i);
      RETURN_IF_ERROR(
          image::Preprocess(rgb, spec, inputs.data() + per_image * n));
      ++n;
    }
  }
  *count = n;
  return inputs;
}

absl::StatusOr<std::shared_ptr<LoadedModel>> ModelManager::Prepare(
    const ModelCandidate& candidate) {
  const absl::Time start = absl::Now();
  auto loaded = std::make_shared<LoadedModel>();
  loaded->source = candidate.source;
  loaded->name = candidate.name;
  loaded->version = candidate.version;
  loaded->aliases = candidate.aliases;

  // The bytes must be the ones the registry committed.
  ASSIGN_OR_RETURN(std::string digest, Sha256File(candidate.path));
  if (!candidate.digest.empty() && digest != candidate.digest) {
    return absl::DataLossError(
        absl::StrCat("digest mismatch: the manifest says ", candidate.digest,
                     " but the file ", candidate.path, " hashes to ", digest));
  }
  loaded->digest = digest;

  ASSIGN_OR_RETURN(OpenedModel opened, loader_->Open(candidate.path));

  loaded->labels = candidate.labels.empty() ? opened.labels : candidate.labels;
  if (loaded->labels.empty()) {
    return absl::InvalidArgumentError(
        "the model has no labels: neither the manifest nor the file's "
        "`labels` attribute lists any (give --labels for a local file)");
  }
  if (!candidate.labels.empty() && !opened.labels.empty() &&
      opened.labels != candidate.labels) {
    LOG(WARNING) << Describe(candidate)
                 << ": the file's labels attribute differs from the "
                    "manifest's labels; serving the manifest's";
  }

  if (candidate.preprocessing.has_value()) {
    loaded->preprocessing = *candidate.preprocessing;
  } else if (!opened.preprocessing_json.empty()) {
    google::protobuf::util::JsonParseOptions json_options;
    json_options.ignore_unknown_fields = true;
    const auto parsed = google::protobuf::util::JsonStringToMessage(
        opened.preprocessing_json, &loaded->preprocessing, json_options);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("the file's kennel_preprocessing attribute is not a "
                       "Preprocessing message in JSON: ",
                       parsed.ToString()));
    }
  } else {
    loaded->preprocessing = image::ImageNetPreprocessing();
  }
  RETURN_IF_ERROR(image::ValidatePreprocessing(loaded->preprocessing));
  const int size = loaded->preprocessing.input_size();

  int count = 0;
  ASSIGN_OR_RETURN(std::vector<float> inputs,
                   WarmupInputs(loaded->preprocessing, &count));
  const int max_warmup_batch =
      std::max(1, *std::max_element(options_.warmup_batch_sizes.begin(),
                                    options_.warmup_batch_sizes.end()));

  // fp32 answers: the reference for everything else.
  std::shared_ptr<Model> fp32 = std::move(opened.model);
  ASSIGN_OR_RETURN(std::vector<float> reference,
                   ForwardAll(*fp32, inputs, count, size, max_warmup_batch));
  const size_t classes = reference.size() / count;
  if (reference.size() % count != 0 || classes != loaded->labels.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the model outputs ", reference.size() / std::max(count, 1),
        " values per image but has ", loaded->labels.size(),
        " labels; they must match"));
  }
  for (float v : reference) {
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(
          "the model produced non-finite logits on the warm-up images");
    }
  }

  bool want_bf16 = false;
  switch (options_.precision) {
    case kennel::v1::PRECISION_FP32:
      break;
    case kennel::v1::PRECISION_BF16:
      want_bf16 = true;
      break;
    default:
      want_bf16 = candidate.manifest_precision != kennel::v1::PRECISION_FP32;
      break;
  }
  std::shared_ptr<Model> serving = fp32;
  loaded->precision = kennel::v1::PRECISION_FP32;
  if (want_bf16 && !loader_->Bf16Supported()) {
    LOG(INFO) << Describe(candidate)
              << ": serving fp32; this CPU has no fast bf16 (AVX512-BF16 or "
                 "AMX)";
  } else if (want_bf16) {
    absl::StatusOr<std::unique_ptr<Model>> bf16 = fp32->ToBf16();
    absl::StatusOr<std::vector<float>> answers =
        bf16.ok() ? ForwardAll(**bf16, inputs, count, size, max_warmup_batch)
                  : absl::StatusOr<std::vector<float>>(bf16.status());
    if (!answers.ok()) {
      LOG(WARNING) << Describe(candidate)
                   << ": serving fp32; bf16 failed: " << answers.status();
    } else {
      const std::vector<int> a = ArgmaxRows(reference, count);
      const std::vector<int> b = ArgmaxRows(*answers, count);
      int same = 0;
      for (int i = 0; i < count; ++i) same += a[i] == b[i];
      loaded->bf16_agreement = static_cast<double>(same) / count;
      if (loaded->bf16_agreement >= options_.bf16_min_agreement) {
        serving = std::shared_ptr<Model>(std::move(*bf16));
        loaded->precision = kennel::v1::PRECISION_BF16;
      } else {
        LOG(WARNING) << Describe(candidate) << ": serving fp32; bf16 agreed "
                     << "with fp32 on " << same << " of " << count
                     << " warm-up images, below --bf16-min-agreement="
                     << options_.bf16_min_agreement;
      }
    }
  }
  if (serving != fp32) fp32.reset();  // free the fp32 copy now

  // Warm-up: the first pass at each batch size selects kernels. With
  // tuning, every power of two up to the batcher's maximum is also timed,
  // and the largest batch is capped where bigger stops paying: on a small
  // machine a larger fp32 batch can be slower per image (its activations
  // leave the cache), which a fixed maximum cannot know.
  std::vector<int> sizes = options_.warmup_batch_sizes;
  if (options_.tune_batch_size) {
    sizes.clear();
    for (int b = 1; b < options_.max_batch_size; b *= 2) sizes.push_back(b);
    sizes.push_back(options_.max_batch_size);
  }
  double best_rate = 0;
  for (int batch : sizes) {
    if (batch <= 0) continue;
    std::vector<float> tiled(static_cast<size_t>(batch) * 3 * size * size);
    for (int i = 0; i < batch; ++i) {
      const size_t per_image = static_cast<size_t>(3) * size * size;
      std::copy_n(inputs.begin() + per_image * (i % count), per_image,
                  tiled.begin() + per_image * i);
    }
    const int passes = options_.tune_batch_size ? 1 + kTimedPasses : 1;
    absl::Time timed_from;
    for (int pass = 0; pass < passes; ++pass) {
      if (pass == 1) timed_from = absl::Now();
      ASSIGN_OR_RETURN(std::vector<float> out,
                       serving->Forward(tiled.data(), batch, size));
      if (out.size() != classes * batch) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the model's output width changes with the batch size (",
            out.size() / batch, " at batch ", batch, ")"));
      }
    }
    if (options_.tune_batch_size) {
      const double seconds =
          std::max(absl::ToDoubleSeconds(absl::Now() - timed_from), 1e-9);
      const double rate = kTimedPasses * batch / seconds;
      LOG(INFO) << Describe(candidate) << ": batch " << batch << " runs at "
                << rate << " images/s";
      // A larger batch must be clearly faster: it also costs latency.
      if (rate > best_rate * kBatchGain) {
        best_rate = rate;
        loaded->max_batch_size = batch;
      }
    }
  }
  loaded->model = std::move(serving);
  loaded->loaded_at = absl::Now();
  loaded->load_seconds = absl::ToDoubleSeconds(loaded->loaded_at - start);
  return loaded;
}

void ModelManager::Publish(std::shared_ptr<const LoadedModel> model) {
  std::shared_ptr<const LoadedModel> old;
  std::function<void(const LoadedModel&)> callback;
  {
    absl::MutexLock lock(&mu_);
    old = std::move(current_);
    current_ = model;
    last_error_.clear();
    last_failed_version_ = 0;
    callback = on_published_;
  }
  const std::string precision = PrecisionLabel(model->precision);
  LOG(INFO) << "serving " << model->name << ":" << model->version << " ("
            << model->digest << ", " << precision << ", "
            << model->labels.size() << " classes, batches up to "
            << (model->max_batch_size > 0 ? absl::StrCat(model->max_batch_size)
                                          : std::string("the maximum"))
            << ") after " << model->load_seconds << " s"
            << (old ? absl::StrCat("; replaced ", old->name, ":", old->version,
                                   ", which finishes its requests in flight")
                    : std::string());
  if (metrics_ != nullptr) {
    metrics_->loads_success.Increment();
    if (old != nullptr) {
      metrics_->model_info.Remove(&metrics_->model_info.Add(
          {{"name", old->name},
           {"version", absl::StrCat(old->version)},
           {"digest", old->digest},
           {"precision", PrecisionLabel(old->precision)}}));
    }
    metrics_->model_info
        .Add({{"name", model->name},
              {"version", absl::StrCat(model->version)},
              {"digest", model->digest},
              {"precision", precision}})
        .Set(1);
    metrics_->model_ready.Set(1);
  }
  if (callback) callback(*model);
}

}  // namespace kennel::inference
