#include "services/trainer/tune_scheduler.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kennel::trainer {
namespace {

// Leaderboard events list this many trials; the final one lists all.
constexpr size_t kLeaderboardEventEntries = 20;

}  // namespace

TuneScheduler::TuneScheduler(TuneOptions options, EventFn emit)
    : TuneScheduler(options, MakeSearcher(options), std::move(emit)) {}

TuneScheduler::TuneScheduler(TuneOptions options,
                             std::unique_ptr<Searcher> searcher, EventFn emit)
    : options_(std::move(options)),
      emit_(std::move(emit)),
      halving_(options_.eta),
      searcher_(std::move(searcher)),
      board_(options_.objective) {
  num_trials_ = std::min(options_.max_trials, searcher_->NumTrials());
  waits_on_history_ = searcher_->UsesHistory() || options_.early_stopping;
  absl::MutexLock lock(&mu_);
  ended_.assign(num_trials_, false);
}

TuneScheduler::~TuneScheduler() = default;

void TuneScheduler::SetWorkers(int workers) { workers_ = std::max(1, workers); }

std::string TuneScheduler::Describe() const {
  const int parallel =
      std::min(options_.max_parallel_trials, std::max(1, num_trials_));
  const int workers = workers_ > 0 ? std::min(workers_, parallel) : parallel;
  return absl::StrCat(
      searcher_->Describe(), ", ", num_trials_, " trials, ", parallel,
      " at a time",
      workers < parallel
          ? absl::StrCat(" (", workers,
                         " training at once within the thread budget)")
          : std::string(),
      ", objective ", ObjectiveName(options_.objective), ", ",
      options_.early_stopping
          ? absl::StrCat("successive halving (eta ", options_.eta, ")")
          : std::string("early stopping off"));
}

int TuneScheduler::PrefixNeeded(int index) const {
  if (!waits_on_history_) return 0;
  return std::max(0, index - options_.max_parallel_trials + 1);
}

bool TuneScheduler::Cancelled() const { return cancelled_ && cancelled_(); }

bool TuneScheduler::CanClaimLocked() const {
  return next_ >= num_trials_ || ended_prefix_ >= PrefixNeeded(next_);
}

void TuneScheduler::QueueLocked(int trial, kennel::v1::JobEvent event) {
  event.set_trial(trial);
  queue_.push_back(std::move(event));
}

void TuneScheduler::Flush() {
  absl::MutexLock emit_lock(&emit_mu_);
  std::vector<kennel::v1::JobEvent> events;
  {
    absl::MutexLock lock(&mu_);
    events.swap(queue_);
  }
  for (auto& event : events) emit_(std::move(event));
}

std::optional<TuneScheduler::Claim> TuneScheduler::ClaimNext() {
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(
      absl::Condition(this, &TuneScheduler::CanClaimLocked),
      absl::Milliseconds(100))) {
    if (Cancelled()) return std::nullopt;
  }
  if (next_ >= num_trials_ || Cancelled()) return std::nullopt;
  Claim claim;
  claim.index = next_++;
  const int prefix = PrefixNeeded(claim.index);
  std::vector<TrialObservation> history;
  history.reserve(prefix);
  for (int i = 0; i < prefix; ++i) history.push_back(board_.Observation(i + 1));
  claim.point = searcher_->Propose(claim.index, history);
  claim.hp = options_.space.Apply(claim.point, options_.base);
  if (claim.hp.seed() == 0) claim.hp.set_seed(options_.seed);
  claim.peers = std::move(history);
  const int trial = claim.index + 1;
  board_.Started(trial, claim.hp, claim.point);
  kennel::v1::JobEvent event;
  *event.mutable_trial_started()->mutable_hyperparameters() = claim.hp;
  QueueLocked(trial, std::move(event));
  return claim;
}

