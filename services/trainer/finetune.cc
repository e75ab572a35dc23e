#include "services/trainer/finetune.h"

#include <torch/nn/functional/loss.h>
#include <torch/optim/adam.h>

#include <chrono>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/image/image.h"
#include "common/status.h"
#include "services/trainer/batch_loader.h"

namespace kennel::trainer {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

constexpr uint64_t kAugmentStream = 3;
constexpr uint64_t kPlainStream = 4;

// Decodes (and augments, when `rng_seed` is set) one image file.
ItemResult PrepareImage(const std::string& path,
                        const kennel::v1::Preprocessing& spec,
                        const uint64_t* rng_seed, float* out) {
  auto bytes = ReadFileBytes(path);
  if (!bytes.ok()) return ItemResult::kBad;
  image::DecodeLimits limits;
  auto rgb = image::DecodeRgb(*bytes, limits,
                              rng_seed ? 0 : image::MinDecodeSide(spec));
  if (!rgb.ok()) return ItemResult::kBad;
  absl::Status status;
  if (rng_seed) {
    std::mt19937_64 rng(*rng_seed);
    status = image::PreprocessAugmented(*rgb, spec, rng, out);
  } else {
    status = image::Preprocess(*rgb, spec, out);
  }
  return status.ok() ? ItemResult::kPixels : ItemResult::kBad;
}

// Sum of |gradient| and element count over the weight tensors (two or more
// dimensions) of `params`.
void AddWeightGradients(const std::vector<torch::Tensor>& params, double* sum,
                        int64_t* count) {
  for (const torch::Tensor& p : params) {
    if (p.dim() < 2 || !p.grad().defined()) continue;
    *sum += p.grad().abs().sum().item<double>();
    *count += p.numel();
  }
}

}  // namespace

absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError("cannot open " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (!in.good() && !in.eof()) {
    return absl::InvalidArgumentError("cannot read " + path);
  }
  return buffer.str();
}

absl::StatusOr<Evaluation> EvaluateImages(
    torch::jit::Module& backbone, const HeadWeights& head,
    const BackboneSpec& spec, const Split& split, const FinetuneConfig& config,
    std::vector<std::string>* bad, const std::function<bool()>& cancelled) {
  Evaluation out;
  const int64_t n = static_cast<int64_t>(split.images.size());
  if (n == 0) return out;
  const int size = spec.preprocessing.input_size();
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  BatchLoaderOptions options;
  options.batch_size = std::max(1, config.hyper.batch_size);
  options.item_floats = image::TensorSize(spec.preprocessing);
  options.workers = config.workers;
  options.prefetch = config.prefetch;
  BatchLoader loader(std::move(order), options,
                     [&](int64_t item, float* pixels) {
                       return PrepareImage(split.images[item].path,
                                           spec.preprocessing, nullptr, pixels);
                     });
  double loss_sum = 0;
  int64_t correct = 0, seen = 0;
  try {
    backbone.eval();
    torch::NoGradGuard no_grad;
    torch::Tensor weight = head.weight.to(config.device);
    torch::Tensor bias = head.bias.to(config.device);
    LoadedBatch batch;
    while (loader.Next(&batch)) {
      if (cancelled && cancelled()) {
        return absl::CancelledError("cancelled during evaluation");
      }
      for (int64_t item : batch.bad_items) {
        if (bad) bad->push_back(split.images[item].path);
      }
      const int64_t m = static_cast<int64_t>(batch.pixel_items.size());
      if (m == 0) continue;
      torch::Tensor x = torch::from_blob(batch.pixels.data(),
                                         {m, 3, size, size}, torch::kFloat32)
                            .to(config.device);
      std::vector<int64_t> labels;
      for (int64_t item : batch.pixel_items) {
        labels.push_back(split.images[item].label);
      }
      torch::Tensor y = torch::tensor(labels, torch::kInt64).to(config.device);
      torch::Tensor logits =
          torch::linear(backbone.forward({x}).toTensor(), weight, bias);
      loss_sum +=
          torch::nn::functional::cross_entropy(
              logits, y,
              torch::nn::functional::CrossEntropyFuncOptions().reduction(
                  torch::kSum))
              .item<double>();
      correct += logits.argmax(1).eq(y).sum().item<int64_t>();
      seen += m;
    }
  } catch (const std::exception& e) {
    return TorchError(absl::StatusCode::kInternal,
                      "evaluating on " + split.name + "/", e);
  }
  if (seen > 0) {
    out.loss = loss_sum / seen;
    out.accuracy = static_cast<double>(correct) / seen;
  }
  return out;
}

