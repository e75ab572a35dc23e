// Decides which model version serves. A candidate (a file plus its
// manifest) is verified against its digest, opened, checked (output width
// against the labels, finite outputs), converted to bf16 when allowed and
// when its answers agree with fp32, warmed up, and only then published in
// one atomic pointer swap. A candidate that fails any step is never
// published: the previous version keeps serving, and the failure is logged,
// counted and reported in the status.
#ifndef KENNEL_SERVICES_INFERENCE_MODEL_MANAGER_H_
#define KENNEL_SERVICES_INFERENCE_MODEL_MANAGER_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kennel/v1/common.pb.h"
#include "services/inference/inference_metrics.h"
#include "services/inference/model.h"

namespace kennel::inference {

// A version to load: where its file is and what its manifest says.
struct ModelCandidate {
  // What the server follows ("dogbreed@production" or a file path).
  std::string source;
  std::string name;
  int64_t version = 0;
  // Expected "sha256:<hex>" of the file; empty to accept any (the digest is
  // then computed and reported).
  std::string digest;
  std::string path;
  // Empty: take the file's `labels` attribute.
  std::vector<std::string> labels;
  // Unset: take the file's `kennel_preprocessing` attribute, else ImageNet's.
  std::optional<kennel::v1::Preprocessing> preprocessing;
  // What the manifest says the trainer validated; PRECISION_AUTO when
  // unknown.
  kennel::v1::Precision manifest_precision = kennel::v1::PRECISION_AUTO;
  std::vector<std::string> aliases;
};

struct ManagerOptions {
  // fp32: always fp32. bf16: bf16 where the CPU supports it and the warm-up
  // answers agree. auto: as bf16, unless the manifest says fp32.
  kennel::v1::Precision precision = kennel::v1::PRECISION_AUTO;
  // Share of warm-up images whose top-1 class must match fp32 for bf16.
  double bf16_min_agreement = 0.9;
  // Encoded images for the warm-up and the bf16 check; synthetic pictures
  // when empty.
  std::vector<std::string> warmup_images;
  int synthetic_warmup_images = 8;
  // Batch sizes the warm-up runs, so the first requests do not pay for
  // kernel selection; the batcher's maximum belongs here.
  std::vector<int> warmup_batch_sizes = {1, 8};
  // Instead: warm up and time every power of two up to max_batch_size, and
  // cap this model's batches at the fastest per image
  // (LoadedModel::max_batch_size).
  bool tune_batch_size = false;
  int max_batch_size = 8;
};

// What GetModelStatus reports, without the gRPC types.
struct ManagerStatus {
  std::shared_ptr<const LoadedModel> current;
  std::string last_error;
  int64_t last_failed_version = 0;
  // Why the source has offered nothing to load, when it knows (the
  // registry has no such model, or cannot be reached); empty otherwise.
  std::string waiting_for;
};

// Thread-safe. Load calls are serialised; Current() never waits for a load.
class ModelManager {
 public:
  // `loader` must outlive the manager; `metrics` may be null.
  ModelManager(ModelLoader* loader, ManagerOptions options,
               InferenceMetrics* metrics);

  // Runs every step and publishes the candidate, or returns why it did not.
  absl::Status Load(const ModelCandidate& candidate);

  // The serving version, or null before the first successful load.
  std::shared_ptr<const LoadedModel> Current() const;

  // Records a failure that happened before Load could run (a download).
  void RecordFailure(const ModelCandidate& candidate,
                     const absl::Status& status);

  ManagerStatus Status() const;

  // What the source is waiting for (empty once it has a candidate).
  void SetWaitingFor(std::string reason);

  // Called after every successful publish, outside the lock.
  void SetOnPublished(std::function<void(const LoadedModel&)> callback);

 private:
  absl::StatusOr<std::shared_ptr<LoadedModel>> Prepare(
      const ModelCandidate& candidate);
  absl::StatusOr<std::vector<float>> WarmupInputs(
      const kennel::v1::Preprocessing& spec, int* count) const;
  void Publish(std::shared_ptr<const LoadedModel> model);

  // Constant after construction.
  ModelLoader* const loader_;
  const ManagerOptions options_;
  InferenceMetrics* const metrics_;

  // Serialises Load calls, so two versions never load at once (memory).
  absl::Mutex load_mu_;

  mutable absl::Mutex mu_;
  std::shared_ptr<const LoadedModel> current_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  int64_t last_failed_version_ ABSL_GUARDED_BY(mu_) = 0;
  std::string waiting_for_ ABSL_GUARDED_BY(mu_);
  std::function<void(const LoadedModel&)> on_published_ ABSL_GUARDED_BY(mu_);
};

// "fp32" or "bf16", as metrics and logs show it.
std::string PrecisionLabel(kennel::v1::Precision precision);

// Index of the largest value in each row of a [rows x cols] matrix.
std::vector<int> ArgmaxRows(const std::vector<float>& values, int rows);

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_MODEL_MANAGER_H_
