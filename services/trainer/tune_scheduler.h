// Runs the trials of a tuning job in parallel, deterministically.
//
// Determinism with parallel trials: with P trials at once, trial k (0-based)
// may read only the results of trials 0 .. k-P, and it starts only when all
// of those have ended. Whatever order the trials finish in, trial k's
// proposal and its successive-halving peers are then the same set. The cost
// is that a slot can idle while an older, longer trial finishes; the first P
// trials never wait. Strategies that ignore results (random, grid) with
// early stopping off never wait at all.
//
// The scheduler knows nothing of LibTorch: a TrialRunner trains.
#ifndef KENNEL_SERVICES_TRAINER_TUNE_SCHEDULER_H_
#define KENNEL_SERVICES_TRAINER_TUNE_SCHEDULER_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kennel/v1/trainer.pb.h"
#include "services/trainer/halving.h"
#include "services/trainer/leaderboard.h"
#include "services/trainer/search.h"
#include "services/trainer/search_space.h"

namespace kennel::trainer {

// How a trial that did not fail ended, as its runner saw it.
struct TrialOutcome {
  // Figures measured at the end (a test split), when the runner measures
  // them.
  kennel::v1::ModelMetrics metrics;
  // Set when the runner itself ended the trial early (a training rule with
  // action STOP); the trial counts as stopped, for this reason.
  std::string stop_reason;
};

// Trains one trial. The scheduler calls RunTrial from up to
// max_parallel_trials threads at once, so implementations must be
// thread-safe.
class TrialRunner {
 public:
  using EpochFn = std::function<bool(const kennel::v1::EpochEnd&)>;
  virtual ~TrialRunner() = default;

  // Trains `hp` as trial `trial` (1-based), calling `on_epoch` after every
  // epoch; when it returns false the trial stops after that epoch and keeps
  // the model it has. An error fails only this trial (CANCELLED marks it
  // cancelled).
  virtual absl::StatusOr<TrialOutcome> RunTrial(
      int trial, const kennel::v1::Hyperparameters& hp,
      const EpochFn& on_epoch) = 0;

  // The trial's model can no longer be the job's result; free it.
  virtual void Discard(int trial) {}
};

struct TuneResult {
  // 1-based; 0 when no trial produced a usable result.
  int best_trial = 0;
  kennel::v1::Hyperparameters best_hyperparameters;
  kennel::v1::ModelMetrics best_metrics;
  // Every trial, best first.
  kennel::v1::Leaderboard leaderboard;
  int trials_run = 0;
  int finished = 0;
  int stopped = 0;
  int failed = 0;
  bool cancelled = false;
};

// One use: construct, Run once.
class TuneScheduler {
 public:
  // Events carry JobEvent.trial and one event; the caller fills in job id,
  // sequence and time. `emit` is called from the trial threads, one call at
  // a time, in an order consistent with the search's state.
  using EventFn = std::function<void(kennel::v1::JobEvent)>;

  TuneScheduler(TuneOptions options, EventFn emit);
  // For tests and the strategy comparison: a searcher of one's own.
  TuneScheduler(TuneOptions options, std::unique_ptr<Searcher> searcher,
                EventFn emit);
  ~TuneScheduler();

  // Trials this search will run (a grid may have fewer than max_trials).
  int NumTrials() const { return num_trials_; }
  // Runs at most `workers` trials at once (at least 1), fewer than
  // max_parallel_trials when the machine has less room. Which results each
  // trial sees still follows max_parallel_trials, so the trials are the same
  // for any `workers`. Call before Run.
  void SetWorkers(int workers);
  // "random search, 16 trials, 4 at a time, successive halving (eta 3)".
  std::string Describe() const;

  // Runs the search until every trial has ended or `cancelled()` returns
  // true; then no new trial starts, running ones are expected to stop at
  // their next step (the runner watches the same flag) and are recorded as
  // cancelled. Blocks; trials run on threads of its own.
  TuneResult Run(TrialRunner* runner, std::function<bool()> cancelled);

 private:
  struct Claim {
    int index = -1;
    Point point;
    kennel::v1::Hyperparameters hp;
    std::vector<TrialObservation> peers;
  };

  void Worker(TrialRunner* runner);
  // Takes the next trial once its prefix has ended; nullopt when there is
  // nothing left to start.
  std::optional<Claim> ClaimNext();
  void RunOne(TrialRunner* runner, Claim claim);
  int PrefixNeeded(int index) const;
  bool CanClaimLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void QueueLocked(int trial, kennel::v1::JobEvent event)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Emits queued events, outside mu_, in queue order.
  void Flush();
  bool Cancelled() const;
  // Frees the models that can no longer win.
  void UpdateBestLocked(TrialRunner* runner, int ended_trial)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const TuneOptions options_;
  const EventFn emit_;
  const SuccessiveHalving halving_;
  std::unique_ptr<Searcher> searcher_;
  int num_trials_ = 0;
  bool waits_on_history_ = false;
  int workers_ = 0;
  std::function<bool()> cancelled_;

  // Serialises calls of emit_ so events leave in queue order.
  absl::Mutex emit_mu_ ABSL_ACQUIRED_BEFORE(mu_);

  mutable absl::Mutex mu_;
  Leaderboard board_ ABSL_GUARDED_BY(mu_);
  int next_ ABSL_GUARDED_BY(mu_) = 0;
  // Trials [0, ended_prefix_) have all ended.
  int ended_prefix_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<bool> ended_ ABSL_GUARDED_BY(mu_);
  std::optional<int> best_ ABSL_GUARDED_BY(mu_);
  std::vector<kennel::v1::JobEvent> queue_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TUNE_SCHEDULER_H_
