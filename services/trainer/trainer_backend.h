// The seam between the gRPC edge (trainer_service, no LibTorch) and the code
// that trains (LibTorch). A backend validates a request completely before a
// job exists, so a bad request is refused with INVALID_ARGUMENT and leaves
// no job behind, and hands back the function the job manager runs.
#ifndef KENNEL_SERVICES_TRAINER_TRAINER_BACKEND_H_
#define KENNEL_SERVICES_TRAINER_TRAINER_BACKEND_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/storage/object_store.h"
#include "kennel/v1/registry.pb.h"
#include "kennel/v1/trainer.pb.h"
#include "services/trainer/job_manager.h"

namespace kennel::trainer {

class ModelPublisher;
class TrainerMetrics;

// Set once at start-up from the server's flags.
struct TrainerOptions {
  // Local data and backbones must lie under this folder.
  std::string data_root;
  // Holds features/ (the feature cache) and models/ (exported classifiers).
  std::string cache_dir;
  // "auto", "cpu" or "cuda": the default for jobs that do not say.
  std::string device = "auto";
  // Compute threads (the LibTorch intra-op count) and decode workers per
  // job.
  int threads = 2;
  // Where models are registered; null refuses jobs that ask to register.
  ModelPublisher* publisher = nullptr;
  // May be null.
  TrainerMetrics* metrics = nullptr;
  // For s3:// data sets and backbones (endpoint, region, credentials from
  // the usual AWS_* variables).
  storage::S3Settings s3;
};

class TrainerBackend {
 public:
  virtual ~TrainerBackend() = default;

  // Checks the data set, backbone, hyperparameters, rules and registration
  // target. Thread-safe.
  virtual absl::StatusOr<JobFn> PrepareTrain(
      const kennel::v1::TrainRequest& request) = 0;

  // The same for a hyperparameter search.
  virtual absl::StatusOr<JobFn> PrepareTune(
      const kennel::v1::TuneRequest& request) {
    return absl::UnimplementedError(
        "hyperparameter tuning is not available in this kennel-trainer "
        "build; run Train jobs with chosen hyperparameters instead");
  }
};

// Where finished models go. Thread-safe.
class ModelPublisher {
 public:
  virtual ~ModelPublisher() = default;
  // Pushes the files as one new version; `header.components[i]` describes
  // `paths[i]` (digest and size may be left empty).
  virtual absl::StatusOr<kennel::v1::ModelVersion> Publish(
      const kennel::v1::PushHeader& header,
      const std::vector<std::string>& paths) = 0;
  // "registry at HOST:PORT", for messages.
  virtual std::string Describe() const = 0;
};

// The LibTorch backend (train_job.cc).
std::unique_ptr<TrainerBackend> NewTorchTrainerBackend(TrainerOptions options);

// Sets LibTorch's intra-op thread count for the process. Called once, by
// main, before any job runs.
void SetComputeThreads(int threads);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TRAINER_BACKEND_H_
