// Successive halving on epochs: after 1, eta, eta^2, ... epochs (the rungs) a
// trial continues only when its objective ranks in the best 1/eta of the
// trials that reached the same rung.
//
// Asynchronous halving (ASHA) compares a trial against whichever trials
// happen to have reached the rung, so its decisions depend on timing. Here
// the peers of trial k are a fixed set, the trials the scheduler guarantees
// to have ended before trial k started (tune_scheduler.h), so the decisions,
// like the proposals, are the same in every run with the same seed.
#ifndef KENNEL_SERVICES_TRAINER_HALVING_H_
#define KENNEL_SERVICES_TRAINER_HALVING_H_

#include <string>
#include <vector>

#include "absl/types/span.h"
#include "services/trainer/search.h"

namespace kennel::trainer {

struct HalvingDecision {
  bool stop = false;
  // Why the trial stops (or, at a rung, why it continues); empty between
  // rungs.
  std::string reason;
  // Where the trial ranked among the peers at this rung, 1-based, and how
  // many continue; zero between rungs.
  int rank = 0;
  int of = 0;
  int keep = 0;
};

// Stateless and thread-safe.
class SuccessiveHalving {
 public:
  // `eta` >= 2.
  explicit SuccessiveHalving(int eta) : eta_(eta < 2 ? 2 : eta) {}

  int eta() const { return eta_; }
  // Epoch counts at which a trial of `epochs` epochs may be stopped: the
  // powers of eta below `epochs` (the last epoch ends the trial anyway).
  std::vector<int> Rungs(int epochs) const;
  bool IsRung(int epoch, int epochs) const;

  // Whether a trial whose cost (lower is better) after `epoch` of its
  // `epochs` epochs is `cost` should stop, against `peers`: trials that have
  // ended. A peer counts at a rung when it ran at least `epoch` epochs and did
  // not fail. With fewer than eta - 1 such peers the trial continues.
  HalvingDecision Decide(int epoch, int epochs, double cost,
                         absl::Span<const TrialObservation> peers,
                         const std::string& objective_name) const;

 private:
  const int eta_;
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_HALVING_H_
