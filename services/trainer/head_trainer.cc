#include "services/trainer/head_trainer.h"

#include <torch/nn/functional/loss.h>
#include <torch/optim/adam.h>

#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "services/trainer/search_space.h"

namespace kennel::trainer {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// splitmix64: a tiny generator whose output is the same on every platform,
// so a seed names one initialisation and one batch order everywhere (the
// parity test replays them in Python).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1).
  double Uniform() { return (Next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

constexpr uint64_t kInitStream = 1;
constexpr uint64_t kOrderStream = 2;
}  // namespace

uint64_t MixSeed(uint64_t seed, uint64_t stream, uint64_t index) {
  SplitMix64 a(seed ^ (stream * 0xd1b54a32d192ed03ULL));
  SplitMix64 b(a.Next() ^ (index * 0x8cb92ba72f3d8dd7ULL));
  return b.Next();
}

absl::Status ValidateHeadConfig(const HeadConfig& config) {
  if (!(config.learning_rate > 0) || !std::isfinite(config.learning_rate)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "learning_rate must be > 0 (got ", config.learning_rate, ")"));
  }
  if (!(config.weight_decay >= 0) || !std::isfinite(config.weight_decay)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weight_decay must be >= 0 (got ", config.weight_decay, ")"));
  }
  if (config.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size must be > 0 (got ", config.batch_size, ")"));
  }
  if (config.batch_size > kMaxBatchSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size must be at most ", kMaxBatchSize, " (got ",
                     config.batch_size, ")"));
  }
  if (config.epochs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("epochs must be > 0 (got ", config.epochs, ")"));
  }
  if (config.epochs > kMaxEpochs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "epochs must be at most ", kMaxEpochs, " (got ", config.epochs, ")"));
  }
  return absl::OkStatus();
}

HeadTrainer::HeadTrainer(std::shared_ptr<const FeatureSet> data)
    : data_(std::move(data)) {}

HeadWeights HeadTrainer::InitialWeights(int num_classes, int feature_dim,
                                        uint64_t seed) {
  SplitMix64 rng(MixSeed(seed, kInitStream, 0));
  const double bound = 1.0 / std::sqrt(static_cast<double>(feature_dim));
  HeadWeights w;
  w.weight = torch::empty({num_classes, feature_dim}, torch::kFloat32);
  w.bias = torch::empty({num_classes}, torch::kFloat32);
  float* weight = w.weight.data_ptr<float>();
  for (int64_t i = 0; i < int64_t{num_classes} * feature_dim; ++i) {
    weight[i] = static_cast<float>((2 * rng.Uniform() - 1) * bound);
  }
  float* bias = w.bias.data_ptr<float>();
  for (int i = 0; i < num_classes; ++i) {
    bias[i] = static_cast<float>((2 * rng.Uniform() - 1) * bound);
  }
  return w;
}

