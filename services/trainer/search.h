// Search strategies: random, grid and a tree-structured Parzen estimator.
//
// Every strategy is a pure function of (options, trial index, history): the
// random numbers for trial k come from a generator seeded with (seed, k), and
// `history` is the fixed prefix of trials the scheduler guarantees to have
// finished before trial k starts (see tune_scheduler.h). So the same seed and
// inputs give the same sequence of trials however the trials' finishing
// times interleave.
#ifndef KENNEL_SERVICES_TRAINER_SEARCH_H_
#define KENNEL_SERVICES_TRAINER_SEARCH_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "services/trainer/search_space.h"

namespace kennel::trainer {

// What a strategy knows of a trial that has ended.
struct TrialObservation {
  // 0-based index of the trial.
  int index = 0;
  Point point;
  // The trial produced no result (an error, or it was cancelled).
  bool failed = false;
  // Stopped by successive halving before its last epoch.
  bool stopped_early = false;
  // Cost (ObjectiveCost: lower is better) after each epoch it ran.
  std::vector<double> costs;

  double final_cost() const;
};

// True when `a` is a better trial than `b`: trials that ran all their epochs
// come first, then those stopped early, by how far they got; failed trials
// last; ties go to the lower cost, then to the lower index.
bool BetterTrial(const TrialObservation& a, const TrialObservation& b);

// Deterministic random numbers (xoshiro256**, seeded through splitmix64).
// Hand-written rather than std's distributions, whose output differs between
// standard libraries, so a seed means the same trials everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  // Derives a generator for one purpose (a trial, a strategy) from a seed.
  static Rng For(uint64_t seed, uint64_t stream, uint64_t index);
  uint64_t Next();
  // Uniform in [0, 1).
  double Uniform();
  // Standard normal (Box-Muller).
  double Normal();
  // Uniform integer in [0, n).
  uint64_t Below(uint64_t n);

 private:
  uint64_t state_[4];
};

// Proposes the hyperparameters of each trial. Not thread-safe; the scheduler
// calls it under its lock.
class Searcher {
 public:
  virtual ~Searcher() = default;
  // How many trials the strategy will propose (a grid may have fewer points
  // than max_trials).
  virtual int NumTrials() const = 0;
  // Whether Propose reads `history`; if not, trials never wait on each other
  // for their proposals.
  virtual bool UsesHistory() const = 0;
  // The point of trial `index`. `history` holds every trial with an index
  // below some n <= index, in index order, all of them ended.
  virtual Point Propose(int index,
                        absl::Span<const TrialObservation> history) = 0;
  // One line for people: "random search", "grid of 12 points (2 x 2 x 3)".
  virtual std::string Describe() const = 0;
};

// The strategy of `options`; its trial count is at most options.max_trials.
std::unique_ptr<Searcher> MakeSearcher(const TuneOptions& options);

// Settings of the tree-structured Parzen estimator, exposed for tests and
// the comparison in tests/proofs.
struct TpeSettings {
  // Trials drawn at random before the model is used: until the history holds
  // this many results. 0 picks max(4, min(10, max_trials / 3)).
  int startup_trials = 0;
  // Share of the history that counts as "good".
  double gamma = 0.25;
  // Candidates drawn from the good density; the one with the largest
  // good/bad density ratio wins.
  int candidates = 24;
};
std::unique_ptr<Searcher> MakeTpeSearcher(const TuneOptions& options,
                                          TpeSettings settings);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_SEARCH_H_
