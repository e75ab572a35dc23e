#include "services/trainer/train_job.h"

#include <ATen/Parallel.h>
#include <glog/logging.h>
#include <torch/cuda.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/image/image.h"
#include "common/names.h"
#include "common/sha256.h"
#include "common/status.h"
#include "services/trainer/batch_loader.h"
#include "services/trainer/finetune.h"
#include "services/trainer/trainer_metrics.h"

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using kennel::v1::JobEvent;
using kennel::v1::Precision;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

absl::StatusOr<torch::Device> ResolveDevice(const std::string& requested,
                                            const std::string& fallback) {
  const std::string name = requested.empty() ? fallback : requested;
  if (name.empty() || name == "auto") {
    return torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0)
                                       : torch::Device(torch::kCPU);
  }
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || absl::StartsWith(name, "cuda:")) {
    if (!torch::cuda::is_available()) {
      return absl::InvalidArgumentError(
          "device \"" + name +
          "\" was asked for, but this kennel-trainer's LibTorch has no CUDA "
          "device; use \"cpu\" or \"auto\"");
    }
    try {
      return torch::Device(name);
    } catch (const std::exception& e) {
      return TorchError(absl::StatusCode::kInvalidArgument,
                        "device \"" + name + "\"", e);
    }
  }
  return absl::InvalidArgumentError("device must be auto, cpu or cuda (got \"" +
                                    name + "\")");
}

// Images per backbone forward pass in the feature pass: large enough to keep
// the cores busy, small enough that a batch of full-size images stays in
// tens of megabytes.
int ExtractionBatch(const kennel::v1::Preprocessing& spec) {
  return spec.input_size() >= 128 ? 32 : 256;
}

struct SplitFeatures {
  FeatureSplit split;
  std::vector<std::string> digests;
  std::vector<std::string> bad_paths;
};

// Emits Progress events at most every two seconds, and at the end.
class ProgressReporter {
 public:
  ProgressReporter(JobContext& context, std::string phase, int64_t total)
      : context_(context),
        phase_(std::move(phase)),
        total_(total),
        start_(Clock::now()),
        last_(start_) {}

  void Update(int64_t done) {
    const auto now = Clock::now();
    if (done < total_ && Seconds(last_, now) < 2.0) return;
    last_ = now;
    JobEvent event;
    kennel::v1::Progress* progress = event.mutable_progress();
    progress->set_phase(phase_);
    progress->set_done(done);
    progress->set_total(total_);
    const double elapsed = Seconds(start_, now);
    progress->set_items_per_second(elapsed > 0 ? done / elapsed : 0);
    context_.Emit(std::move(event));
  }

 private:
  JobContext& context_;
  const std::string phase_;
  const int64_t total_;
  const Clock::time_point start_;
  Clock::time_point last_;
};

// Builds the extractor on first use, so a pass that finds every feature in
// the cache never pays for copying and freezing the backbone.
class LazyExtractor {
 public:
  LazyExtractor(const PreparedSpec& prepared, Precision precision)
      : prepared_(prepared), precision_(precision) {}
  absl::StatusOr<FeatureExtractor*> Get() {
    if (!extractor_) {
      const auto start = Clock::now();
      const kennel::v1::Preprocessing& spec = prepared_.backbone.preprocessing;
      ASSIGN_OR_RETURN(extractor_, FeatureExtractor::Create(
                                       *prepared_.backbone_module, precision_,
                                       prepared_.device, ExtractionBatch(spec),
                                       spec.input_size()));
      setup_seconds_ = Seconds(start, Clock::now());
    }
    return extractor_.get();
  }
  double setup_seconds() const { return setup_seconds_; }

 private:
  const PreparedSpec& prepared_;
  const Precision precision_;
  std::unique_ptr<FeatureExtractor> extractor_;
  double setup_seconds_ = 0;
};

