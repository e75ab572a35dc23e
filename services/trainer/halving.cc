#include "services/trainer/halving.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kennel::trainer {

std::vector<int> SuccessiveHalving::Rungs(int epochs) const {
  std::vector<int> rungs;
  for (long long r = 1; r < epochs; r *= eta_)
    rungs.push_back(static_cast<int>(r));
  return rungs;
}

bool SuccessiveHalving::IsRung(int epoch, int epochs) const {
  if (epoch < 1 || epoch >= epochs) return false;
  long long r = 1;
  while (r < epoch) r *= eta_;
  return r == epoch;
}

HalvingDecision SuccessiveHalving::Decide(
    int epoch, int epochs, double cost,
    absl::Span<const TrialObservation> peers,
    const std::string& objective_name) const {
  HalvingDecision decision;
  if (!IsRung(epoch, epochs)) return decision;
  int n = 0, better = 0;
  for (const TrialObservation& peer : peers) {
    if (peer.failed || static_cast<int>(peer.costs.size()) < epoch) continue;
    ++n;
    // Ties favour the trial being decided.
    if (peer.costs[epoch - 1] < cost) ++better;
  }
  decision.of = n + 1;
  decision.rank = better + 1;
  decision.keep = std::max(1, decision.of / eta_);
  const std::string value =
      std::isfinite(cost) ? absl::StrFormat("%.4g", std::abs(cost)) : "NaN";
  if (n < eta_ - 1) {
    decision.reason =
        absl::StrCat("rung at epoch ", epoch, ": only ", n,
                     " earlier trials to compare with; continues");
    decision.keep = decision.of;
    return decision;
  }
  decision.stop = decision.rank > decision.keep;
  decision.reason = absl::StrCat(objective_name, " ", value, " after epoch ",
                                 epoch, " ranks ", decision.rank, " of ",
                                 decision.of, " trials at this rung; the best ",
                                 decision.keep, " continue (eta ", eta_, ")");
  return decision;
}

}  // namespace kennel::trainer
