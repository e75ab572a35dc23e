#include "services/trainer/tuner.h"

#include <ATen/Parallel.h>
#include <torch/script.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "services/trainer/finetune.h"
#include "services/trainer/head_trainer.h"
#include "services/trainer/profiler.h"
#include "services/trainer/rules.h"
#include "services/trainer/search_space.h"
#include "services/trainer/trainer_metrics.h"
#include "services/trainer/tune_scheduler.h"

namespace kennel::trainer {
namespace {

using Clock = std::chrono::steady_clock;
using kennel::v1::JobEvent;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Trials run on the scheduler's threads. OpenMP's thread count is a
// per-thread setting, so each trial thread gets its share of the trainer's
// budget without touching the process-wide count main set: W trials of
// `threads` each keep the cores busy without oversubscribing them.
void UseTrialThreads(int threads) {
  (void)at::get_num_threads();  // ATen's per-thread initialisation first
#ifdef _OPENMP
  omp_set_num_threads(std::max(1, threads));
#endif
}

// Time spent in the trials' training steps, summed over trials for the
// profiler report (the Profiler itself is single-threaded).
struct StepTimes {
  absl::Mutex mu;
  double forward ABSL_GUARDED_BY(mu) = 0;
  double backward ABSL_GUARDED_BY(mu) = 0;
  double optimizer ABSL_GUARDED_BY(mu) = 0;
  double data ABSL_GUARDED_BY(mu) = 0;
  int64_t images ABSL_GUARDED_BY(mu) = 0;

  void Add(const EpochStats& stats, int64_t images_in_epoch,
           double data_seconds) {
    absl::MutexLock lock(&mu);
    forward += stats.forward_seconds;
    backward += stats.backward_seconds;
    optimizer += stats.optimizer_seconds;
    data += data_seconds;
    images += images_in_epoch;
  }
  void Into(Profiler& profiler) {
    absl::MutexLock lock(&mu);
    profiler.AddForward(forward);
    profiler.AddBackward(backward);
    profiler.AddOptimizer(optimizer);
    profiler.AddData(data);
    profiler.AddImages(images);
  }
};

// Head mode: every trial trains a head on the shared, read-only features.
class HeadTrialRunner : public TrialRunner {
 public:
  HeadTrialRunner(const HeadTrainer& trainer, const RuleSet& rules,
                  JobContext& context, int threads_per_trial, StepTimes& times)
      : trainer_(trainer),
        rules_(rules),
        context_(context),
        threads_per_trial_(threads_per_trial),
        times_(times) {}

  absl::StatusOr<TrialOutcome> RunTrial(int trial,
                                        const kennel::v1::Hyperparameters& hp,
                                        const EpochFn& on_epoch) override {
    UseTrialThreads(threads_per_trial_);
    RuleSet rules = rules_;
    std::string rule_stop;
    const int64_t images = trainer_.data().train.size();
    auto callback = [&](const EpochStats& stats) {
      times_.Add(stats, images, 0);
      const bool keep_going = on_epoch(EpochEvent(stats, 0.0, trial).epoch());
      rule_stop = ObserveRules(rules, stats, 0.0, context_, trial);
      return keep_going && rule_stop.empty() ? EpochDecision::kContinue
                                             : EpochDecision::kStop;
    };
    absl::StatusOr<HeadRunResult> run;
    try {
      run = trainer_.Train(HeadConfigFrom(hp), callback,
                           [this] { return context_.cancelled(); });
    } catch (const std::exception& e) {
      return absl::InternalError(
          absl::StrCat("training trial ", trial, ": ", e.what()));
    }
    if (!run.ok()) return run.status();
    if (run->cancelled) {
      return absl::CancelledError(
          absl::StrCat("cancelled after ", run->epochs.size(), " epoch(s)"));
    }
    {
      absl::MutexLock lock(&mu_);
      weights_[trial] = run->weights;
    }
    TrialOutcome outcome;
    outcome.stop_reason = rule_stop;
    return outcome;
  }

  void Discard(int trial) override {
    absl::MutexLock lock(&mu_);
    weights_.erase(trial);
  }

  std::optional<HeadWeights> Weights(int trial) {
    absl::MutexLock lock(&mu_);
    auto it = weights_.find(trial);
    if (it == weights_.end()) return std::nullopt;
    return it->second;
  }

 private:
  const HeadTrainer& trainer_;
  const RuleSet rules_;
  JobContext& context_;
  const int threads_per_trial_;
  StepTimes& times_;