absl::StatusOr<SplitFeatures> ExtractSplit(
    const Split& split, const PreparedSpec& prepared, LazyExtractor& extractor,
    FeatureCache& cache, const FeatureKeyContext& key_context,
    const TrainerOptions& options, JobContext& context) {
  SplitFeatures out;
  const int64_t n = static_cast<int64_t>(split.images.size());
  const int dim = prepared.backbone.feature_dim;
  const kennel::v1::Preprocessing& spec = prepared.backbone.preprocessing;
  const int size = spec.input_size();
  torch::Tensor features = torch::zeros({n, dim}, torch::kFloat32);
  float* rows = features.data_ptr<float>();
  std::vector<std::string> keys(n);
  out.digests.assign(n, "");

  // Each item is touched by one worker only, so the per-item vectors and
  // feature rows need no lock.
  auto prepare = [&](int64_t item, float* pixels) {
    auto bytes = ReadFileBytes(split.images[item].path);
    if (!bytes.ok()) return ItemResult::kBad;
    out.digests[item] = Sha256Digest(*bytes);
    keys[item] = FeatureCache::Key(key_context, out.digests[item]);
    if (auto cached = cache.Get(keys[item], dim)) {
      std::memcpy(rows + item * dim, cached->data(), sizeof(float) * dim);
      return ItemResult::kSkipped;
    }
    image::DecodeLimits limits;
    if (!image::DecodeAndPreprocess(*bytes, spec, limits, pixels).ok()) {
      return ItemResult::kBad;
    }
    return ItemResult::kPixels;
  };
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  BatchLoaderOptions loader_options;
  loader_options.batch_size = ExtractionBatch(spec);
  loader_options.item_floats = image::TensorSize(spec);
  loader_options.workers = std::max(1, options.threads);
  loader_options.prefetch = 2 * loader_options.workers;
  BatchLoader loader(std::move(order), loader_options, prepare);

  ProgressReporter progress(context, "features " + split.name, n);
  std::vector<char> bad(n, 0);
  int64_t done = 0;
  bool put_warned = false;
  LoadedBatch batch;
  while (loader.Next(&batch)) {
    if (context.cancelled()) {
      return absl::CancelledError("cancelled during feature extraction");
    }
    const int64_t m = static_cast<int64_t>(batch.pixel_items.size());
    if (m > 0) {
      ASSIGN_OR_RETURN(FeatureExtractor * model, extractor.Get());
      ASSIGN_OR_RETURN(torch::Tensor computed,
                       model->Run(batch.pixels.data(), m, size));
      const float* data = computed.data_ptr<float>();
      for (int64_t j = 0; j < m; ++j) {
        const int64_t item = batch.pixel_items[j];
        std::memcpy(rows + item * dim, data + j * dim, sizeof(float) * dim);
        absl::Status put = cache.Put(keys[item], data + j * dim, dim);
        if (!put.ok() && !put_warned) {
          put_warned = true;
          LOG(WARNING) << put;
        }
      }
    }
    for (int64_t item : batch.bad_items) {
      bad[item] = 1;
      out.bad_paths.push_back(split.images[item].path);
    }
    done += m + static_cast<int64_t>(batch.skipped_items.size() +
                                     batch.bad_items.size());
    progress.Update(done);
  }
  if (n > 0 && done == 0) progress.Update(n);
  RETURN_IF_ERROR(prepared.bad_images.Check(split.name, n, out.bad_paths));

  std::vector<int64_t> labels;
  std::vector<int64_t> good;
  for (int64_t i = 0; i < n; ++i) {
    if (bad[i]) continue;
    good.push_back(i);
    labels.push_back(split.images[i].label);
  }
  if (static_cast<int64_t>(good.size()) != n) {
    features = features.index_select(0, torch::tensor(good, torch::kInt64));
  }
  out.split.features = features;
  out.split.labels = torch::tensor(labels, torch::kInt64);
  return out;
}

std::string CacheRoot(const TrainerOptions& options) {
  return options.cache_dir.empty()
             ? fs::temp_directory_path().string() + "/kennel-trainer"
             : options.cache_dir;
}

absl::StatusOr<std::unique_ptr<storage::ObjectStore>> OpenStore(
    const std::string& url, const TrainerOptions& options,
    const std::string& what) {
  auto store = storage::OpenObjectStore(url, options.s3);
  if (!store.ok()) {
    return Annotate(store.status(), absl::StrCat("opening ", what, " ", url));
  }
  return store;
}

// Copies one object into `path` through a temporary file.
absl::Status Download(storage::ObjectStore& store, const std::string& key,
                      const std::string& path) {
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  const std::string tmp = path + ".part";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::InternalError("cannot write " + tmp);
    RETURN_IF_ERROR(store.Read(key, 0, -1, [&](absl::string_view data) {
      out.write(data.data(), data.size());
      return out ? absl::OkStatus()
                 : absl::InternalError("cannot write " + tmp);
    }));
  }
  fs::rename(tmp, path, ec);
  if (ec) return absl::InternalError("cannot rename into " + path);
  return absl::OkStatus();
}

