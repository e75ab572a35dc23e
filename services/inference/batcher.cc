#include "services/inference/batcher.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"

namespace kennel::inference {

Batcher::Batcher(Options options, InferenceMetrics* metrics)
    : options_(std::move(options)), metrics_(metrics) {
  worker_ = std::thread([this] { WorkerLoop(); });
}

Batcher::~Batcher() { Shutdown(); }

absl::Status Batcher::Submit(BatchItem item, Arrival* arrival) {
  if (item.model == nullptr || item.model->model == nullptr) {
    return absl::InternalError("batch item without a model");
  }
  absl::MutexLock lock(&mu_);
  if (arrival != nullptr && !arrival->ended_) {
    arrival->ended_ = true;
    --arriving_;
  }
  if (stopping_) {
    return absl::UnavailableError("the server is shutting down");
  }
  if (static_cast<int>(queue_.size()) >= options_.max_queue) {
    if (metrics_ != nullptr) metrics_->rejected_queue_full.Increment();
    return absl::ResourceExhaustedError(
        absl::StrCat("the inference queue is full (", queue_.size(),
                     " requests waiting, --max-queue=", options_.max_queue,
                     "); retry with backoff"));
  }
  item.enqueued = absl::Now();
  queue_.push_back(std::move(item));
  if (metrics_ != nullptr) metrics_->queue_depth.Set(queue_.size());
  return absl::OkStatus();
}

absl::StatusOr<BatchOutput> Batcher::Run(
    std::shared_ptr<const LoadedModel> model, std::vector<float> input,
    absl::Time deadline, Arrival* arrival) {
  absl::Notification finished;
  absl::StatusOr<BatchOutput> result;
  BatchItem item;
  item.model = std::move(model);
  item.input = std::move(input);
  item.deadline = deadline;
  item.done = [&](absl::StatusOr<BatchOutput> output) {
    result = std::move(output);
    finished.Notify();
  };
  if (absl::Status s = Submit(std::move(item), arrival); !s.ok()) return s;
  finished.WaitForNotification();
  return result;
}

void Batcher::Shutdown() {
  absl::MutexLock shutdown_lock(&shutdown_mu_);
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (worker_.joinable()) worker_.join();
}

Batcher::Arrival::Arrival(Batcher* batcher) : batcher_(batcher) {
  absl::MutexLock lock(&batcher_->mu_);
  ++batcher_->arriving_;
}

Batcher::Arrival::~Arrival() {
  absl::MutexLock lock(&batcher_->mu_);
  if (!ended_) --batcher_->arriving_;
}

int Batcher::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

int Batcher::BatchCapLocked() const {
  if (queue_.empty()) return options_.max_batch_size;
  const int model_cap = queue_.front().model->max_batch_size;
  return model_cap > 0 ? std::min(model_cap, options_.max_batch_size)
                       : options_.max_batch_size;
}

int Batcher::BatchableLocked() const {
  if (queue_.empty()) return 0;
  const LoadedModel* model = queue_.front().model.get();
  const int cap = BatchCapLocked();
  int n = 0;
  for (const BatchItem& item : queue_) {
    if (n >= cap || item.model.get() != model) break;
    ++n;
  }
  return n;
}

void Batcher::WorkerLoop() {
  if (options_.on_worker_start) options_.on_worker_start();
  while (true) {
    std::vector<BatchItem> batch;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Batcher* b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(b->mu_) {
            return !b->queue_.empty() || b->stopping_;
          },
          this));
      if (queue_.empty()) return;  // stopping, and everything has run
      // Wait for a full batch, but not beyond the oldest request's delay.
      // While stopping, run what is queued without waiting.
      const absl::Time flush_at =
          queue_.front().enqueued + options_.max_queue_delay;
      mu_.AwaitWithDeadline(
          absl::Condition(
              +[](Batcher* b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(b->mu_) {
                // Nothing is on its way (no request between its first
                // check and Submit): waiting could not grow the batch.
                return b->stopping_ || b->arriving_ == 0 ||
                       b->BatchableLocked() >= b->BatchCapLocked();
              },
              this),
          flush_at);
      const int n = BatchableLocked();
      batch.reserve(n);
      for (int i = 0; i < n; ++i) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      if (metrics_ != nullptr) metrics_->queue_depth.Set(queue_.size());
    }
    RunBatch(std::move(batch));
  }
}

void Batcher::RunBatch(std::vector<BatchItem> batch) {
  const absl::Time start = absl::Now();
  // A request whose deadline has passed is answered without spending the
  // model on it; its client has given up.
  std::vector<BatchItem> live;
  live.reserve(batch.size());
  for (BatchItem& item : batch) {
    if (item.deadline <= start) {
      if (metrics_ != nullptr) metrics_->rejected_deadline.Increment();
      item.done(absl::DeadlineExceededError(
          "the deadline passed while the request waited for the model"));
    } else {
      live.push_back(std::move(item));
    }
  }
  if (live.empty()) return;

  const LoadedModel& model = *live.front().model;
  const int size = model.preprocessing.input_size();
  const size_t per_image = static_cast<size_t>(3) * size * size;
  const int n = static_cast<int>(live.size());
  absl::StatusOr<std::vector<float>> logits;
  bool shapes_ok = true;
  for (const BatchItem& item : live) {
    shapes_ok = shapes_ok && item.input.size() == per_image;
  }
  if (!shapes_ok) {
    logits = absl::InternalError("batch input has the wrong size");
  } else if (n == 1) {
    logits = model.model->Forward(live[0].input.data(), 1, size);
  } else {
    std::vector<float> input(per_image * n);
    for (int i = 0; i < n; ++i) {
      std::memcpy(input.data() + per_image * i, live[i].input.data(),
                  per_image * sizeof(float));
    }
    logits = model.model->Forward(input.data(), n, size);
  }
  const absl::Time end = absl::Now();
  if (metrics_ != nullptr) {
    metrics_->batch_size.Observe(n);
    metrics_->model_seconds.Observe(absl::ToDoubleSeconds(end - start));
  }
  if (logits.ok() && (logits->empty() || logits->size() % n != 0)) {
    logits = absl::InternalError(absl::StrCat(
        "the model returned ", logits->size(), " values for ", n, " images"));
  }
  if (!logits.ok()) {
    LOG(ERROR) << "forward pass of " << model.name << ":" << model.version
               << " failed: " << logits.status();
    const absl::Status error = absl::InternalError(absl::StrCat(
        "the model failed on this batch: ", logits.status().message()));
    for (BatchItem& item : live) item.done(error);
    return;
  }
  const size_t classes = logits->size() / n;
  for (int i = 0; i < n; ++i) {
    BatchOutput out;
    out.logits.assign(logits->begin() + classes * i,
                      logits->begin() + classes * (i + 1));
    out.batch_size = n;
    out.queue_time = start - live[i].enqueued;
    out.model_time = end - start;
    if (metrics_ != nullptr) {
      metrics_->queue_seconds.Observe(absl::ToDoubleSeconds(out.queue_time));
    }
    live[i].done(std::move(out));
  }
}

}  // namespace kennel::inference
