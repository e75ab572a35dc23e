#include "services/trainer/leaderboard.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace kennel::trainer {
namespace {

int Group(TrialState state) {
  switch (state) {
    case TrialState::kFinished:
      return 0;
    case TrialState::kRunning:
      return 1;
    case TrialState::kStopped:
      return 2;
    case TrialState::kCancelled:
      return 3;
    case TrialState::kFailed:
      return 4;
  }
  return 5;
}

double LastCost(const TrialRecord& r) {
  return r.costs.empty() ? std::numeric_limits<double>::infinity()
                         : r.costs.back();
}

}  // namespace

std::string TrialStateName(TrialState state) {
  switch (state) {
    case TrialState::kRunning:
      return "running";
    case TrialState::kFinished:
      return "finished";
    case TrialState::kStopped:
      return "stopped";
    case TrialState::kFailed:
      return "failed";
    case TrialState::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

void Leaderboard::Started(int trial, const kennel::v1::Hyperparameters& hp,
                          const Point& point) {
  TrialRecord& r = trials_[trial];
  r.trial = trial;
  r.hyperparameters = hp;
  r.point = point;
  r.state = TrialState::kRunning;
}

double Leaderboard::Epoch(int trial, const kennel::v1::EpochEnd& epoch) {
  TrialRecord& r = trials_[trial];
  r.trial = trial;
  r.epochs.push_back(epoch);
  const double cost =
      ObjectiveCost(objective_, epoch.valid_loss(), epoch.valid_accuracy());
  r.costs.push_back(cost);
  r.metrics.set_train_loss(epoch.train_loss());
  r.metrics.set_valid_loss(epoch.valid_loss());
  r.metrics.set_valid_accuracy(epoch.valid_accuracy());
  r.metrics.set_measured(true);
  return cost;
}

void Leaderboard::Ended(int trial, TrialState state, const std::string& reason,
                        const kennel::v1::ModelMetrics& metrics,
                        double seconds) {
  TrialRecord& r = trials_[trial];
  r.trial = trial;
  r.state = state;
  r.reason = reason;
  r.seconds = seconds;
  if (metrics.test_loss() != 0 || metrics.test_accuracy() != 0) {
    r.metrics.set_test_loss(metrics.test_loss());
    r.metrics.set_test_accuracy(metrics.test_accuracy());
  }
}

const TrialRecord* Leaderboard::Get(int trial) const {
  auto it = trials_.find(trial);
  return it == trials_.end() ? nullptr : &it->second;
}

std::vector<int> Leaderboard::Ranking() const {
  std::vector<const TrialRecord*> all;
  for (const auto& [trial, record] : trials_) all.push_back(&record);
  auto key = [](const TrialRecord* r) {
    const int group = Group(r->state);
    // Stopped trials that got further rank higher.
    const int depth = group == 2 ? -static_cast<int>(r->costs.size()) : 0;
    return std::make_tuple(group, depth, LastCost(*r), r->trial);
  };
  std::stable_sort(all.begin(), all.end(),
                   [&](const TrialRecord* a, const TrialRecord* b) {
                     return key(a) < key(b);
                   });
  std::vector<int> ranking;
  for (const TrialRecord* r : all) ranking.push_back(r->trial);
  return ranking;
}

std::optional<int> Leaderboard::Best() const {
  for (TrialState wanted : {TrialState::kFinished, TrialState::kStopped}) {
    std::optional<int> best;
    for (const auto& [trial, r] : trials_) {
      if (r.state != wanted || !std::isfinite(LastCost(r))) continue;
      if (!best || LastCost(r) < LastCost(trials_.at(*best))) best = trial;
    }
    if (best) return best;
  }
  return std::nullopt;
}

kennel::v1::LeaderboardEntry Leaderboard::Entry(int trial) const {
  kennel::v1::LeaderboardEntry entry;
  const TrialRecord* r = Get(trial);
  if (r == nullptr) return entry;
  entry.set_trial(trial);
  *entry.mutable_hyperparameters() = r->hyperparameters;
  if (!r->costs.empty()) {
    entry.set_objective(CostToObjective(objective_, r->costs.back()));
  }
  *entry.mutable_metrics() = r->metrics;
  entry.set_epochs_run(static_cast<int>(r->epochs.size()));
  entry.set_state(TrialStateName(r->state));
  return entry;
}

kennel::v1::Leaderboard Leaderboard::ToProto(size_t limit) const {
  kennel::v1::Leaderboard board;
  for (int trial : Ranking()) {
    if (limit != 0 && static_cast<size_t>(board.entries_size()) >= limit) break;
    *board.add_entries() = Entry(trial);
  }
  return board;
}

TrialObservation Leaderboard::Observation(int trial) const {
  TrialObservation o;
  o.index = trial - 1;
  const TrialRecord* r = Get(trial);
  if (r == nullptr) {
    o.failed = true;
    return o;
  }
  o.point = r->point;
  o.costs = r->costs;
  o.failed = r->state == TrialState::kFailed ||
             r->state == TrialState::kCancelled || r->costs.empty();
  o.stopped_early = r->state == TrialState::kStopped;
  return o;
}

}  // namespace kennel::trainer