// Lists an s3://bucket/prefix data set and validates its layout; the images
// will be read from a local copy under the cache folder.
absl::Status ListRemoteData(const std::string& url,
                            const TrainerOptions& options,
                            PreparedSpec* prepared) {
  const std::string trimmed(absl::StripSuffix(url, "/"));
  ASSIGN_OR_RETURN(std::unique_ptr<storage::ObjectStore> store,
                   OpenStore(trimmed, options, "data set"));
  auto objects = store->ListAll("");
  if (!objects.ok()) {
    return Annotate(objects.status(), "listing data set " + url);
  }
  const std::string local = absl::StrCat(CacheRoot(options), "/datasets/",
                                         Sha256Hex(trimmed).substr(0, 16));
  std::vector<std::string> names;
  std::map<std::string, int64_t> sizes;
  for (const storage::ObjectInfo& object : *objects) {
    // Keys become local paths: only plain relative names are accepted.
    if (!storage::ValidateKey(object.key).ok()) continue;
    names.push_back(object.key);
    sizes[object.key] = object.size;
  }
  auto dataset = DatasetFromListing(local, names);
  if (!dataset.ok()) {
    return Annotate(dataset.status(), "data set " + url);
  }
  prepared->dataset = *std::move(dataset);
  for (const Split* split : {&prepared->dataset.train, &prepared->dataset.valid,
                             &prepared->dataset.test}) {
    for (const ImageEntry& image : split->images) {
      const std::string key = image.path.substr(local.size() + 1);
      std::error_code ec;
      const int64_t have =
          fs::exists(image.path, ec)
              ? static_cast<int64_t>(fs::file_size(image.path, ec))
              : -1;
      if (have != sizes[key]) {
        prepared->remote_files.push_back({key, image.path, sizes[key]});
      }
    }
  }
  prepared->data_store = std::move(store);
  return absl::OkStatus();
}

// Downloads an s3://bucket/key backbone (and its .json sidecar when there is
// one) into the cache folder; returns the local path.
absl::StatusOr<std::string> FetchBackbone(const std::string& url,
                                          const TrainerOptions& options) {
  const std::string rest = url.substr(5);
  const size_t slash = rest.find('/');
  if (slash == std::string::npos || slash + 1 >= rest.size()) {
    return absl::InvalidArgumentError(
        "an s3:// backbone names an object: s3://BUCKET/KEY (got \"" + url +
        "\")");
  }
  const std::string key = rest.substr(slash + 1);
  RETURN_IF_ERROR(Annotate(storage::ValidateKey(key), "backbone " + url));
  ASSIGN_OR_RETURN(
      std::unique_ptr<storage::ObjectStore> store,
      OpenStore("s3://" + rest.substr(0, slash), options, "backbone"));
  const std::string path = absl::StrCat(CacheRoot(options), "/backbones/",
                                        Sha256Hex(url).substr(0, 16), ".pt");
  absl::Status got = Download(*store, key, path);
  if (got.code() == absl::StatusCode::kNotFound) {
    return absl::InvalidArgumentError("backbone " + url + " does not exist");
  }
  RETURN_IF_ERROR(Annotate(got, "downloading backbone " + url));
  absl::Status sidecar = Download(*store, key + ".json", path + ".json");
  if (!sidecar.ok()) {
    std::error_code ec;
    fs::remove(path + ".json", ec);
  }
  return path;
}

void ReportBadImages(const BadImages& bad, JobContext& context) {
  auto one = [&](const char* split, const std::vector<std::string>& paths) {
    if (paths.empty()) return;
    context.Log(absl::StrCat("skipped ", paths.size(),
                             " unreadable image(s) in ", split, "/, e.g. ",
                             paths.front()));
  };
  one("train", bad.train);
  one("valid", bad.valid);
  one("test", bad.test);
}

