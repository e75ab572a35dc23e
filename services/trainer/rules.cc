#include "services/trainer/rules.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace kennel::trainer {
namespace {

using kennel::v1::RuleAction;
using kennel::v1::RuleConfig;
using kennel::v1::RuleFired;

constexpr char kLossNotDecreasing[] = "loss_not_decreasing";
constexpr char kVanishingGradient[] = "vanishing_gradient";
constexpr char kOverfit[] = "overfit";
constexpr char kLowUtilization[] = "low_utilization";

const std::map<std::string, std::map<std::string, double>>& Defaults() {
  static const auto* defaults =
      new std::map<std::string, std::map<std::string, double>>{
          {kLossNotDecreasing, {{"num_steps", 5}, {"diff_percent", 0.1}}},
          {kVanishingGradient, {{"threshold", 1e-7}}},
          {kOverfit, {{"patience", 3}}},
          {kLowUtilization, {{"wait_share", 0.7}}},
      };
  return *defaults;
}

absl::Status CheckParam(const std::string& rule, const std::string& key,
                        double value) {
  auto bad = [&](absl::string_view want) {
    return absl::InvalidArgumentError(
        absl::StrCat("rule ", rule, ": ", key, " = ", value,
                     " is invalid; it must be ", want));
  };
  if (!std::isfinite(value)) return bad("a finite number");
  if (key == "num_steps" || key == "patience") {
    if (value < 1 || value != std::floor(value)) return bad("an integer >= 1");
  } else if (key == "diff_percent") {
    if (value < 0) return bad(">= 0");
  } else if (key == "threshold") {
    if (value <= 0) return bad("> 0");
  } else if (key == "wait_share") {
    if (value <= 0 || value > 1) return bad("in (0, 1]");
  }
  return absl::OkStatus();
}

}  // namespace

RuleSet::RuleSet() {
  for (const auto& [name, params] : Defaults()) {
    Rule rule;
    rule.config.set_name(name);
    rule.config.set_action(kennel::v1::RULE_ACTION_WARN);
    for (const auto& [key, value] : params) {
      (*rule.config.mutable_params())[key] = value;
    }
    rules_.emplace(name, std::move(rule));
  }
}

absl::StatusOr<RuleSet> RuleSet::Create(
    const google::protobuf::RepeatedPtrField<RuleConfig>& configs) {
  RuleSet set;
  for (const RuleConfig& config : configs) {
    auto it = set.rules_.find(config.name());
    if (it == set.rules_.end()) {
      std::vector<std::string> names;
      for (const auto& [name, params] : Defaults()) names.push_back(name);
      return absl::InvalidArgumentError(
          absl::StrCat("unknown rule \"", config.name(), "\"; rules are ",
                       absl::StrJoin(names, ", ")));
    }
    if (!kennel::v1::RuleAction_IsValid(config.action())) {
      return absl::InvalidArgumentError(
          absl::StrCat("rule ", config.name(), ": unknown action"));
    }
    Rule& rule = it->second;
    const auto& defaults = Defaults().at(config.name());
    for (const auto& [key, value] : config.params()) {
      if (!defaults.count(key)) {
        std::vector<std::string> keys;
        for (const auto& [k, v] : defaults) keys.push_back(k);
        return absl::InvalidArgumentError(
            absl::StrCat("rule ", config.name(), " has no parameter \"", key,
                         "\"; its parameters are ", absl::StrJoin(keys, ", ")));
      }
      absl::Status s = CheckParam(config.name(), key, value);
      if (!s.ok()) return s;
      (*rule.config.mutable_params())[key] = value;
    }
    rule.config.set_action(config.action());
    rule.config.set_disabled(config.disabled());
  }
  return set;
}

std::vector<RuleConfig> RuleSet::configs() const {
  std::vector<RuleConfig> out;
  for (const auto& [name, rule] : rules_) out.push_back(rule.config);
  return out;
}

void RuleSet::Fire(Rule& rule, int epoch, std::string message,
                   std::vector<RuleFired>* out) {
  rule.fired = true;
  RuleFired fired;
  fired.set_rule(rule.config.name());
  fired.set_action(rule.config.action());
  fired.set_message(std::move(message));
  fired.set_epoch(epoch);
  if (rule.config.action() == kennel::v1::RULE_ACTION_STOP) {
    stop_requested_ = true;
  }
  out->push_back(std::move(fired));
}

std::vector<RuleFired> RuleSet::Observe(const EpochSignal& signal) {
  history_.push_back(signal);
  std::vector<RuleFired> out;
  auto active = [&](const char* name) -> Rule* {
    Rule& rule = rules_.at(name);
    return rule.config.disabled() || rule.fired ? nullptr : &rule;
  };

  if (Rule* rule = active(kLossNotDecreasing)) {
    const int steps = static_cast<int>(rule->param("num_steps"));
    const double diff = rule->param("diff_percent");
    if (!std::isfinite(signal.train_loss)) {
      Fire(*rule, signal.epoch,
           absl::StrFormat("training loss is %g at epoch %d", signal.train_loss,
                           signal.epoch),
           &out);
    } else if (static_cast<int>(history_.size()) > steps) {
      const double before = history_[history_.size() - 1 - steps].train_loss;
      const double improvement =
          before != 0 ? 100.0 * (before - signal.train_loss) / std::abs(before)
                      : 0.0;
      if (improvement < diff) {
        Fire(*rule, signal.epoch,
             absl::StrFormat(
                 "training loss went from %.6g to %.6g over the last %d "
                 "epoch(s): %.4g%% better, less than the %.4g%% required; "
                 "check the learning rate",
                 before, signal.train_loss, steps, improvement, diff),
             &out);
      }
    }
  }

  if (Rule* rule = active(kVanishingGradient)) {
    const double threshold = rule->param("threshold");
    if (signal.mean_abs_gradient >= 0 && signal.mean_abs_gradient < threshold) {
      Fire(*rule, signal.epoch,
           absl::StrFormat("mean absolute gradient %.3g is below %.3g at "
                           "epoch %d; the weights barely change",
                           signal.mean_abs_gradient, threshold, signal.epoch),
           &out);
    }
  }

  if (history_.size() >= 2) {
    const EpochSignal& prev = history_[history_.size() - 2];
    const bool diverging = signal.valid_loss > prev.valid_loss &&
                           signal.train_loss < prev.train_loss;
    overfit_streak_ = diverging ? overfit_streak_ + 1 : 0;
  }
  if (Rule* rule = active(kOverfit)) {
    const int patience = static_cast<int>(rule->param("patience"));
    if (overfit_streak_ >= patience) {
      Fire(*rule, signal.epoch,
           absl::StrFormat("validation loss rose while training loss fell for "
                           "%d epoch(s) in a row (valid %.6g, train %.6g)",
                           overfit_streak_, signal.valid_loss,
                           signal.train_loss),
           &out);
    }
  }

  if (Rule* rule = active(kLowUtilization)) {
    const double share = rule->param("wait_share");
    if (signal.data_wait_share > share) {
      Fire(*rule, signal.epoch,
           absl::StrFormat("%.0f%% of epoch %d was spent waiting for data "
                           "(limit %.0f%%); the compute is starved",
                           100 * signal.data_wait_share, signal.epoch,
                           100 * share),
           &out);
    }
  }
  return out;
}

}  // namespace kennel::trainer