absl::StatusOr<FinetuneResult> Finetune(torch::jit::Module backbone,
                                        const BackboneSpec& spec,
                                        const Dataset& dataset,
                                        const FinetuneConfig& config,
                                        const FinetuneEpochCallback& on_epoch,
                                        const std::function<bool()>& cancelled,
                                        Profiler* profiler) {
  if (absl::Status s = ValidateHeadConfig(config.hyper); !s.ok()) return s;
  const HeadConfig& hyper = config.hyper;
  const int64_t n = static_cast<int64_t>(dataset.train.images.size());
  const int size = spec.preprocessing.input_size();
  FinetuneResult result;
  std::set<std::string> bad_train;

  std::vector<torch::Tensor> params;
  torch::Tensor weight, bias;
  std::unique_ptr<torch::optim::Adam> optimizer;
  try {
    backbone.to(config.device);
    backbone.train();
    for (torch::Tensor p : backbone.parameters()) {
      // A copied module's parameters carry the copy's autograd history;
      // detaching in place makes them leaves the optimiser can own.
      p.detach_();
      p.requires_grad_(true);
      params.push_back(p);
    }
    HeadWeights init = HeadTrainer::InitialWeights(
        dataset.num_classes(), spec.feature_dim, hyper.seed);
    weight = init.weight.to(config.device).requires_grad_(true);
    bias = init.bias.to(config.device).requires_grad_(true);
    params.push_back(weight);
    params.push_back(bias);
    optimizer = std::make_unique<torch::optim::Adam>(
        params, torch::optim::AdamOptions(hyper.learning_rate)
                    .weight_decay(hyper.weight_decay));
  } catch (const std::exception& e) {
    return TorchError(absl::StatusCode::kInvalidArgument,
                      "preparing the backbone for fine-tuning", e);
  }

  BatchLoaderOptions options;
  options.batch_size = hyper.batch_size;
  options.item_floats = image::TensorSize(spec.preprocessing);
  options.workers = config.workers;
  options.prefetch = config.prefetch;

  for (int epoch = 1; epoch <= hyper.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    std::vector<int64_t> order = HeadTrainer::EpochOrder(n, hyper.seed, epoch);
    BatchLoader loader(
        std::move(order), options, [&](int64_t item, float* pixels) {
          const uint64_t key = uint64_t(epoch) << 32 | uint64_t(item);
          const uint64_t seed = MixSeed(hyper.seed, kAugmentStream, key);
          const bool plain =
              hyper.unaugmented_share > 0 &&
              (MixSeed(hyper.seed, kPlainStream, key) >> 11) * 0x1.0p-53 <
                  hyper.unaugmented_share;
          return PrepareImage(dataset.train.images[item].path,
                              spec.preprocessing, plain ? nullptr : &seed,
                              pixels);
        });
    EpochStats stats;
    stats.epoch = epoch;
    stats.epochs = hyper.epochs;
    double loss_sum = 0, wait = 0, gradient_sum = 0;
    int64_t gradient_count = 0, correct = 0, seen = 0;
    LoadedBatch batch;
    while (true) {
      double waited = 0;
      if (!loader.Next(&batch, &waited)) break;
      wait += waited;
      if (cancelled && cancelled()) {
        result.cancelled = true;
        result.head = {weight.detach().cpu().clone(),
                       bias.detach().cpu().clone()};
        backbone.eval();
        result.backbone = backbone;
        return result;
      }
      for (int64_t item : batch.bad_items) {
        bad_train.insert(dataset.train.images[item].path);
      }
      const int64_t m = static_cast<int64_t>(batch.pixel_items.size());
      // Batch norm cannot train on a batch of one; such a remainder is
      // dropped from the step (its images still count in other epochs).
      if (m < 2) continue;
      std::vector<int64_t> labels;
      for (int64_t item : batch.pixel_items) {
        labels.push_back(dataset.train.images[item].label);
      }
      try {
        torch::Tensor x = torch::from_blob(batch.pixels.data(),
                                           {m, 3, size, size}, torch::kFloat32)
                              .to(config.device);
        torch::Tensor y =
            torch::tensor(labels, torch::kInt64).to(config.device);
        const auto t0 = Clock::now();
        torch::Tensor logits =
            torch::linear(backbone.forward({x}).toTensor(), weight, bias);
        torch::Tensor loss = torch::nn::functional::cross_entropy(logits, y);
        const auto t1 = Clock::now();
        optimizer->zero_grad();
        loss.backward();
        const auto t2 = Clock::now();
        AddWeightGradients(params, &gradient_sum, &gradient_count);
        optimizer->step();
        const auto t3 = Clock::now();
        loss_sum += loss.item<double>() * m;
        correct += logits.detach().argmax(1).eq(y).sum().item<int64_t>();
        seen += m;
        stats.forward_seconds += Seconds(t0, t1);
        stats.backward_seconds += Seconds(t1, t2);
        stats.optimizer_seconds += Seconds(t2, t3);
      } catch (const std::exception& e) {
        return TorchError(absl::StatusCode::kInternal,
                          absl::StrCat("training step in epoch ", epoch), e);
      }
    }
    if (epoch == 1) {
      result.bad.train.assign(bad_train.begin(), bad_train.end());
      RETURN_IF_ERROR(config.bad_images.Check("train", n, result.bad.train));
    }
    if (seen == 0) {
      return absl::FailedPreconditionError(
          "no training image could be used in this epoch");
    }
    const double train_seconds = Seconds(epoch_start, Clock::now());
    stats.train_loss = loss_sum / seen;
    stats.train_accuracy = static_cast<double>(correct) / seen;
    stats.mean_abs_gradient =
        gradient_count > 0 ? gradient_sum / gradient_count : 0;
    stats.images_per_second = train_seconds > 0 ? seen / train_seconds : 0;
    if (profiler) {
      profiler->AddData(wait);
      profiler->AddForward(stats.forward_seconds);
      profiler->AddBackward(stats.backward_seconds);
      profiler->AddOptimizer(stats.optimizer_seconds);
      profiler->AddImages(seen);
    }

    std::vector<std::string> bad_valid;
    HeadWeights current{weight.detach(), bias.detach()};
    auto valid = EvaluateImages(backbone, current, spec, dataset.valid, config,
                                &bad_valid, cancelled);
    backbone.train();
    if (!valid.ok()) {
      if (valid.status().code() == absl::StatusCode::kCancelled) {
        result.cancelled = true;
        break;
      }
      return valid.status();
    }
    if (epoch == 1) {
      result.bad.valid = bad_valid;
      RETURN_IF_ERROR(config.bad_images.Check(
          "valid", static_cast<int64_t>(dataset.valid.images.size()),
          bad_valid));
    }
    stats.valid_loss = valid->loss;
    stats.valid_accuracy = valid->accuracy;
    stats.seconds = Seconds(epoch_start, Clock::now());
    const double wait_share = train_seconds > 0 ? wait / train_seconds : 0;
    result.epochs.push_back(stats);
    result.data_wait_shares.push_back(wait_share);
    if (on_epoch && on_epoch(stats, wait_share) == EpochDecision::kStop) {
      result.stopped = epoch < hyper.epochs;
      break;
    }
  }
  backbone.eval();
  result.backbone = backbone;
  result.head = {weight.detach().cpu().clone(), bias.detach().cpu().clone()};
  return result;
}

}  // namespace kennel::trainer