absl::StatusOr<kennel::v1::JobCompleted> RunHead(
    const PreparedSpec& prepared, const kennel::v1::Hyperparameters& hyper,
    const TrainerOptions& options, JobContext& context) {
  const auto start = Clock::now();
  Profiler profiler(options.threads);
  ASSIGN_OR_RETURN(Precision precision, ResolvePrecision(prepared, context));
  context.Emit(StartedEvent(prepared, kennel::v1::JOB_KIND_TRAIN, precision));
  ASSIGN_OR_RETURN(Extraction extraction,
                   ExtractFeatures(prepared, precision, options, context));
  profiler.AddFeature(extraction.seconds);
  profiler.SetCache(extraction.cache_hits, extraction.cache_misses);
  ReportBadImages(extraction.bad, context);

  HeadTrainer trainer(extraction.features);
  RuleSet rules = prepared.rules;
  std::string stop_reason;
  auto on_epoch = [&](const EpochStats& stats) {
    profiler.AddForward(stats.forward_seconds);
    profiler.AddBackward(stats.backward_seconds);
    profiler.AddOptimizer(stats.optimizer_seconds);
    profiler.AddImages(extraction.features->train.size());
    context.Emit(EpochEvent(stats, 0.0));
    stop_reason = ObserveRules(rules, stats, 0.0, context, 0);
    return stop_reason.empty() ? EpochDecision::kContinue
                               : EpochDecision::kStop;
  };
  ASSIGN_OR_RETURN(HeadRunResult run,
                   trainer.Train(HeadConfigFrom(hyper), on_epoch,
                                 [&] { return context.cancelled(); }));
  if (run.cancelled) {
    return absl::CancelledError(
        absl::StrCat("cancelled after ", run.epochs.size(), " epoch(s)"));
  }
  if (!stop_reason.empty()) {
    JobEvent report;
    *report.mutable_profiler() = profiler.Report();
    context.Emit(std::move(report));
    return absl::AbortedError(stop_reason);
  }

  const Evaluation test =
      HeadTrainer::Evaluate(run.weights, extraction.features->test);
  kennel::v1::ModelMetrics metrics;
  metrics.set_train_loss(run.epochs.back().train_loss);
  metrics.set_valid_loss(run.epochs.back().valid_loss);
  metrics.set_valid_accuracy(run.epochs.back().valid_accuracy);
  metrics.set_test_loss(test.loss);
  metrics.set_test_accuracy(test.accuracy);
  metrics.set_measured(true);

  const std::string fingerprint =
      DatasetFingerprint(prepared.dataset, extraction.content_digests);
  ASSIGN_OR_RETURN(
      std::string model_ref,
      ExportAndRegister(prepared, options, *prepared.backbone_module,
                        run.weights, hyper, metrics, precision, fingerprint,
                        context));
  JobEvent report;
  *report.mutable_profiler() = profiler.Report();
  context.Emit(std::move(report));

  kennel::v1::JobCompleted completed;
  *completed.mutable_metrics() = metrics;
  completed.set_model_ref(model_ref);
  *completed.mutable_hyperparameters() = hyper;
  completed.set_seconds(Seconds(start, Clock::now()));
  return completed;
}

absl::StatusOr<kennel::v1::JobCompleted> RunFinetune(
    const PreparedSpec& prepared, const kennel::v1::Hyperparameters& hyper,
    const TrainerOptions& options, JobContext& context) {
  const auto start = Clock::now();
  Profiler profiler(options.threads);
  // Fine-tuning trains and validates in fp32; bf16 applies to the frozen
  // backbone pass of head mode.
  const Precision precision = kennel::v1::PRECISION_FP32;
  if (prepared.precision == kennel::v1::PRECISION_BF16) {
    context.Log(
        "fine-tuning runs in fp32; the bf16 precision applies to "
        "head mode's backbone pass");
  }
  context.Emit(StartedEvent(prepared, kennel::v1::JOB_KIND_TRAIN, precision));
  RETURN_IF_ERROR(FetchData(prepared, context));

  torch::jit::Module module;
  try {
    module = prepared.backbone_module->deepcopy();
  } catch (const std::exception& e) {
    return TorchError(absl::StatusCode::kInternal, "copying the backbone", e);
  }
  FinetuneConfig config;
  config.hyper = HeadConfigFrom(hyper);
  config.workers = std::max(1, options.threads);
  config.prefetch = 2 * config.workers;
  config.device = prepared.device;
  config.bad_images = prepared.bad_images;

  RuleSet rules = prepared.rules;
  std::string stop_reason;
  auto on_epoch = [&](const EpochStats& stats, double wait_share) {
    context.Emit(EpochEvent(stats, wait_share));
    stop_reason = ObserveRules(rules, stats, wait_share, context, 0);
    return stop_reason.empty() ? EpochDecision::kContinue
                               : EpochDecision::kStop;
  };
  auto cancelled = [&] { return context.cancelled(); };
  ASSIGN_OR_RETURN(
      FinetuneResult result,
      Finetune(std::move(module), prepared.backbone, prepared.dataset, config,
               on_epoch, cancelled, &profiler));
  if (result.cancelled) {
    return absl::CancelledError(
        absl::StrCat("cancelled after ", result.epochs.size(), " epoch(s)"));
  }
  if (!stop_reason.empty()) {
    JobEvent report;
    *report.mutable_profiler() = profiler.Report();
    context.Emit(std::move(report));
    return absl::AbortedError(stop_reason);
  }
  ASSIGN_OR_RETURN(Evaluation test,
                   EvaluateImages(result.backbone, result.head,
                                  prepared.backbone, prepared.dataset.test,
                                  config, &result.bad.test, cancelled));
  RETURN_IF_ERROR(config.bad_images.Check(
      "test", static_cast<int64_t>(prepared.dataset.test.images.size()),
      result.bad.test));
  ReportBadImages(result.bad, context);

  kennel::v1::ModelMetrics metrics;
  metrics.set_train_loss(result.epochs.back().train_loss);
  metrics.set_valid_loss(result.epochs.back().valid_loss);
  metrics.set_valid_accuracy(result.epochs.back().valid_accuracy);
  metrics.set_test_loss(test.loss);
  metrics.set_test_accuracy(test.accuracy);
  metrics.set_measured(true);

  const std::string fingerprint =
      DatasetFingerprint(prepared.dataset, ContentDigests(prepared.dataset));
  ASSIGN_OR_RETURN(
      std::string model_ref,
      ExportAndRegister(prepared, options, result.backbone, result.head, hyper,
                        metrics, precision, fingerprint, context));
  JobEvent report;
  *report.mutable_profiler() = profiler.Report();
  context.Emit(std::move(report));

  kennel::v1::JobCompleted completed;
  *completed.mutable_metrics() = metrics;
  completed.set_model_ref(model_ref);
  *completed.mutable_hyperparameters() = hyper;
  completed.set_seconds(Seconds(start, Clock::now()));
  return completed;
}

}  // namespace