  absl::Mutex mu_;
  std::map<int, HeadWeights> weights_ ABSL_GUARDED_BY(mu_);
};

// Fine-tune mode: every trial trains a copy of the whole backbone.
class FinetuneTrialRunner : public TrialRunner {
 public:
  struct Model {
    torch::jit::Module backbone;
    HeadWeights head;
  };

  FinetuneTrialRunner(const PreparedSpec& prepared,
                      const TrainerOptions& options, JobContext& context,
                      StepTimes& times)
      : prepared_(prepared),
        options_(options),
        context_(context),
        times_(times) {}

  FinetuneConfig Config(const kennel::v1::Hyperparameters& hp) const {
    FinetuneConfig config;
    config.hyper = HeadConfigFrom(hp);
    config.workers = std::max(1, options_.threads);
    config.prefetch = 2 * config.workers;
    config.device = prepared_.device;
    config.bad_images = prepared_.bad_images;
    return config;
  }

  absl::StatusOr<TrialOutcome> RunTrial(int trial,
                                        const kennel::v1::Hyperparameters& hp,
                                        const EpochFn& on_epoch) override {
    torch::jit::Module module;
    try {
      module = prepared_.backbone_module->deepcopy();
    } catch (const std::exception& e) {
      return TorchError(absl::StatusCode::kInternal, "copying the backbone", e);
    }
    RuleSet rules = prepared_.rules;
    std::string rule_stop;
    const int64_t images =
        static_cast<int64_t>(prepared_.dataset.train.images.size());
    auto callback = [&](const EpochStats& stats, double wait_share) {
      times_.Add(stats, images, wait_share * stats.seconds);
      const bool keep_going =
          on_epoch(EpochEvent(stats, wait_share, trial).epoch());
      rule_stop = ObserveRules(rules, stats, wait_share, context_, trial);
      return keep_going && rule_stop.empty() ? EpochDecision::kContinue
                                             : EpochDecision::kStop;
    };
    ASSIGN_OR_RETURN(
        FinetuneResult result,
        Finetune(
            std::move(module), prepared_.backbone, prepared_.dataset,
            Config(hp), callback, [this] { return context_.cancelled(); },
            /*profiler=*/nullptr));
    if (result.cancelled) {
      return absl::CancelledError(
          absl::StrCat("cancelled after ", result.epochs.size(), " epoch(s)"));
    }
    {
      absl::MutexLock lock(&mu_);
      models_[trial] = std::make_shared<Model>(
          Model{std::move(result.backbone), std::move(result.head)});
    }
    TrialOutcome outcome;
    outcome.stop_reason = rule_stop;
    return outcome;
  }

  void Discard(int trial) override {
    absl::MutexLock lock(&mu_);
    models_.erase(trial);
  }

  std::shared_ptr<Model> Get(int trial) {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(trial);
    return it == models_.end() ? nullptr : it->second;
  }

 private:
  const PreparedSpec& prepared_;
  const TrainerOptions& options_;
  JobContext& context_;
  StepTimes& times_;

  absl::Mutex mu_;
  std::map<int, std::shared_ptr<Model>> models_ ABSL_GUARDED_BY(mu_);
};

// Passes the scheduler's events to the job and keeps the tuning metrics
// (kennel_tune_*) in step with them.
class TuneEvents {
 public:
  TuneEvents(JobContext& context, TrainerMetrics* metrics,
             kennel::v1::Objective objective)
      : context_(context), metrics_(metrics), objective_(objective) {}

  void operator()(JobEvent event) {
    if (metrics_ != nullptr) Observe(event);
    context_.Emit(std::move(event));
  }

 private:
  void Observe(const JobEvent& event) {
    const std::string& job = context_.job_id();
    if (event.has_epoch() && event.trial() > 0) {
      const auto& e = event.epoch();
      metrics_->TuneTrialObjective(
          job, event.trial(),
          objective_ == kennel::v1::OBJECTIVE_VALID_ACCURACY
              ? e.valid_accuracy()
              : e.valid_loss());
    } else if (event.has_trial_finished()) {
      const auto& f = event.trial_finished();
      // Neither failed nor stopped, yet short of its epochs: cut off by a
      // cancel.
      const bool cancelled = !f.failed() && !f.stopped_early() &&
                             f.epochs_run() < f.hyperparameters().epochs();
      metrics_->TuneTrialFinished(job, f.failed()          ? "failed"
                                       : f.stopped_early() ? "stopped"
                                       : cancelled         ? "cancelled"
                                                           : "succeeded");
    } else if (event.has_leaderboard()) {
      for (const auto& entry : event.leaderboard().entries()) {
        if (entry.state() == "finished" && std::isfinite(entry.objective())) {
          metrics_->TuneBestObjective(job, entry.objective());
          break;
        }
      }
    }
  }

