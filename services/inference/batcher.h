// Dynamic batching: requests that arrive close together share one forward
// pass. Request threads decode and preprocess in parallel, then Submit; one
// dedicated worker forms batches (up to max_batch_size images, waiting at
// most max_queue_delay after the oldest arrived) and runs the model. Only
// requests on the same model version share a batch, so a swap never moves a
// request to another version.
#ifndef KENNEL_SERVICES_INFERENCE_BATCHER_H_
#define KENNEL_SERVICES_INFERENCE_BATCHER_H_

#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "services/inference/inference_metrics.h"
#include "services/inference/model.h"

namespace kennel::inference {

// What the worker hands back for one request.
struct BatchOutput {
  // This request's row of logits (the model's class count).
  std::vector<float> logits;
  int batch_size = 0;
  absl::Duration queue_time;
  absl::Duration model_time;
};

struct BatchItem {
  std::shared_ptr<const LoadedModel> model;
  // TensorSize(model->preprocessing) floats.
  std::vector<float> input;
  // Dropped with DEADLINE_EXCEEDED if still queued when this passes.
  absl::Time deadline = absl::InfiniteFuture();
  // Called exactly once, on the worker thread, when the request is done or
  // dropped; it must not block (hand the result to another thread).
  std::function<void(absl::StatusOr<BatchOutput>)> done;
  // Set by Submit.
  absl::Time enqueued;
};

// Thread-safe.
class Batcher {
 public:
  struct Options {
    int max_batch_size = 8;
    absl::Duration max_queue_delay = absl::Milliseconds(2);
    // Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    int max_queue = 64;
    // Runs first on the worker thread (LibTorch per-thread set-up).
    std::function<void()> on_worker_start;
  };

  // `metrics` may be null (tests).
  Batcher(Options options, InferenceMetrics* metrics);
  // Shuts down (see Shutdown).
  ~Batcher();

  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  class Arrival;

  // Queues a request. On RESOURCE_EXHAUSTED (queue full) or UNAVAILABLE
  // (shutting down) `done` is not called and the caller answers. The
  // request's Arrival, if any, ends here (in the same step as the request
  // joins the queue).
  absl::Status Submit(BatchItem item, Arrival* arrival = nullptr);

  // Submit and wait for the answer.
  absl::StatusOr<BatchOutput> Run(std::shared_ptr<const LoadedModel> model,
                                  std::vector<float> input, absl::Time deadline,
                                  Arrival* arrival = nullptr);

  // Announces a request that is being checked and decoded and will be
  // submitted (or fail) before the Arrival ends. The worker waits up to
  // max_queue_delay for more requests only while some are announced; with
  // none on the way it runs the batch it has at once, so a lone request
  // never waits for company.
  class Arrival {
   public:
    explicit Arrival(Batcher* batcher);
    ~Arrival();
    Arrival(const Arrival&) = delete;
    Arrival& operator=(const Arrival&) = delete;

   private:
    friend class Batcher;
    Batcher* const batcher_;
    // Set under the batcher's mutex when Submit ends the arrival.
    bool ended_ = false;
  };

  // Stops accepting, runs everything already queued, and joins the worker.
  // Idempotent.
  void Shutdown();

  int queue_depth() const;

 private:
  void WorkerLoop();
  // Largest batch for the model at the head of the queue.
  int BatchCapLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Requests at the head of the queue that can share a batch with the first.
  int BatchableLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunBatch(std::vector<BatchItem> batch);

  // Constant after construction.
  const Options options_;
  InferenceMetrics* const metrics_;

  mutable absl::Mutex mu_;
  std::deque<BatchItem> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Live Arrival objects.
  int arriving_ ABSL_GUARDED_BY(mu_) = 0;

  absl::Mutex shutdown_mu_;
  std::thread worker_;
};

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_BATCHER_H_