kennel::v1::JobEvent StartedEvent(const PreparedSpec& prepared,
                                  kennel::v1::JobKind kind,
                                  kennel::v1::Precision precision) {
  JobEvent event;
  kennel::v1::JobStarted* started = event.mutable_started();
  started->set_kind(kind);
  for (const std::string& label : prepared.dataset.labels) {
    started->add_classes(label);
  }
  for (const Split* split : {&prepared.dataset.train, &prepared.dataset.valid,
                             &prepared.dataset.test}) {
    kennel::v1::SplitCount* count = started->add_splits();
    count->set_split(split->name);
    count->set_images(static_cast<int64_t>(split->images.size()));
  }
  started->set_device(DeviceName(prepared.device));
  started->set_precision(precision);
  started->set_backbone_digest(prepared.backbone.digest);
  return event;
}

std::string ObserveRules(RuleSet& rules, const EpochStats& stats,
                         double wait_share, JobContext& context, int trial) {
  EpochSignal signal;
  signal.epoch = stats.epoch;
  signal.train_loss = stats.train_loss;
  signal.valid_loss = stats.valid_loss;
  signal.mean_abs_gradient = stats.mean_abs_gradient;
  signal.data_wait_share = wait_share;
  std::string stop;
  for (kennel::v1::RuleFired& fired : rules.Observe(signal)) {
    if (fired.action() == kennel::v1::RULE_ACTION_STOP && stop.empty()) {
      stop = absl::StrCat("stopped by rule ", fired.rule(), " at epoch ",
                          stats.epoch, ": ", fired.message());
    }
    JobEvent event;
    event.set_trial(trial);
    *event.mutable_rule() = std::move(fired);
    context.Emit(std::move(event));
  }
  return stop;
}

std::string DeviceName(const torch::Device& device) {
  return device.is_cuda()
             ? absl::StrCat("cuda:", std::max<int>(0, device.index()))
             : "cpu";
}

absl::Status ValidateHyperparameters(const kennel::v1::Hyperparameters& h) {
  RETURN_IF_ERROR(ValidateHeadConfig(HeadConfigFrom(h)));
  if (!(h.unaugmented_share() >= 0 && h.unaugmented_share() < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unaugmented_share must be in [0, 1) (got ",
                     h.unaugmented_share(), ")"));
  }
  if (!kennel::v1::TrainMode_IsValid(h.mode())) {
    return absl::InvalidArgumentError("mode must be head or finetune");
  }
  return absl::OkStatus();
}

HeadConfig HeadConfigFrom(const kennel::v1::Hyperparameters& h) {
  HeadConfig c;
  c.learning_rate = h.learning_rate();
  c.weight_decay = h.weight_decay();
  c.batch_size = h.batch_size();
  c.epochs = h.epochs();
  c.seed = h.seed();
  c.unaugmented_share = h.unaugmented_share();
  return c;
}

