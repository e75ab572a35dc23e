// Trains a linear head (logits = features * W^T + b) with Adam on features
// that are already computed, which is what head mode and every tuning trial
// do after the backbone pass has filled the feature cache.
//
// Losses are per-sample mean cross-entropy. A run is deterministic given its
// seed: the initial weights (PyTorch's nn.Linear initialisation, uniform in
// +-1/sqrt(F), drawn from a seeded generator) and the shuffled batch order of
// every epoch come from the seed alone, so Kennel's training can be replayed
// step for step by a reference loop (see HeadTrace).
//
// Thread-safe: a HeadTrainer holds the features read-only, so several runs
// (tuning trials with their own hyperparameters, callbacks and early stop)
// may call Train() on one trainer at the same time.
#ifndef KENNEL_SERVICES_TRAINER_HEAD_TRAINER_H_
#define KENNEL_SERVICES_TRAINER_HEAD_TRAINER_H_

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"

namespace kennel::trainer {

// Features of one split: [N, F] float32 and their labels [N] int64.
struct FeatureSplit {
  torch::Tensor features;
  torch::Tensor labels;
  int64_t size() const { return features.defined() ? features.size(0) : 0; }
};

struct FeatureSet {
  FeatureSplit train;
  FeatureSplit valid;
  FeatureSplit test;  // may be empty
  int num_classes = 0;
  int feature_dim = 0;
};

struct HeadConfig {
  double learning_rate = 1e-3;
  double weight_decay = 0;
  int batch_size = 64;
  int epochs = 5;
  uint64_t seed = 0;
  // Fine-tuning only: share of images not augmented (see Hyperparameters).
  double unaugmented_share = 0;
};

struct EpochStats {
  int epoch = 0;  // 1-based
  int epochs = 0;
  double train_loss = 0;  // per-sample mean over the epoch's steps
  double train_accuracy = 0;
  double valid_loss = 0;
  double valid_accuracy = 0;
  // Mean absolute gradient of the weight matrix over the epoch's steps.
  double mean_abs_gradient = 0;
  double seconds = 0;
  double images_per_second = 0;
  double forward_seconds = 0;
  double backward_seconds = 0;
  double optimizer_seconds = 0;
};

struct Evaluation {
  double loss = 0;
  double accuracy = 0;
};

struct HeadWeights {
  torch::Tensor weight;  // [C, F]
  torch::Tensor bias;    // [C]
};

// What a reference implementation needs to replay a run: the initial
// weights, the order of samples in every epoch, and the loss of every step.
struct HeadTrace {
  HeadWeights initial;
  // Per epoch, the permutation of training sample indices; batches are
  // consecutive slices of batch_size.
  std::vector<std::vector<int64_t>> epoch_orders;
  std::vector<double> step_losses;
};

enum class EpochDecision { kContinue, kStop };

struct HeadRunResult {
  HeadWeights weights;
  std::vector<EpochStats> epochs;
  // Ended before its last epoch because on_epoch said kStop.
  bool stopped = false;
  // Ended because `cancelled` returned true (at a step boundary).
  bool cancelled = false;
};

// Called after each epoch; returning kStop ends the run there (a rule with
// action STOP, or successive halving).
using EpochCallback = std::function<EpochDecision(const EpochStats&)>;

class HeadTrainer {
 public:
  explicit HeadTrainer(std::shared_ptr<const FeatureSet> data);

  // INVALID_ARGUMENT for a bad configuration (learning rate <= 0, batch size
  // outside 1..kMaxBatchSize, epochs outside 1..kMaxEpochs, weight decay < 0;
  // the bounds are in search_space.h). `cancelled` is polled before every
  // step and may be null; `trace` may be null.
  absl::StatusOr<HeadRunResult> Train(const HeadConfig& config,
                                      const EpochCallback& on_epoch,
                                      const std::function<bool()>& cancelled,
                                      HeadTrace* trace = nullptr) const;

  // Loss and accuracy of a head on a split (zeros for an empty split).
  static Evaluation Evaluate(const HeadWeights& weights,
                             const FeatureSplit& split);

  // The seeded initial weights of a [C, F] head.
  static HeadWeights InitialWeights(int num_classes, int feature_dim,
                                    uint64_t seed);

  // The seeded permutation of `n` indices for one epoch.
  static std::vector<int64_t> EpochOrder(int64_t n, uint64_t seed, int epoch);

  const FeatureSet& data() const { return *data_; }

 private:
  const std::shared_ptr<const FeatureSet> data_;
};

absl::Status ValidateHeadConfig(const HeadConfig& config);

// A 64-bit seed derived from (seed, stream, index), the same on every
// platform; used for initialisation, batch order and augmentation.
uint64_t MixSeed(uint64_t seed, uint64_t stream, uint64_t index);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_HEAD_TRAINER_H_
