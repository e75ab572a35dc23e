// Where a training job's time went: data loading, forward, backward,
// optimiser, the backbone pass that filled the feature cache; images per
// second, CPU utilisation and peak memory; and findings in plain words
// ("data loading took 60% of the time"). Produces the ProfilerReport that
// closes every job. Not thread-safe: one per job, fed by its training loop.
#ifndef KENNEL_SERVICES_TRAINER_PROFILER_H_
#define KENNEL_SERVICES_TRAINER_PROFILER_H_

#include <cstdint>

#include "absl/time/time.h"
#include "kennel/v1/trainer.pb.h"

namespace kennel::trainer {

class Profiler {
 public:
  // `cores` is the number of compute threads the job may use; CPU
  // utilisation is process CPU time / wall time / cores.
  explicit Profiler(int cores);

  void AddData(double seconds) { data_ += seconds; }
  void AddForward(double seconds) { forward_ += seconds; }
  void AddBackward(double seconds) { backward_ += seconds; }
  void AddOptimizer(double seconds) { optimizer_ += seconds; }
  void AddFeature(double seconds) { feature_ += seconds; }
  // Images that went through a training step (all epochs).
  void AddImages(int64_t n) { images_ += n; }
  void SetCache(int64_t hits, int64_t misses) {
    cache_hits_ = hits;
    cache_misses_ = misses;
  }

  kennel::v1::ProfilerReport Report() const;

 private:
  const int cores_;
  const absl::Time start_wall_;
  const double start_cpu_;
  double data_ = 0, forward_ = 0, backward_ = 0, optimizer_ = 0, feature_ = 0;
  int64_t images_ = 0;
  int64_t cache_hits_ = 0, cache_misses_ = 0;
};

// Process CPU time (user + system) in seconds.
double ProcessCpuSeconds();
// Peak resident set size of the process in bytes.
int64_t PeakRssBytes();

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_PROFILER_H_