std::vector<int64_t> HeadTrainer::EpochOrder(int64_t n, uint64_t seed,
                                             int epoch) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  SplitMix64 rng(MixSeed(seed, kOrderStream, epoch));
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.Next() % uint64_t(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

Evaluation HeadTrainer::Evaluate(const HeadWeights& weights,
                                 const FeatureSplit& split) {
  Evaluation out;
  if (split.size() == 0) return out;
  torch::NoGradGuard no_grad;
  // Chunks bound the memory of the logits on large splits.
  constexpr int64_t kChunk = 4096;
  double loss_sum = 0;
  int64_t correct = 0;
  for (int64_t start = 0; start < split.size(); start += kChunk) {
    const int64_t end = std::min(split.size(), start + kChunk);
    torch::Tensor x = split.features.slice(0, start, end);
    torch::Tensor y = split.labels.slice(0, start, end);
    torch::Tensor logits = torch::linear(x, weights.weight, weights.bias);
    loss_sum += torch::nn::functional::cross_entropy(
                    logits, y,
                    torch::nn::functional::CrossEntropyFuncOptions().reduction(
                        torch::kSum))
                    .item<double>();
    correct += logits.argmax(1).eq(y).sum().item<int64_t>();
  }
  out.loss = loss_sum / split.size();
  out.accuracy = static_cast<double>(correct) / split.size();
  return out;
}

absl::StatusOr<HeadRunResult> HeadTrainer::Train(
    const HeadConfig& config, const EpochCallback& on_epoch,
    const std::function<bool()>& cancelled, HeadTrace* trace) const {
  if (absl::Status s = ValidateHeadConfig(config); !s.ok()) return s;
  const FeatureSet& data = *data_;
  const int64_t n = data.train.size();
  if (n == 0) {
    return absl::InvalidArgumentError("no training features");
  }
  HeadWeights init =
      InitialWeights(data.num_classes, data.feature_dim, config.seed);
  if (trace) {
    trace->initial = {init.weight.clone(), init.bias.clone()};
    trace->epoch_orders.clear();
    trace->step_losses.clear();
  }
  torch::Tensor weight = init.weight.requires_grad_(true);
  torch::Tensor bias = init.bias.requires_grad_(true);
  torch::optim::Adam optimizer(std::vector<torch::Tensor>{weight, bias},
                               torch::optim::AdamOptions(config.learning_rate)
                                   .weight_decay(config.weight_decay));

  HeadRunResult result;
  for (int epoch = 1; epoch <= config.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    std::vector<int64_t> order = EpochOrder(n, config.seed, epoch);
    torch::Tensor index = torch::from_blob(order.data(), {n}, torch::kInt64);
    EpochStats stats;
    stats.epoch = epoch;
    stats.epochs = config.epochs;
    double loss_sum = 0;
    double gradient_sum = 0;
    int64_t correct = 0;
    int64_t steps = 0;
    for (int64_t start = 0; start < n; start += config.batch_size) {
      if (cancelled && cancelled()) {
        result.cancelled = true;
        result.weights = {weight.detach().clone(), bias.detach().clone()};
        return result;
      }
      const int64_t end = std::min(n, start + config.batch_size);
      torch::Tensor rows = index.slice(0, start, end);
      torch::Tensor x = data.train.features.index_select(0, rows);
      torch::Tensor y = data.train.labels.index_select(0, rows);
      const auto t0 = Clock::now();
      torch::Tensor logits = torch::linear(x, weight, bias);
      torch::Tensor loss = torch::nn::functional::cross_entropy(logits, y);
      const auto t1 = Clock::now();
      optimizer.zero_grad();
      loss.backward();
      const auto t2 = Clock::now();
      optimizer.step();
      const auto t3 = Clock::now();
      const double batch_loss = loss.item<double>();
      loss_sum += batch_loss * (end - start);
      gradient_sum += weight.grad().abs().mean().item<double>();
      correct += logits.detach().argmax(1).eq(y).sum().item<int64_t>();
      ++steps;
      stats.forward_seconds += Seconds(t0, t1);
      stats.backward_seconds += Seconds(t1, t2);
      stats.optimizer_seconds += Seconds(t2, t3);
      if (trace) trace->step_losses.push_back(batch_loss);
    }
    if (trace) trace->epoch_orders.push_back(std::move(order));
    stats.train_loss = loss_sum / n;
    stats.train_accuracy = static_cast<double>(correct) / n;
    stats.mean_abs_gradient = gradient_sum / steps;
    HeadWeights current{weight.detach(), bias.detach()};
    const Evaluation valid = Evaluate(current, data.valid);
    stats.valid_loss = valid.loss;
    stats.valid_accuracy = valid.accuracy;
    stats.seconds = Seconds(epoch_start, Clock::now());
    stats.images_per_second = stats.seconds > 0 ? n / stats.seconds : 0;
    result.epochs.push_back(stats);
    if (on_epoch && on_epoch(stats) == EpochDecision::kStop) {
      result.stopped = epoch < config.epochs;
      break;
    }
  }
  result.weights = {weight.detach().clone(), bias.detach().clone()};
  return result;
}

}  // namespace kennel::trainer