  JobContext& context_;
  TrainerMetrics* const metrics_;
  const kennel::v1::Objective objective_;
};

struct TuneJob {
  TuneOptions tune;
  std::shared_ptr<const PreparedSpec> prepared;
  const TrainerOptions* options;
};

// The trial the job keeps, with its test figures and registration.
absl::StatusOr<kennel::v1::JobCompleted> Finish(
    const TuneJob& job, const TuneResult& result, Clock::time_point start,
    kennel::v1::ModelMetrics metrics, const std::string& model_ref) {
  kennel::v1::JobCompleted completed;
  *completed.mutable_metrics() = std::move(metrics);
  completed.set_model_ref(model_ref);
  completed.set_best_trial(result.best_trial);
  *completed.mutable_hyperparameters() = result.best_hyperparameters;
  completed.set_seconds(SecondsSince(start));
  return completed;
}

absl::Status NoBestTrial(const TuneResult& result) {
  if (result.cancelled) {
    return absl::CancelledError(
        "cancelled before any trial finished, so there is no model to keep");
  }
  std::string why;
  for (const auto& entry : result.leaderboard.entries()) {
    if (entry.state() == "failed") {
      why = absl::StrCat(" (trial ", entry.trial(), " failed)");
      break;
    }
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "no trial produced a usable result: every one failed or diverged", why,
      "; see the trial_finished events for each reason"));
}

void EmitFinalLeaderboard(JobContext& context, const TuneResult& result) {
  JobEvent board;
  *board.mutable_leaderboard() = result.leaderboard;
  context.Emit(std::move(board));
}

void EmitProfiler(JobContext& context, Profiler& profiler, StepTimes& times) {
  times.Into(profiler);
  JobEvent report;
  *report.mutable_profiler() = profiler.Report();
  context.Emit(std::move(report));
}

absl::StatusOr<kennel::v1::JobCompleted> RunHeadTune(const TuneJob& job,
                                                     JobContext& context) {
  const auto start = Clock::now();
  const PreparedSpec& prepared = *job.prepared;
  const TrainerOptions& options = *job.options;
  Profiler profiler(options.threads);
  ASSIGN_OR_RETURN(kennel::v1::Precision precision,
                   ResolvePrecision(prepared, context));
  context.Emit(StartedEvent(prepared, kennel::v1::JOB_KIND_TUNE, precision));
  ASSIGN_OR_RETURN(Extraction extraction,
                   ExtractFeatures(prepared, precision, options, context));
  profiler.AddFeature(extraction.seconds);
  profiler.SetCache(extraction.cache_hits, extraction.cache_misses);

  TuneScheduler scheduler(
      job.tune, TuneEvents(context, options.metrics, job.tune.objective));
  // Head trials are small matrix products: more of them at once, with fewer
  // threads each, uses the cores better than one trial with all of them.
  const int budget = std::max(1, options.threads);
  const int workers = std::min(job.tune.max_parallel_trials, budget);
  scheduler.SetWorkers(workers);
  HeadTrainer trainer(extraction.features);
  StepTimes times;
  HeadTrialRunner runner(trainer, prepared.rules, context,
                         std::max(1, budget / workers), times);
  TuneResult result =
      scheduler.Run(&runner, [&context] { return context.cancelled(); });
  EmitFinalLeaderboard(context, result);
  if (result.best_trial == 0) {
    EmitProfiler(context, profiler, times);
    return NoBestTrial(result);
  }
  std::optional<HeadWeights> weights = runner.Weights(result.best_trial);
  if (!weights) {
    return absl::InternalError("the best trial's weights were not kept");
  }
  const Evaluation test =
      HeadTrainer::Evaluate(*weights, extraction.features->test);
  kennel::v1::ModelMetrics metrics = result.best_metrics;
  metrics.set_test_loss(test.loss);
  metrics.set_test_accuracy(test.accuracy);
  metrics.set_measured(true);
  const std::string fingerprint =
      DatasetFingerprint(prepared.dataset, extraction.content_digests);
  ASSIGN_OR_RETURN(
      std::string model_ref,
      ExportAndRegister(prepared, options, *prepared.backbone_module, *weights,
                        result.best_hyperparameters, metrics, precision,
                        fingerprint, context, result.best_trial));
  EmitProfiler(context, profiler, times);
  return Finish(job, result, start, metrics, model_ref);
}

absl::StatusOr<kennel::v1::JobCompleted> RunFinetuneTune(const TuneJob& job,
                                                         JobContext& context) {
  const auto start = Clock::now();
  const PreparedSpec& prepared = *job.prepared;
  const TrainerOptions& options = *job.options;
  Profiler profiler(options.threads);
  const kennel::v1::Precision precision = kennel::v1::PRECISION_FP32;
  context.Emit(StartedEvent(prepared, kennel::v1::JOB_KIND_TUNE, precision));
  // An s3:// data set is read from its local copy; fetch what it lacks.
  RETURN_IF_ERROR(FetchData(prepared, context));
  if (job.tune.max_parallel_trials > 1) {
    context.Log(absl::StrCat(
        "fine-tune trials train one at a time on ", DeviceName(prepared.device),
        "; max_parallel_trials ", job.tune.max_parallel_trials,
        " still decides which results each trial's proposal sees"));
  }
  TuneScheduler scheduler(
      job.tune, TuneEvents(context, options.metrics, job.tune.objective));
  scheduler.SetWorkers(1);
  StepTimes times;
  FinetuneTrialRunner runner(prepared, options, context, times);
  TuneResult result =
      scheduler.Run(&runner, [&context] { return context.cancelled(); });
  EmitFinalLeaderboard(context, result);
  if (result.best_trial == 0) {
    EmitProfiler(context, profiler, times);
    return NoBestTrial(result);
  }
  std::shared_ptr<FinetuneTrialRunner::Model> model =
      runner.Get(result.best_trial);
  if (model == nullptr) {
    return absl::InternalError("the best trial's model was not kept");
  }
  FinetuneConfig config = runner.Config(result.best_hyperparameters);
  std::vector<std::string> bad_test;
  // The test pass runs even when the job is being cancelled: the best trial
  // is kept and registered with its figures.
  ASSIGN_OR_RETURN(Evaluation test,
                   EvaluateImages(model->backbone, model->head,
                                  prepared.backbone, prepared.dataset.test,
                                  config, &bad_test, [] { return false; }));
  kennel::v1::ModelMetrics metrics = result.best_metrics;
  metrics.set_test_loss(test.loss);
  metrics.set_test_accuracy(test.accuracy);
  metrics.set_measured(true);
  const std::string fingerprint =
      DatasetFingerprint(prepared.dataset, ContentDigests(prepared.dataset));
  ASSIGN_OR_RETURN(
      std::string model_ref,
      ExportAndRegister(prepared, options, model->backbone, model->head,
                        result.best_hyperparameters, metrics, precision,
                        fingerprint, context, result.best_trial));
  EmitProfiler(context, profiler, times);
  return Finish(job, result, start, metrics, model_ref);
}

}  // namespace

