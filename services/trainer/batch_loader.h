// Prepares batches of images on a pool of threads that runs ahead of the
// compute: while the model works on batch k, workers decode batches k+1 ...
// k+prefetch. What "preparing" an item means is the caller's function
// (decode + preprocess, decode + augment, or look the features up in the
// cache and decode only on a miss), so one loader serves fine-tuning,
// evaluation and feature extraction.
//
// Batches come out in order and each is built by one worker, so the result
// does not depend on thread timing. The consumer (Next) runs on one thread;
// the workers are internal. Destroying the loader stops the workers after
// the batches they are building.
#ifndef KENNEL_SERVICES_TRAINER_BATCH_LOADER_H_
#define KENNEL_SERVICES_TRAINER_BATCH_LOADER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kennel::trainer {

// What became of one item.
enum class ItemResult {
  kPixels,   // the item's tensor data was written to `out`
  kSkipped,  // nothing to compute (e.g. its features were cached)
  kBad,      // unreadable or corrupt; the caller records why
};

// Prepares item `item` (an index into the caller's list) into `out`
// (item_floats floats). Called concurrently from the workers for different
// items; must be thread-safe.
using PrepareFn = std::function<ItemResult(int64_t item, float* out)>;

struct LoadedBatch {
  int64_t index = 0;  // 0, 1, 2... in the order of `order`
  // Items whose pixels are in `pixels`, in order; pixels holds
  // pixel_items.size() * item_floats floats.
  std::vector<int64_t> pixel_items;
  std::vector<float> pixels;
  std::vector<int64_t> skipped_items;
  std::vector<int64_t> bad_items;
  // Worker time spent preparing this batch.
  double prepare_seconds = 0;
};

struct BatchLoaderOptions {
  int batch_size = 64;
  int64_t item_floats = 0;
  int workers = 2;
  // Batches prepared ahead of the consumer, at most.
  int prefetch = 4;
};

class BatchLoader {
 public:
  // `order` lists the items to load, in the order batches should contain
  // them.
  BatchLoader(std::vector<int64_t> order, BatchLoaderOptions options,
              PrepareFn prepare);
  ~BatchLoader();

  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // Blocks until the next batch is ready. False after the last batch.
  // `wait_seconds` (optional) receives how long the call blocked.
  bool Next(LoadedBatch* batch, double* wait_seconds = nullptr);

  int64_t num_batches() const { return num_batches_; }

 private:
  void Worker();

  const std::vector<int64_t> order_;
  const BatchLoaderOptions options_;
  const PrepareFn prepare_;
  const int64_t num_batches_;

  absl::Mutex mu_;
  int64_t next_to_build_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_to_return_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, LoadedBatch> ready_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_BATCH_LOADER_H_
