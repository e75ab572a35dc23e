// Fine-tuning: every parameter of the backbone and a new linear head train
// together with Adam, on augmented images (random resized crop and flip from
// the shared image pipeline), decoded on a pool of threads that runs ahead
// of the compute. Augmentation is seeded per (seed, epoch, image), so a run
// does not depend on which thread decoded what.
//
// Also: evaluating a backbone + head on a split of images, which fine-tuning
// uses after every epoch and at the end on the test split.
#ifndef KENNEL_SERVICES_TRAINER_FINETUNE_H_
#define KENNEL_SERVICES_TRAINER_FINETUNE_H_

#include <torch/script.h>

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/trainer/dataset.h"
#include "services/trainer/head_trainer.h"
#include "services/trainer/profiler.h"
#include "services/trainer/torch_model.h"

namespace kennel::trainer {

struct FinetuneConfig {
  HeadConfig hyper;  // learning rate, weight decay, batch size, epochs, seed
  int workers = 2;   // decode threads
  int prefetch = 4;  // batches decoded ahead of the compute
  torch::Device device = torch::kCPU;
  BadImageBudget bad_images;
};

struct FinetuneResult {
  torch::jit::Module backbone;  // trained, in eval mode
  HeadWeights head;
  std::vector<EpochStats> epochs;
  // Per epoch, the share of its wall time spent waiting for data.
  std::vector<double> data_wait_shares;
  bool stopped = false;
  bool cancelled = false;
  BadImages bad;
};

// Epoch callback that also sees the data-wait share of the epoch.
using FinetuneEpochCallback =
    std::function<EpochDecision(const EpochStats&, double data_wait_share)>;

absl::StatusOr<FinetuneResult> Finetune(torch::jit::Module backbone,
                                        const BackboneSpec& spec,
                                        const Dataset& dataset,
                                        const FinetuneConfig& config,
                                        const FinetuneEpochCallback& on_epoch,
                                        const std::function<bool()>& cancelled,
                                        Profiler* profiler);

// Loss and accuracy of backbone + head on `split`, without augmentation.
// Unreadable images are skipped and appended to `bad`. The backbone is put
// in eval mode.
absl::StatusOr<Evaluation> EvaluateImages(
    torch::jit::Module& backbone, const HeadWeights& head,
    const BackboneSpec& spec, const Split& split, const FinetuneConfig& config,
    std::vector<std::string>* bad, const std::function<bool()>& cancelled);

// Reads a whole file; INVALID_ARGUMENT when it cannot be read.
absl::StatusOr<std::string> ReadFileBytes(const std::string& path);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_FINETUNE_H_