absl::StatusOr<PreparedSpec> PrepareSpec(const kennel::v1::JobSpec& spec,
                                         const TrainerOptions& options) {
  PreparedSpec prepared;
  prepared.spec = spec;
  if (!spec.register_as().empty()) {
    RETURN_IF_ERROR(ValidateName("model name", spec.register_as()));
    if (options.publisher == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "this kennel-trainer was started without --registry, so it cannot "
          "register \"",
          spec.register_as(),
          "\"; start it with --registry HOST:PORT or leave register_as "
          "empty"));
    }
  }
  for (const std::string& alias : spec.aliases()) {
    RETURN_IF_ERROR(ValidateName("alias", alias));
    if (spec.register_as().empty()) {
      return absl::InvalidArgumentError(
          "aliases need a model name to register (register_as)");
    }
  }
  if (!kennel::v1::Precision_IsValid(spec.precision())) {
    return absl::InvalidArgumentError("unknown precision");
  }
  if (!(spec.max_bad_image_share() >= 0 && spec.max_bad_image_share() <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_bad_image_share must be in [0, 1] (got ",
                     spec.max_bad_image_share(), ")"));
  }
  prepared.bad_images.max_share =
      spec.max_bad_image_share() > 0 ? spec.max_bad_image_share() : 0.01;
  ASSIGN_OR_RETURN(prepared.rules, RuleSet::Create(spec.rules()));
  ASSIGN_OR_RETURN(prepared.device,
                   ResolveDevice(spec.device(), options.device));
  prepared.precision = spec.precision();
  if (prepared.precision == kennel::v1::PRECISION_BF16 &&
      !prepared.device.is_cuda() && !CpuHasBf16()) {
    return absl::InvalidArgumentError(
        "precision bf16 was asked for, but this CPU has no native bf16 "
        "arithmetic (AVX-512 BF16 or AMX); use fp32 or auto");
  }

  if (spec.data().empty()) {
    return absl::InvalidArgumentError(
        "no data set given: name a folder under the trainer's --data-root "
        "holding train/, valid/ and test/");
  }
  if (absl::StartsWith(spec.data(), "s3://")) {
    RETURN_IF_ERROR(ListRemoteData(spec.data(), options, &prepared));
  } else {
    ASSIGN_OR_RETURN(
        std::string data_dir,
        ResolveUnderRoot(options.data_root, spec.data(), "data set"));
    ASSIGN_OR_RETURN(prepared.dataset,
                     ScanImageFolder(data_dir, options.data_root));
  }
  prepared.dataset_uri = spec.data();

  if (spec.backbone().empty()) {
    return absl::InvalidArgumentError(
        "no backbone given: name a TorchScript feature extractor under the "
        "trainer's --data-root (tools/export_backbone.py writes one)");
  }
  std::string backbone_path;
  if (absl::StartsWith(spec.backbone(), "s3://")) {
    ASSIGN_OR_RETURN(backbone_path, FetchBackbone(spec.backbone(), options));
  } else {
    ASSIGN_OR_RETURN(
        backbone_path,
        ResolveUnderRoot(options.data_root, spec.backbone(), "backbone"));
  }
  std::error_code ec;
  if (!fs::is_regular_file(backbone_path, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("backbone \"", spec.backbone(), "\" is not a file"));
  }
  torch::jit::Module module;
  ASSIGN_OR_RETURN(
      prepared.backbone,
      InspectBackbone(backbone_path, spec.preprocessing(), &module));
  prepared.backbone_module =
      std::make_shared<const torch::jit::Module>(std::move(module));
  return prepared;
}

absl::Status FetchData(const PreparedSpec& prepared, JobContext& context) {
  if (prepared.remote_files.empty()) return absl::OkStatus();
  ProgressReporter progress(context, "download",
                            static_cast<int64_t>(prepared.remote_files.size()));
  int64_t done = 0;
  for (const PreparedSpec::RemoteFile& file : prepared.remote_files) {
    if (context.cancelled()) {
      return absl::CancelledError("cancelled while downloading the data set");
    }
    std::error_code ec;
    if (!fs::exists(file.path, ec) ||
        static_cast<int64_t>(fs::file_size(file.path, ec)) != file.size) {
      RETURN_IF_ERROR(
          Annotate(Download(*prepared.data_store, file.key, file.path),
                   "downloading " + prepared.dataset_uri + "/" + file.key));
    }
    progress.Update(++done);
  }
  return absl::OkStatus();
}

absl::StatusOr<Precision> ResolvePrecision(const PreparedSpec& prepared,
                                           JobContext& context) {
  if (prepared.precision != kennel::v1::PRECISION_AUTO) {
    return prepared.precision;
  }
  // The comparison reads training images.
  RETURN_IF_ERROR(FetchData(prepared, context));
  if (prepared.device.is_cuda() || !CpuHasBf16()) {
    return kennel::v1::PRECISION_FP32;
  }
  // Compare the two precisions on a few real images before trusting bf16.
  const Split& train = prepared.dataset.train;
  const kennel::v1::Preprocessing& spec = prepared.backbone.preprocessing;
  const int64_t floats = image::TensorSize(spec);
  std::vector<float> pixels;
  int64_t n = 0;
  for (size_t i = 0; i < train.images.size() && n < 4; ++i) {
    auto bytes = ReadFileBytes(train.images[i].path);
    if (!bytes.ok()) continue;
    pixels.resize((n + 1) * floats);
    image::DecodeLimits limits;
    if (image::DecodeAndPreprocess(*bytes, spec, limits,
                                   pixels.data() + n * floats)
            .ok()) {
      ++n;
    }
  }
  if (n == 0) return kennel::v1::PRECISION_FP32;
  ASSIGN_OR_RETURN(auto fp32, FeatureExtractor::Create(
                                  *prepared.backbone_module,
                                  kennel::v1::PRECISION_FP32, prepared.device));
  ASSIGN_OR_RETURN(auto bf16, FeatureExtractor::Create(
                                  *prepared.backbone_module,
                                  kennel::v1::PRECISION_BF16, prepared.device));
  ASSIGN_OR_RETURN(torch::Tensor a,
                   fp32->Run(pixels.data(), n, spec.input_size()));
  ASSIGN_OR_RETURN(torch::Tensor b,
                   bf16->Run(pixels.data(), n, spec.input_size()));
  const double similarity =
      torch::cosine_similarity(a, b, 1, 1e-8).min().item<double>();
  if (similarity >= 0.99) {
    context.Log(absl::StrFormat(
        "backbone pass in bf16 (precision auto: this CPU has bf16 and its "
        "features agree with fp32, cosine similarity >= %.4f)",
        similarity));
    return kennel::v1::PRECISION_BF16;
  }
  context.Log(absl::StrFormat(
      "backbone pass in fp32 (precision auto: bf16 features differ from fp32, "
      "cosine similarity %.4f < 0.99)",
      similarity));
  return kennel::v1::PRECISION_FP32;
}

