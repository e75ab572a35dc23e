// Training jobs end to end: validating a request before any job exists,
// filling and reading the feature cache, training (head mode on cached
// features, or fine-tuning), testing, exporting the classifier and
// registering it. The building blocks are public so that a tuning job can
// validate once, extract features once, train many heads on them in
// parallel and register the best.
#ifndef KENNEL_SERVICES_TRAINER_TRAIN_JOB_H_
#define KENNEL_SERVICES_TRAINER_TRAIN_JOB_H_

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kennel/v1/trainer.pb.h"
#include "services/trainer/dataset.h"
#include "services/trainer/feature_cache.h"
#include "services/trainer/head_trainer.h"
#include "services/trainer/job_manager.h"
#include "services/trainer/profiler.h"
#include "services/trainer/rules.h"
#include "services/trainer/torch_model.h"
#include "services/trainer/trainer_backend.h"

namespace kennel::trainer {

// A JobSpec that passed every check, with what the checks loaded.
struct PreparedSpec {
  kennel::v1::JobSpec spec;
  Dataset dataset;
  // Where the data came from, as the request named it.
  std::string dataset_uri;
  BackboneSpec backbone;
  // The backbone as loaded and checked (fp32, CPU, eval mode). Shared and
  // never modified: fine-tuning and export work on clones.
  std::shared_ptr<const torch::jit::Module> backbone_module;
  torch::Device device = torch::kCPU;
  // Requested precision; AUTO is resolved when features are computed.
  kennel::v1::Precision precision = kennel::v1::PRECISION_AUTO;
  // The job's rules with their parameters; copy one per run or trial.
  RuleSet rules;
  BadImageBudget bad_images;
  // A data set in an object store is read from a local copy under the cache
  // folder; these are the files that copy still lacks (see FetchData).
  struct RemoteFile {
    std::string key;
    std::string path;
    int64_t size = 0;
  };
  std::vector<RemoteFile> remote_files;
  std::shared_ptr<storage::ObjectStore> data_store;
};

// The JobStarted event of a job of `kind` on `prepared`.
kennel::v1::JobEvent StartedEvent(const PreparedSpec& prepared,
                                  kennel::v1::JobKind kind,
                                  kennel::v1::Precision precision);

// Feeds one epoch to `rules` (a run's or a trial's own copy) and emits what
// fires, tagged with `trial` (0 for a Train job); returns the reason when a
// STOP rule fired.
std::string ObserveRules(RuleSet& rules, const EpochStats& stats,
                         double wait_share, JobContext& context, int trial);

// Downloads the files of an s3:// data set that the local copy lacks
// (once: later jobs find them), emitting Progress events. Does nothing for
// local data. ExtractFeatures and fine-tuning call it before reading images.
absl::Status FetchData(const PreparedSpec& prepared, JobContext& context);

// Validates everything in a JobSpec that does not depend on
// hyperparameters: data set (under the data root; layout and classes),
// backbone (TorchScript, preprocessing, output shape), rules, device,
// precision and registration target. INVALID_ARGUMENT with a message a
// person can act on.
absl::StatusOr<PreparedSpec> PrepareSpec(const kennel::v1::JobSpec& spec,
                                         const TrainerOptions& options);

// INVALID_ARGUMENT unless the hyperparameters are usable (learning rate > 0,
// weight decay >= 0, batch size > 0, epochs > 0, a known mode).
absl::Status ValidateHyperparameters(const kennel::v1::Hyperparameters& h);
HeadConfig HeadConfigFrom(const kennel::v1::Hyperparameters& h);

struct Extraction {
  std::shared_ptr<const FeatureSet> features;
  // The precision the backbone pass ran in (FP32 or BF16).
  kennel::v1::Precision precision = kennel::v1::PRECISION_FP32;
  // Content digests of every image, train, valid, test concatenated
  // (empty strings for unreadable files), for the data set fingerprint.
  std::vector<std::string> content_digests;
  BadImages bad;
  int64_t cache_hits = 0;
  int64_t cache_misses = 0;
  double seconds = 0;
  // Of `seconds`, the time spent preparing the backbone (copy, freeze,
  // warm-up) before the first batch; zero when every feature was cached.
  double setup_seconds = 0;
};

// The precision of the backbone pass: the requested one, or for AUTO bf16
// when the CPU has native bf16 and the bf16 features of a few training
// images agree with fp32 ones (cosine similarity >= 0.99), fp32 otherwise.
absl::StatusOr<kennel::v1::Precision> ResolvePrecision(
    const PreparedSpec& prepared, JobContext& context);

// Computes (or reads from the cache) the backbone features of every image,
// emitting Progress events. Unreadable images are skipped and counted; the
// job fails when a split has more than the allowed share. CANCELLED when
// the job is cancelled between batches.
absl::StatusOr<Extraction> ExtractFeatures(const PreparedSpec& prepared,
                                           kennel::v1::Precision precision,
                                           const TrainerOptions& options,
                                           JobContext& context);

// Content digests of every image (train, valid, test), for the data set
// fingerprint when no feature pass computed them.
std::vector<std::string> ContentDigests(const Dataset& dataset);

// "cpu" or "cuda:0".
std::string DeviceName(const torch::Device& device);

// Exports backbone + head and, when the spec names a model, registers it
// with its labels, preprocessing, lineage and metrics. Returns the model
// ref ("name:version"), or "" when nothing was registered.
absl::StatusOr<std::string> ExportAndRegister(
    const PreparedSpec& prepared, const TrainerOptions& options,
    const torch::jit::Module& backbone, const HeadWeights& head,
    const kennel::v1::Hyperparameters& hyperparameters,
    const kennel::v1::ModelMetrics& metrics, kennel::v1::Precision precision,
    const std::string& dataset_fingerprint, JobContext& context, int trial = 0);

// The EpochEnd event for a finished epoch.
kennel::v1::JobEvent EpochEvent(const EpochStats& stats, double data_wait_share,
                                int trial = 0);

// Validates Train requests and runs them.
class TorchTrainerBackend : public TrainerBackend {
 public:
  explicit TorchTrainerBackend(TrainerOptions options);

  absl::StatusOr<JobFn> PrepareTrain(
      const kennel::v1::TrainRequest& request) override;
  // Defined in tuner.cc.
  absl::StatusOr<JobFn> PrepareTune(
      const kennel::v1::TuneRequest& request) override;

  const TrainerOptions& options() const { return options_; }

 private:
  const TrainerOptions options_;
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TRAIN_JOB_H_
