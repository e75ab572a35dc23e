#include "services/trainer/batch_loader.h"

#include <algorithm>
#include <chrono>

namespace kennel::trainer {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

BatchLoader::BatchLoader(std::vector<int64_t> order, BatchLoaderOptions options,
                         PrepareFn prepare)
    : order_(std::move(order)),
      options_(options),
      prepare_(std::move(prepare)),
      num_batches_((static_cast<int64_t>(order_.size()) +
                    std::max(1, options.batch_size) - 1) /
                   std::max(1, options.batch_size)) {
  const int workers = std::max(1, options_.workers);
  for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { Worker(); });
}

BatchLoader::~BatchLoader() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

void BatchLoader::Worker() {
  const int prefetch = std::max(1, options_.prefetch);
  const int64_t batch_size = std::max(1, options_.batch_size);
  while (true) {
    int64_t index;
    {
      absl::MutexLock lock(&mu_);
      // Work only within the prefetch window, so memory stays bounded when
      // the consumer is slower than the workers.
      auto can_build = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || next_to_build_ >= num_batches_ ||
               next_to_build_ < next_to_return_ + prefetch;
      };
      mu_.Await(absl::Condition(&can_build));
      if (stopping_ || next_to_build_ >= num_batches_) return;
      index = next_to_build_++;
    }
    const auto start = Clock::now();
    LoadedBatch batch;
    batch.index = index;
    const int64_t begin = index * batch_size;
    const int64_t end = std::min<int64_t>(static_cast<int64_t>(order_.size()),
                                          begin + batch_size);
    batch.pixels.resize(static_cast<size_t>(end - begin) *
                        options_.item_floats);
    int64_t filled = 0;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t item = order_[i];
      float* out = batch.pixels.data() + filled * options_.item_floats;
      switch (prepare_(item, out)) {
        case ItemResult::kPixels:
          batch.pixel_items.push_back(item);
          ++filled;
          break;
        case ItemResult::kSkipped:
          batch.skipped_items.push_back(item);
          break;
        case ItemResult::kBad:
          batch.bad_items.push_back(item);
          break;
      }
    }
    batch.pixels.resize(static_cast<size_t>(filled) * options_.item_floats);
    batch.prepare_seconds =
        std::chrono::duration<double>(Clock::now() - start).count();
    absl::MutexLock lock(&mu_);
    ready_.emplace(index, std::move(batch));
  }
}

bool BatchLoader::Next(LoadedBatch* batch, double* wait_seconds) {
  const auto start = Clock::now();
  absl::MutexLock lock(&mu_);
  if (next_to_return_ >= num_batches_) {
    if (wait_seconds) *wait_seconds = 0;
    return false;
  }
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return ready_.count(next_to_return_) > 0;
  };
  mu_.Await(absl::Condition(&ready));
  auto it = ready_.find(next_to_return_);
  *batch = std::move(it->second);
  ready_.erase(it);
  ++next_to_return_;
  if (wait_seconds) {
    *wait_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  }
  return true;
}

}  // namespace kennel::trainer