absl::StatusOr<Extraction> ExtractFeatures(const PreparedSpec& prepared,
                                           Precision precision,
                                           const TrainerOptions& options,
                                           JobContext& context) {
  const auto start = Clock::now();
  RETURN_IF_ERROR(FetchData(prepared, context));
  LazyExtractor extractor(prepared, precision);
  FeatureCache cache(
      options.cache_dir.empty() ? "" : options.cache_dir + "/features");
  FeatureKeyContext key_context;
  key_context.backbone_digest = prepared.backbone.digest;
  key_context.preprocessing = prepared.backbone.preprocessing;
  key_context.precision = precision;

  auto set = std::make_shared<FeatureSet>();
  set->num_classes = prepared.dataset.num_classes();
  set->feature_dim = prepared.backbone.feature_dim;
  Extraction out;
  out.precision = precision;
  struct Target {
    const Split* split;
    FeatureSplit* features;
    std::vector<std::string>* bad;
  };
  const Target targets[] = {
      {&prepared.dataset.train, &set->train, &out.bad.train},
      {&prepared.dataset.valid, &set->valid, &out.bad.valid},
      {&prepared.dataset.test, &set->test, &out.bad.test},
  };
  for (const Target& target : targets) {
    const int64_t hits_before = cache.hits(), misses_before = cache.misses();
    ASSIGN_OR_RETURN(SplitFeatures split,
                     ExtractSplit(*target.split, prepared, extractor, cache,
                                  key_context, options, context));
    if (options.metrics) {
      options.metrics->AddFeatureCacheHits(cache.hits() - hits_before);
      options.metrics->AddFeatureCacheMisses(cache.misses() - misses_before);
    }
    *target.features = std::move(split.split);
    *target.bad = std::move(split.bad_paths);
    for (std::string& digest : split.digests) {
      out.content_digests.push_back(std::move(digest));
    }
  }
  if (set->train.size() == 0) {
    return absl::FailedPreconditionError("no training image could be read");
  }
  out.features = std::move(set);
  out.cache_hits = cache.hits();
  out.cache_misses = cache.misses();
  out.seconds = Seconds(start, Clock::now());
  out.setup_seconds = extractor.setup_seconds();
  context.Log(absl::StrFormat(
      "features ready: %d image(s) in %.1f s (%d cached, %d computed in %s)",
      out.content_digests.size(), out.seconds, out.cache_hits, out.cache_misses,
      kennel::v1::Precision_Name(precision)));
  return out;
}

std::vector<std::string> ContentDigests(const Dataset& dataset) {
  std::vector<std::string> digests;
  for (const Split* split : {&dataset.train, &dataset.valid, &dataset.test}) {
    for (const ImageEntry& image : split->images) {
      auto digest = Sha256File(image.path);
      digests.push_back(digest.ok() ? *digest : "");
    }
  }
  return digests;
}

kennel::v1::JobEvent EpochEvent(const EpochStats& stats, double data_wait_share,
                                int trial) {
  JobEvent event;
  event.set_trial(trial);
  kennel::v1::EpochEnd* epoch = event.mutable_epoch();
  epoch->set_epoch(stats.epoch);
  epoch->set_epochs(stats.epochs);
  epoch->set_train_loss(stats.train_loss);
  epoch->set_valid_loss(stats.valid_loss);
  epoch->set_valid_accuracy(stats.valid_accuracy);
  epoch->set_images_per_second(stats.images_per_second);
  epoch->set_data_wait_share(data_wait_share);
  epoch->set_seconds(stats.seconds);
  epoch->set_mean_abs_gradient(stats.mean_abs_gradient);
  epoch->set_train_accuracy(stats.train_accuracy);
  return event;
}