kennel::v1::Hyperparameters TuneBaseWithDefaults(
    const kennel::v1::Hyperparameters& base) {
  const HeadConfig defaults;
  kennel::v1::Hyperparameters hp = base;
  if (hp.learning_rate() == 0) hp.set_learning_rate(defaults.learning_rate);
  if (hp.batch_size() == 0) hp.set_batch_size(defaults.batch_size);
  if (hp.epochs() == 0) hp.set_epochs(defaults.epochs);
  return hp;
}

absl::StatusOr<JobFn> PrepareTuneJob(const kennel::v1::TuneRequest& request,
                                     const TrainerOptions* options) {
  TuneJob job;
  ASSIGN_OR_RETURN(job.tune, TuneOptionsFromRequest(request));
  job.tune.base = TuneBaseWithDefaults(request.base());
  // The space's values are valid on their own; check the fixed ones with
  // the space's centre filled in.
  Point centre;
  for (const ParamDef& p : job.tune.space.params())
    centre.push_back(p.FromUnit(0.5));
  RETURN_IF_ERROR(Annotate(
      ValidateHyperparameters(job.tune.space.Apply(centre, job.tune.base)),
      "base hyperparameters"));
  ASSIGN_OR_RETURN(PreparedSpec prepared,
                   PrepareSpec(request.spec(), *options));
  job.prepared = std::make_shared<const PreparedSpec>(std::move(prepared));
  job.options = options;
  return JobFn(
      [job](JobContext& context) -> absl::StatusOr<kennel::v1::JobCompleted> {
        if (job.tune.base.mode() == kennel::v1::TRAIN_MODE_FINETUNE) {
          return RunFinetuneTune(job, context);
        }
        return RunHeadTune(job, context);
      });
}

absl::StatusOr<JobFn> TorchTrainerBackend::PrepareTune(
    const kennel::v1::TuneRequest& request) {
  return PrepareTuneJob(request, &options_);
}

}  // namespace kennel::trainer
