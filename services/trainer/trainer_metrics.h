// The trainer's Prometheus metrics, named as in the deployment contract
// (dashboards and alerts use exactly these names):
//
//   kennel_trainer_jobs_total{kind,state}         counter, at job end
//   kennel_trainer_jobs_running                    gauge
//   kennel_trainer_epoch{job}                      gauge
//   kennel_trainer_train_loss{job,trial}           gauge
//   kennel_trainer_valid_loss{job,trial}           gauge
//   kennel_trainer_valid_accuracy{job,trial}       gauge
//   kennel_trainer_images_per_second{job}          gauge
//   kennel_trainer_data_wait_share{job}            gauge
//   kennel_trainer_feature_cache_hits_total        counter
//   kennel_trainer_feature_cache_misses_total      counter
//   kennel_tune_trials_total{job,state}            counter
//   kennel_tune_best_objective{job}                gauge
//   kennel_tune_trial_objective{job,trial}         gauge
//
// Series labelled by job are kept for the 20 most recent jobs only, so a
// long-lived trainer does not grow without bound. Epoch gauges follow the
// job's events (as a JobObserver); tuning code reports its trials through
// the Tune* methods. Thread-safe.
#ifndef KENNEL_SERVICES_TRAINER_TRAINER_METRICS_H_
#define KENNEL_SERVICES_TRAINER_TRAINER_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include <deque>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "services/trainer/job_manager.h"

namespace kennel::trainer {

class TrainerMetrics : public JobObserver {
 public:
  static constexpr int kJobsKept = 20;

  explicit TrainerMetrics(prometheus::Registry& registry);

  void JobStarted(const kennel::v1::Job& job) override;
  void JobFinished(const kennel::v1::Job& job) override;
  void JobEvent(const kennel::v1::Job& job,
                const kennel::v1::JobEvent& event) override;

  void AddFeatureCacheHits(int64_t n);
  void AddFeatureCacheMisses(int64_t n);

  // For tuning jobs. `state` is "succeeded", "failed" or "stopped".
  void TuneTrialFinished(const std::string& job, const std::string& state);
  void TuneBestObjective(const std::string& job, double value);
  void TuneTrialObjective(const std::string& job, int trial, double value);

 private:
  // Remembers that `job` has series in `family`, so they can be removed
  // when the job falls out of the most recent kJobsKept.
  template <typename T>
  T& JobSeries(prometheus::Family<T>& family, const std::string& job,
               std::map<std::string, std::string> labels)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TouchJob(const std::string& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  prometheus::Family<prometheus::Counter>& jobs_total_;
  prometheus::Family<prometheus::Gauge>& jobs_running_family_;
  prometheus::Gauge& jobs_running_;
  prometheus::Family<prometheus::Gauge>& epoch_;
  prometheus::Family<prometheus::Gauge>& train_loss_;
  prometheus::Family<prometheus::Gauge>& valid_loss_;
  prometheus::Family<prometheus::Gauge>& valid_accuracy_;
  prometheus::Family<prometheus::Gauge>& images_per_second_;
  prometheus::Family<prometheus::Gauge>& data_wait_share_;
  prometheus::Family<prometheus::Counter>& cache_hits_family_;
  prometheus::Counter& cache_hits_;
  prometheus::Family<prometheus::Counter>& cache_misses_family_;
  prometheus::Counter& cache_misses_;
  prometheus::Family<prometheus::Counter>& tune_trials_;
  prometheus::Family<prometheus::Gauge>& tune_best_;
  prometheus::Family<prometheus::Gauge>& tune_trial_objective_;

  absl::Mutex mu_;
  // Oldest first.
  std::deque<std::string> recent_jobs_ ABSL_GUARDED_BY(mu_);
  // job -> removers of its series
  std::map<std::string, std::vector<std::function<void()>>> job_series_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TRAINER_METRICS_H_
