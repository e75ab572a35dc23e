// Rules that watch a training run's signals and raise events, each of which
// can warn or stop the job. The signals come once per epoch: losses are
// per-sample means over a whole epoch, so batch-to-batch noise cannot fire a
// rule, and a run's verdict does not depend on its batch size.
//
//   loss_not_decreasing  the training loss improved by less than
//                        diff_percent % over the last num_steps epochs (or
//                        is not finite). Defaults: num_steps 5,
//                        diff_percent 0.1.
//   vanishing_gradient   the mean absolute gradient of the trained weight
//                        tensors fell below threshold (default 1e-7). Bias
//                        gradients are left out: they do not pass through
//                        the layers, so they never vanish and would mask a
//                        weight gradient that does.
//   overfit              the validation loss rose while the training loss
//                        fell, for patience (default 3) epochs in a row.
//   low_utilization      the share of an epoch spent waiting for data
//                        exceeded wait_share (default 0.7).
//
// Every rule is on by default with action WARN; a job's RuleConfig list
// changes parameters and actions, or switches rules off. A rule fires at most
// once per run. A RuleSet belongs to one run (one trial) and is not
// thread-safe.
#ifndef KENNEL_SERVICES_TRAINER_RULES_H_
#define KENNEL_SERVICES_TRAINER_RULES_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "google/protobuf/repeated_ptr_field.h"
#include "kennel/v1/trainer.pb.h"

namespace kennel::trainer {

// What a rule sees at the end of an epoch.
struct EpochSignal {
  int epoch = 0;  // 1-based
  double train_loss = 0;
  double valid_loss = 0;
  // Negative when not measured.
  double mean_abs_gradient = -1;
  // In [0, 1]; negative when not measured.
  double data_wait_share = -1;
};

class RuleSet {
 public:
  // Every default rule, action WARN.
  RuleSet();

  // The defaults changed by `configs`: INVALID_ARGUMENT for an unknown rule
  // name, an unknown parameter or a value out of range.
  static absl::StatusOr<RuleSet> Create(
      const google::protobuf::RepeatedPtrField<kennel::v1::RuleConfig>&
          configs);

  // Feeds one epoch and returns the rules that fired on it.
  std::vector<kennel::v1::RuleFired> Observe(const EpochSignal& signal);

  // True once a rule with action STOP has fired.
  bool stop_requested() const { return stop_requested_; }

  // The effective configuration, for the job record and tests.
  std::vector<kennel::v1::RuleConfig> configs() const;

 private:
  struct Rule {
    kennel::v1::RuleConfig config;  // params filled with defaults
    bool fired = false;
    double param(const std::string& key) const {
      return config.params().at(key);
    }
  };

  void Fire(Rule& rule, int epoch, std::string message,
            std::vector<kennel::v1::RuleFired>* out);

  // Keyed by rule name.
  std::map<std::string, Rule> rules_;
  std::vector<EpochSignal> history_;
  int overfit_streak_ = 0;
  bool stop_requested_ = false;
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_RULES_H_
