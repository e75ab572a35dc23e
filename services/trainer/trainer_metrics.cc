#include "services/trainer/trainer_metrics.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace kennel::trainer {
namespace {

std::string KindName(kennel::v1::JobKind kind) {
  return kind == kennel::v1::JOB_KIND_TUNE ? "tune" : "train";
}

std::string StateName(kennel::v1::JobState state) {
  switch (state) {
    case kennel::v1::JOB_STATE_SUCCEEDED:
      return "succeeded";
    case kennel::v1::JOB_STATE_FAILED:
      return "failed";
    case kennel::v1::JOB_STATE_CANCELLED:
      return "cancelled";
    default:
      return "other";
  }
}

}  // namespace

TrainerMetrics::TrainerMetrics(prometheus::Registry& registry)
    : jobs_total_(prometheus::BuildCounter()
                      .Name("kennel_trainer_jobs_total")
                      .Help("Jobs that ended, by kind and final state.")
                      .Register(registry)),
      jobs_running_family_(prometheus::BuildGauge()
                               .Name("kennel_trainer_jobs_running")
                               .Help("Jobs running now.")
                               .Register(registry)),
      jobs_running_(jobs_running_family_.Add({})),
      epoch_(prometheus::BuildGauge()
                 .Name("kennel_trainer_epoch")
                 .Help("Last finished epoch of a job.")
                 .Register(registry)),
      train_loss_(prometheus::BuildGauge()
                      .Name("kennel_trainer_train_loss")
                      .Help("Per-sample mean cross-entropy on the training "
                            "split in the last epoch.")
                      .Register(registry)),
      valid_loss_(prometheus::BuildGauge()
                      .Name("kennel_trainer_valid_loss")
                      .Help("Per-sample mean cross-entropy on the validation "
                            "split after the last epoch.")
                      .Register(registry)),
      valid_accuracy_(prometheus::BuildGauge()
                          .Name("kennel_trainer_valid_accuracy")
                          .Help("Top-1 accuracy on the validation split after "
                                "the last epoch.")
                          .Register(registry)),
      images_per_second_(prometheus::BuildGauge()
                             .Name("kennel_trainer_images_per_second")
                             .Help("Training images per second in the last "
                                   "epoch.")
                             .Register(registry)),
      data_wait_share_(prometheus::BuildGauge()
                           .Name("kennel_trainer_data_wait_share")
                           .Help("Share of the last epoch spent waiting for "
                                 "data, 0 to 1.")
                           .Register(registry)),
      cache_hits_family_(prometheus::BuildCounter()
                             .Name("kennel_trainer_feature_cache_hits_total")
                             .Help("Backbone features read from the cache.")
                             .Register(registry)),
      cache_hits_(cache_hits_family_.Add({})),
      cache_misses_family_(
          prometheus::BuildCounter()
              .Name("kennel_trainer_feature_cache_misses_total")
              .Help("Backbone features computed because they were not "
                    "cached.")
              .Register(registry)),
      cache_misses_(cache_misses_family_.Add({})),
      tune_trials_(prometheus::BuildCounter()
                       .Name("kennel_tune_trials_total")
                       .Help("Tuning trials that ended, by job and state.")
                       .Register(registry)),
      tune_best_(prometheus::BuildGauge()
                     .Name("kennel_tune_best_objective")
                     .Help("Best objective a tuning job has reached.")
                     .Register(registry)),
      tune_trial_objective_(prometheus::BuildGauge()
                                .Name("kennel_tune_trial_objective")
                                .Help("Objective of each tuning trial.")
                                .Register(registry)) {}

void TrainerMetrics::TouchJob(const std::string& job) {
  if (std::find(recent_jobs_.begin(), recent_jobs_.end(), job) !=
      recent_jobs_.end()) {
    return;
  }
  recent_jobs_.push_back(job);
  while (recent_jobs_.size() > kJobsKept) {
    const std::string old = recent_jobs_.front();
    recent_jobs_.pop_front();
    auto it = job_series_.find(old);
    if (it == job_series_.end()) continue;
    for (auto& remove : it->second) remove();
    job_series_.erase(it);
  }
}

template <typename T>
T& TrainerMetrics::JobSeries(prometheus::Family<T>& family,
                             const std::string& job,
                             std::map<std::string, std::string> labels) {
  TouchJob(job);
  labels["job"] = job;
  const bool existed = family.Has(labels);
  T& series = family.Add(labels);
  if (!existed) {
    T* pointer = &series;
    job_series_[job].push_back([&family, pointer] { family.Remove(pointer); });
  }
  return series;
}

void TrainerMetrics::JobStarted(const kennel::v1::Job& job) {
  jobs_running_.Increment();
}

void TrainerMetrics::JobFinished(const kennel::v1::Job& job) {
  // A job cancelled while queued never ran.
  if (job.has_started_at()) jobs_running_.Decrement();
  jobs_total_
      .Add({{"kind", KindName(job.kind())}, {"state", StateName(job.state())}})
      .Increment();
}

void TrainerMetrics::JobEvent(const kennel::v1::Job& job,
                              const kennel::v1::JobEvent& event) {
  if (!event.has_epoch()) return;
  const kennel::v1::EpochEnd& epoch = event.epoch();
  const std::string trial = absl::StrCat(event.trial());
  absl::MutexLock lock(&mu_);
  JobSeries(epoch_, job.id(), {}).Set(epoch.epoch());
  JobSeries(train_loss_, job.id(), {{"trial", trial}}).Set(epoch.train_loss());
  JobSeries(valid_loss_, job.id(), {{"trial", trial}}).Set(epoch.valid_loss());
  JobSeries(valid_accuracy_, job.id(), {{"trial", trial}})
      .Set(epoch.valid_accuracy());
  JobSeries(images_per_second_, job.id(), {}).Set(epoch.images_per_second());
  JobSeries(data_wait_share_, job.id(), {}).Set(epoch.data_wait_share());
}

void TrainerMetrics::AddFeatureCacheHits(int64_t n) {
  if (n > 0) cache_hits_.Increment(static_cast<double>(n));
}

void TrainerMetrics::AddFeatureCacheMisses(int64_t n) {
  if (n > 0) cache_misses_.Increment(static_cast<double>(n));
}

void TrainerMetrics::TuneTrialFinished(const std::string& job,
                                       const std::string& state) {
  absl::MutexLock lock(&mu_);
  JobSeries(tune_trials_, job, {{"state", state}}).Increment();
}

void TrainerMetrics::TuneBestObjective(const std::string& job, double value) {
  absl::MutexLock lock(&mu_);
  JobSeries(tune_best_, job, {}).Set(value);
}

void TrainerMetrics::TuneTrialObjective(const std::string& job, int trial,
                                        double value) {
  absl::MutexLock lock(&mu_);
  JobSeries(tune_trial_objective_, job, {{"trial", absl::StrCat(trial)}})
      .Set(value);
}

}  // namespace kennel::trainer