absl::StatusOr<std::string> ExportAndRegister(
    const PreparedSpec& prepared, const TrainerOptions& options,
    const torch::jit::Module& backbone, const HeadWeights& head,
    const kennel::v1::Hyperparameters& hyperparameters,
    const kennel::v1::ModelMetrics& metrics, Precision precision,
    const std::string& dataset_fingerprint, JobContext& context, int trial) {
  const std::string dir = CacheRoot(options) + "/models";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create ", dir, ": ", ec.message()));
  }
  const std::string path =
      absl::StrCat(dir, "/", context.job_id(),
                   trial > 0 ? absl::StrCat("-trial", trial) : "", ".pt");
  RETURN_IF_ERROR(ExportClassifier(backbone, head.weight, head.bias,
                                   prepared.dataset.labels, prepared.backbone,
                                   path));
  if (prepared.spec.register_as().empty()) {
    context.Log("classifier written to " + path +
                " (not registered: no register_as)");
    return std::string();
  }
  kennel::v1::PushHeader header;
  header.set_name(prepared.spec.register_as());
  kennel::v1::ComponentSpec* component = header.add_components();
  component->set_role(kennel::v1::COMPONENT_ROLE_MODEL);
  component->set_format("torchscript");
  for (const std::string& label : prepared.dataset.labels) {
    header.add_labels(label);
  }
  *header.mutable_preprocessing() = prepared.backbone.preprocessing;
  kennel::v1::Lineage* lineage = header.mutable_lineage();
  lineage->set_job_id(context.job_id());
  *lineage->mutable_hyperparameters() = hyperparameters;
  lineage->set_dataset_fingerprint(dataset_fingerprint);
  lineage->set_dataset_uri(prepared.dataset_uri);
  lineage->set_backbone_digest(prepared.backbone.digest);
  lineage->set_trial(trial);
  *header.mutable_metrics() = metrics;
  header.set_precision(precision);
  header.set_description(prepared.spec.description());
  for (const std::string& alias : prepared.spec.aliases()) {
    header.add_aliases(alias);
  }
  absl::StatusOr<kennel::v1::ModelVersion> published =
      options.publisher->Publish(header, {path});
  if (!published.ok()) {
    // The trained model is not lost: say where it is, and for a refused
    // token, which flag of the trainer's gives the registry's token.
    std::string advice =
        absl::StrCat("the trained classifier is kept at ", path);
    if (absl::IsUnauthenticated(published.status())) {
      absl::StrAppend(&advice,
                      "; start kennel-trainer with --registry-token-file "
                      "holding the registry's token");
    }
    return absl::Status(
        published.status().code(),
        absl::StrCat("registering ", prepared.spec.register_as(), " with ",
                     options.publisher->Describe(), " failed: ",
                     published.status().message(), " (", advice, ")"));
  }
  const kennel::v1::ModelVersion& version = *published;
  const std::string ref = absl::StrCat(version.name(), ":", version.version());
  context.Log(absl::StrCat("registered ", ref, " with ",
                           options.publisher->Describe()));
  // The registry holds the file now; the local copy would only pile up.
  fs::remove(path, ec);
  return ref;
}

std::unique_ptr<TrainerBackend> NewTorchTrainerBackend(TrainerOptions options) {
  return std::make_unique<TorchTrainerBackend>(std::move(options));
}

void SetComputeThreads(int threads) {
  at::set_num_threads(std::max(1, threads));
  LOG(INFO) << "LibTorch intra-op threads: " << at::get_num_threads();
}

TorchTrainerBackend::TorchTrainerBackend(TrainerOptions options)
    : options_(std::move(options)) {}

absl::StatusOr<JobFn> TorchTrainerBackend::PrepareTrain(
    const kennel::v1::TrainRequest& request) {
  RETURN_IF_ERROR(ValidateHyperparameters(request.hyperparameters()));
  ASSIGN_OR_RETURN(PreparedSpec prepared,
                   PrepareSpec(request.spec(), options_));
  auto shared = std::make_shared<const PreparedSpec>(std::move(prepared));
  const kennel::v1::Hyperparameters hyper = request.hyperparameters();
  const TrainerOptions* options = &options_;
  return JobFn([shared, hyper, options](JobContext& context)
                   -> absl::StatusOr<kennel::v1::JobCompleted> {
    if (hyper.mode() == kennel::v1::TRAIN_MODE_FINETUNE) {
      return RunFinetune(*shared, hyper, *options, context);
    }
    return RunHead(*shared, hyper, *options, context);
  });
}

}  // namespace kennel::trainer