void TuneScheduler::RunOne(TrialRunner* runner, Claim claim) {
  const int trial = claim.index + 1;
  const absl::Time start = absl::Now();
  bool stop_requested = false;
  std::string stop_reason;
  const std::string objective_name = ObjectiveName(options_.objective);

  auto on_epoch = [&](const kennel::v1::EpochEnd& epoch) {
    const int epochs = epoch.epochs() > 0 ? epoch.epochs() : claim.hp.epochs();
    {
      absl::MutexLock lock(&mu_);
      const double cost = board_.Epoch(trial, epoch);
      kennel::v1::JobEvent event;
      *event.mutable_epoch() = epoch;
      QueueLocked(trial, std::move(event));
      if (!std::isfinite(cost)) {
        stop_requested = true;
        stop_reason = absl::StrCat(objective_name,
                                   " is not a finite number "
                                   "after epoch ",
                                   epoch.epoch(), ": the trial diverged");
      } else if (options_.early_stopping && epoch.epoch() < epochs) {
        HalvingDecision decision = halving_.Decide(epoch.epoch(), epochs, cost,
                                                   claim.peers, objective_name);
        if (decision.stop) {
          stop_requested = true;
          stop_reason =
              absl::StrCat("stopped by successive halving: ", decision.reason);
        }
      }
    }
    Flush();
    return !stop_requested && !Cancelled();
  };

  absl::StatusOr<TrialOutcome> result =
      runner->RunTrial(trial, claim.hp, on_epoch);
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);

  std::vector<int> discard;
  {
    absl::MutexLock lock(&mu_);
    const TrialRecord* record = board_.Get(trial);
    const int epochs_run = static_cast<int>(record->epochs.size());
    const int planned =
        record->epochs.empty()
            ? claim.hp.epochs()
            : std::max(record->epochs.back().epochs(), epochs_run);
    TrialState state = TrialState::kFinished;
    std::string reason;
    kennel::v1::ModelMetrics end_metrics;
    if (!result.ok()) {
      state = (Cancelled() || absl::IsCancelled(result.status()))
                  ? TrialState::kCancelled
                  : TrialState::kFailed;
      reason = std::string(result.status().message());
    } else if (epochs_run == 0) {
      state = Cancelled() ? TrialState::kCancelled : TrialState::kFailed;
      reason = "the trial ended before its first epoch";
    } else if (stop_requested) {
      state = TrialState::kStopped;
      reason = stop_reason;
      end_metrics = result->metrics;
    } else if (!result->stop_reason.empty()) {
      state = TrialState::kStopped;
      reason = result->stop_reason;
      end_metrics = result->metrics;
    } else if (epochs_run < planned) {
      state = Cancelled() ? TrialState::kCancelled : TrialState::kStopped;
      reason = Cancelled() ? "the job was cancelled"
                           : "the trainer ended the trial early";
      end_metrics = result->metrics;
    } else {
      end_metrics = result->metrics;
    }
    if (state == TrialState::kCancelled && reason.empty()) {
      reason = "the job was cancelled";
    }
    board_.Ended(trial, state, reason, end_metrics, seconds);
    ended_[claim.index] = true;
    while (ended_prefix_ < num_trials_ && ended_[ended_prefix_])
      ++ended_prefix_;

    // Keep only the model that can still be the job's result.
    std::optional<int> best = board_.Best();
    if (best_ && best_ != best) discard.push_back(*best_);
    if (best != trial) discard.push_back(trial);
    best_ = best;

    const TrialRecord& r = *board_.Get(trial);
    kennel::v1::JobEvent event;
    auto* finished = event.mutable_trial_finished();
    *finished->mutable_hyperparameters() = r.hyperparameters;
    *finished->mutable_metrics() = r.metrics;
    finished->set_epochs_run(epochs_run);
    finished->set_stopped_early(state == TrialState::kStopped);
    finished->set_reason(r.reason);
    finished->set_seconds(seconds);
    finished->set_failed(state == TrialState::kFailed);
    QueueLocked(trial, std::move(event));
    kennel::v1::JobEvent board;
    *board.mutable_leaderboard() = board_.ToProto(kLeaderboardEventEntries);
    QueueLocked(0, std::move(board));
  }
  Flush();
  for (int t : discard) runner->Discard(t);
}

void TuneScheduler::Worker(TrialRunner* runner) {
  while (std::optional<Claim> claim = ClaimNext()) {
    Flush();
    RunOne(runner, *std::move(claim));
  }
}

TuneResult TuneScheduler::Run(TrialRunner* runner,
                              std::function<bool()> cancelled) {
  cancelled_ = std::move(cancelled);
  {
    kennel::v1::JobEvent event;
    event.set_log(absl::StrCat("tuning: ", Describe()));
    absl::MutexLock lock(&mu_);
    QueueLocked(0, std::move(event));
  }
  Flush();
  int threads =
      std::max(1, std::min(options_.max_parallel_trials, num_trials_));
  if (workers_ > 0) threads = std::min(threads, workers_);
  std::vector<std::thread> workers;
  for (int i = 0; i < threads; ++i) {
    workers.emplace_back([this, runner] { Worker(runner); });
  }
  for (auto& worker : workers) worker.join();

  TuneResult result;
  absl::MutexLock lock(&mu_);
  result.cancelled = Cancelled();
  result.leaderboard = board_.ToProto();
  for (const auto& [trial, r] : board_.trials()) {
    ++result.trials_run;
    if (r.state == TrialState::kFinished) ++result.finished;
    if (r.state == TrialState::kStopped) ++result.stopped;
    if (r.state == TrialState::kFailed) ++result.failed;
  }
  if (best_) {
    const TrialRecord& r = *board_.Get(*best_);
    result.best_trial = *best_;
    result.best_hyperparameters = r.hyperparameters;
    result.best_metrics = r.metrics;
  }
  return result;
}

}  // namespace kennel::trainer
