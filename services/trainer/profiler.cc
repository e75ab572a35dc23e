#include "services/trainer/profiler.h"

#include <sys/resource.h>

#include <algorithm>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace kennel::trainer {

double ProcessCpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec * 1e-6 +
         usage.ru_stime.tv_sec + usage.ru_stime.tv_usec * 1e-6;
}

int64_t PeakRssBytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux: kilobytes
}

Profiler::Profiler(int cores)
    : cores_(std::max(1, cores)),
      start_wall_(absl::Now()),
      start_cpu_(ProcessCpuSeconds()) {}

kennel::v1::ProfilerReport Profiler::Report() const {
  kennel::v1::ProfilerReport report;
  const double wall = absl::ToDoubleSeconds(absl::Now() - start_wall_);
  const double cpu = ProcessCpuSeconds() - start_cpu_;
  report.set_data_seconds(data_);
  report.set_forward_seconds(forward_);
  report.set_backward_seconds(backward_);
  report.set_optimizer_seconds(optimizer_);
  report.set_feature_seconds(feature_);
  report.set_total_seconds(wall);
  const double train_seconds = data_ + forward_ + backward_ + optimizer_;
  report.set_images_per_second(train_seconds > 0 ? images_ / train_seconds : 0);
  report.set_cpu_utilization(wall > 0 ? cpu / wall / cores_ : 0);
  report.set_peak_rss_bytes(PeakRssBytes());
  report.set_feature_cache_hits(cache_hits_);
  report.set_feature_cache_misses(cache_misses_);

  auto share = [&](double part) { return wall > 0 ? part / wall : 0.0; };
  auto finding = [&](const std::string& text) { report.add_findings(text); };
  if (share(data_) > 0.3) {
    finding(absl::StrFormat(
        "waiting for data took %.0f%% of the time: the model was starved; "
        "give the trainer more --threads or smaller images",
        100 * share(data_)));
  }
  if (share(feature_) > 0.5) {
    finding(absl::StrFormat(
        "the backbone pass took %.0f%% of the time; later jobs and tuning "
        "trials on the same data and backbone reuse its cached features",
        100 * share(feature_)));
  }
  if (cache_hits_ + cache_misses_ > 0) {
    finding(absl::StrFormat(
        "feature cache: %d hit(s), %d miss(es) (%.0f%% reused)", cache_hits_,
        cache_misses_,
        100.0 * cache_hits_ / double(cache_hits_ + cache_misses_)));
  }
  if (wall > 1 && cpu / wall / cores_ < 0.5) {
    finding(absl::StrFormat(
        "CPU utilisation was %.0f%% of %d core(s): the job spent much of its "
        "time idle or in a single thread",
        100 * cpu / wall / cores_, cores_));
  }
  if (train_seconds > 0 && backward_ > 0 && optimizer_ > backward_) {
    finding("the optimiser step took longer than the backward pass");
  }
  if (report.findings_size() == 0) {
    finding("no bottleneck stood out");
  }
  return report;
}

}  // namespace kennel::trainer
