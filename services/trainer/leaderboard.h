// The trials of a tuning job, what each has reached so far, and their
// ranking. Not thread-safe: the scheduler guards it with its lock.
#ifndef KENNEL_SERVICES_TRAINER_LEADERBOARD_H_
#define KENNEL_SERVICES_TRAINER_LEADERBOARD_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "kennel/v1/trainer.pb.h"
#include "services/trainer/search.h"

namespace kennel::trainer {

enum class TrialState {
  kRunning,
  // Ran all its epochs.
  kFinished,
  // Stopped by successive halving, or because it diverged.
  kStopped,
  kFailed,
  // Interrupted by a cancelled job.
  kCancelled,
};

// "running", "finished", "stopped", "failed", "cancelled".
std::string TrialStateName(TrialState state);

struct TrialRecord {
  // 1-based, as in JobEvent.trial.
  int trial = 0;
  kennel::v1::Hyperparameters hyperparameters;
  Point point;
  TrialState state = TrialState::kRunning;
  std::vector<kennel::v1::EpochEnd> epochs;
  // Cost (ObjectiveCost) after each epoch.
  std::vector<double> costs;
  // Final figures: the last epoch's, plus whatever the trial measured at its
  // end (a test split).
  kennel::v1::ModelMetrics metrics;
  std::string reason;
  double seconds = 0;
};

class Leaderboard {
 public:
  explicit Leaderboard(kennel::v1::Objective objective)
      : objective_(objective) {}

  void Started(int trial, const kennel::v1::Hyperparameters& hp,
               const Point& point);
  // Records an epoch; returns its cost.
  double Epoch(int trial, const kennel::v1::EpochEnd& epoch);
  // `metrics` holds figures measured at the end (may be empty).
  void Ended(int trial, TrialState state, const std::string& reason,
             const kennel::v1::ModelMetrics& metrics, double seconds);

  const TrialRecord* Get(int trial) const;
  const std::map<int, TrialRecord>& trials() const { return trials_; }
  kennel::v1::Objective objective() const { return objective_; }

  // The trial whose model the job keeps: the best that ran all its epochs
  // with a finite objective, else the best of those stopped early; none when
  // no trial has a usable result.
  std::optional<int> Best() const;
  // Trials, best first: finished, running, stopped (the further they got
  // the better), cancelled, failed; each group by objective, then number.
  std::vector<int> Ranking() const;
  // The first `limit` of Ranking() (all when 0).
  kennel::v1::Leaderboard ToProto(size_t limit = 0) const;
  kennel::v1::LeaderboardEntry Entry(int trial) const;

  // What the strategies and halving see of an ended trial.
  TrialObservation Observation(int trial) const;

 private:
  const kennel::v1::Objective objective_;
  std::map<int, TrialRecord> trials_;
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_LEADERBOARD_H_
