#include "services/trainer/search_space.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kennel::trainer {
namespace {

using kennel::v1::ParameterRange;

std::string Num(double v) { return absl::StrFormat("%g", v); }

// Bounds of the transformed interval that the unit interval maps onto.
void TransformedBounds(const ParamDef& p, double* lo, double* hi) {
  double a = p.min, b = p.max;
  if (p.kind == ParamKind::kInteger) {
    a -= 0.5;
    b += 0.5;
  }
  if (p.log) {
    a = std::log(a);
    b = std::log(b);
  }
  *lo = a;
  *hi = b;
}

bool IsWhole(double v) { return std::isfinite(v) && std::floor(v) == v; }

absl::Status Invalid(const std::string& name, const std::string& message) {
  return absl::InvalidArgumentError(
      absl::StrCat("search space: parameter \"", name, "\": ", message));
}

// Checks one value against what the trainer accepts for `name`.
absl::Status CheckValue(const std::string& name, double v) {
  if (!std::isfinite(v)) return Invalid(name, "values must be finite numbers");
  if (name == "learning_rate" && v <= 0) {
    return Invalid(
        name, absl::StrCat("the learning rate must be > 0 (got ", Num(v), ")"));
  }
  if (name == "weight_decay" && v < 0) {
    return Invalid(
        name, absl::StrCat("the weight decay must be >= 0 (got ", Num(v), ")"));
  }
  if (name == "batch_size" && (!IsWhole(v) || v < 1 || v > kMaxBatchSize)) {
    return Invalid(name,
                   absl::StrCat("a batch size must be a whole number in "
                                "1..",
                                Num(kMaxBatchSize), " (got ", Num(v), ")"));
  }
  if (name == "epochs" && (!IsWhole(v) || v < 1 || v > kMaxEpochs)) {
    return Invalid(name, absl::StrCat("epochs must be a whole number in 1..",
                                      Num(kMaxEpochs), " (got ", Num(v), ")"));
  }
  return absl::OkStatus();
}

bool IsIntegerParameter(const std::string& name) {
  return name == "batch_size" || name == "epochs";
}

absl::StatusOr<ParamDef> ParseRange(const ParameterRange& range) {
  const std::string& name = range.name();
  bool known = false;
  for (const char* tunable : kTunableParameters) known |= name == tunable;
  if (!known) {
    return absl::InvalidArgumentError(
        absl::StrCat("search space: unknown parameter \"", name,
                     "\"; tunable parameters "
                     "are ",
                     absl::StrJoin(kTunableParameters, ", ")));
  }
  ParamDef p;
  p.name = name;
  auto check_scale = [&](kennel::v1::Scale scale) -> absl::Status {
    if (!kennel::v1::Scale_IsValid(scale)) {
      return Invalid(name, absl::StrCat("unknown scale ", scale,
                                        "; use SCALE_LINEAR or SCALE_LOG"));
    }
    return absl::OkStatus();
  };
  switch (range.range_case()) {
    case ParameterRange::kContinuous: {
      if (IsIntegerParameter(name)) {
        return Invalid(name,
                       "takes an integer range or a categorical set, "
                       "not a continuous range");
      }
      const auto& c = range.continuous();
      if (absl::Status s = check_scale(c.scale()); !s.ok()) return s;
      p.kind = ParamKind::kContinuous;
      p.min = c.min();
      p.max = c.max();
      p.log = c.scale() == kennel::v1::SCALE_LOG;
      break;
    }
    case ParameterRange::kInteger: {
      if (!IsIntegerParameter(name)) {
        return Invalid(name,
                       "takes a continuous range or a categorical set, "
                       "not an integer range");
      }
      const auto& r = range.integer();
      if (absl::Status s = check_scale(r.scale()); !s.ok()) return s;
      p.kind = ParamKind::kInteger;
      p.min = static_cast<double>(r.min());
      p.max = static_cast<double>(r.max());
      p.log = r.scale() == kennel::v1::SCALE_LOG;
      break;
    }
    case ParameterRange::kCategorical: {
      p.kind = ParamKind::kCategorical;
      if (range.categorical().values().empty()) {
        return Invalid(name, "the categorical set is empty");
      }
      std::set<double> seen;
      for (double v : range.categorical().values()) {
        if (absl::Status s = CheckValue(name, v); !s.ok()) return s;
        if (!seen.insert(v).second) {
          return Invalid(name,
                         absl::StrCat("the categorical set repeats ", Num(v)));
        }
        p.values.push_back(v);
      }
      return p;
    }
    case ParameterRange::RANGE_NOT_SET:
      return Invalid(name,
                     "no range given: use a continuous or integer "
                     "range or a categorical set");
  }
  if (!std::isfinite(p.min) || !std::isfinite(p.max)) {
    return Invalid(name, "range bounds must be finite numbers");
  }
  if (p.min > p.max) {
    return Invalid(name, absl::StrCat("min ", Num(p.min),
                                      " is greater than "
                                      "max ",
                                      Num(p.max)));
  }
  if (p.kind == ParamKind::kContinuous && p.min == p.max) {
    return Invalid(
        name, absl::StrCat("the range [", Num(p.min), ", ", Num(p.max),
                           "] is empty; to fix the value set it in the base "
                           "hyperparameters instead"));
  }
  if (p.log && p.min <= 0) {
    return Invalid(name, absl::StrCat("a log scale needs min > 0 (got min ",
                                      Num(p.min), ")"));
  }
  if (absl::Status s = CheckValue(name, p.min); !s.ok()) return s;
  if (absl::Status s = CheckValue(name, p.max); !s.ok()) return s;
  return p;
}

}  // namespace

double ParamDef::FromUnit(double u) const {
  u = std::clamp(u, 0.0, 1.0);
  if (kind == ParamKind::kCategorical) {
    const int n = NumChoices();
    int index = static_cast<int>(std::floor(u * n));
    return values[std::clamp(index, 0, n - 1)];
  }
  double lo, hi;
  TransformedBounds(*this, &lo, &hi);
  double v = lo + u * (hi - lo);
  if (log) v = std::exp(v);
  if (kind == ParamKind::kInteger) v = std::round(v);
  // exp(log(x)) may land a hair outside [min, max].
  return std::clamp(v, min, max);
}

double ParamDef::ToUnit(double value) const {
  if (kind == ParamKind::kCategorical) {
    const int n = NumChoices();
    int best = 0;
    for (int i = 1; i < n; ++i) {
      if (std::abs(values[i] - value) < std::abs(values[best] - value))
        best = i;
    }
    return (best + 0.5) / n;
  }
  double lo, hi;
  TransformedBounds(*this, &lo, &hi);
  if (hi <= lo) return 0.5;
  double v = std::clamp(value, min, max);
  if (log) v = std::log(v);
  return std::clamp((v - lo) / (hi - lo), 0.0, 1.0);
}

int64_t ParamDef::NumIntegers() const {
  if (kind != ParamKind::kInteger) return 0;
  return static_cast<int64_t>(max - min) + 1;
}

std::string ParamDef::Describe() const {
  switch (kind) {
    case ParamKind::kCategorical: {
      std::vector<std::string> parts;
      for (double v : values) parts.push_back(Num(v));
      return absl::StrJoin(parts, ",");
    }
    case ParamKind::kInteger:
      return absl::StrCat(Num(min), "..", Num(max), log ? ":log" : "");
    case ParamKind::kContinuous:
      return absl::StrCat(Num(min), ":", Num(max), log ? ":log" : "");
  }
  return "";
}

absl::StatusOr<SearchSpace> SearchSpace::FromProto(
    const google::protobuf::RepeatedPtrField<kennel::v1::ParameterRange>&
        ranges) {
  SearchSpace space;
  std::set<std::string> names;
  for (const auto& range : ranges) {
    auto param = ParseRange(range);
    if (!param.ok()) return param.status();
    if (!names.insert(param->name).second) {
      return Invalid(param->name, "named more than once");
    }
    space.params_.push_back(*std::move(param));
  }
  return space;
}

int SearchSpace::IndexOf(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

kennel::v1::Hyperparameters SearchSpace::Apply(
    const Point& point, const kennel::v1::Hyperparameters& base) const {
  kennel::v1::Hyperparameters hp = base;
  for (size_t i = 0; i < params_.size() && i < point.size(); ++i) {
    const std::string& name = params_[i].name;
    const double v = point[i];
    if (name == "learning_rate") {
      hp.set_learning_rate(v);
    } else if (name == "weight_decay") {
      hp.set_weight_decay(v);
    } else if (name == "batch_size") {
      hp.set_batch_size(static_cast<int32_t>(std::llround(v)));
    } else if (name == "epochs") {
      hp.set_epochs(static_cast<int32_t>(std::llround(v)));
    }
  }
  return hp;
}

Point SearchSpace::Extract(const kennel::v1::Hyperparameters& hp) const {
  Point point;
  for (const ParamDef& p : params_) {
    if (p.name == "learning_rate") {
      point.push_back(hp.learning_rate());
    } else if (p.name == "weight_decay") {
      point.push_back(hp.weight_decay());
    } else if (p.name == "batch_size") {
      point.push_back(hp.batch_size());
    } else {
      point.push_back(hp.epochs());
    }
  }
  return point;
}

absl::StatusOr<TuneOptions> TuneOptionsFromRequest(
    const kennel::v1::TuneRequest& request) {
  TuneOptions options;
  if (!kennel::v1::SearchStrategy_IsValid(request.strategy())) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown search strategy ", request.strategy(),
                     "; use SEARCH_STRATEGY_RANDOM, SEARCH_STRATEGY_GRID or "
                     "SEARCH_STRATEGY_TPE"));
  }
  options.strategy = request.strategy();
  if (!kennel::v1::Objective_IsValid(request.objective())) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown objective ", request.objective(),
                     "; use OBJECTIVE_VALID_LOSS or OBJECTIVE_VALID_ACCURACY"));
  }
  options.objective = request.objective();
  if (request.max_trials() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_trials must be at least 1 (got ", request.max_trials(), ")"));
  }
  if (request.max_trials() > kMaxTrials) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_trials must be at most ", kMaxTrials, " (got ",
                     request.max_trials(), ")"));
  }
  options.max_trials = request.max_trials();
  if (request.max_parallel_trials() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_parallel_trials must be >= 0 (got ",
                     request.max_parallel_trials(), "); 0 means 1"));
  }
  options.max_parallel_trials =
      std::clamp(request.max_parallel_trials(), 1, options.max_trials);
  if (request.eta() < 0 || request.eta() == 1 || request.eta() > 100) {
    return absl::InvalidArgumentError(absl::StrCat(
        "eta must be in 2..100 (got ", request.eta(), "); 0 means 3"));
  }
  options.eta = request.eta() == 0 ? 3 : request.eta();
  options.early_stopping = request.early_stopping();
  options.seed = request.seed();
  if (request.space().empty()) {
    return absl::InvalidArgumentError(
        "the search space is empty: name at least one of learning_rate, "
        "weight_decay, batch_size, epochs");
  }
  auto space = SearchSpace::FromProto(request.space());
  if (!space.ok()) return space.status();
  options.space = *std::move(space);
  options.base = request.base();
  return options;
}

absl::StatusOr<ParameterFlag> ParseParameterFlag(const std::string& name,
                                                 const std::string& flag,
                                                 const std::string& text) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, "=", text, ": ", why,
        "; write a value (0.01), a set (64,128,256) or a range (0.001:0.1 or "
        "0.001:0.1:log)"));
  };
  auto number = [&](absl::string_view part, double* out) {
    return absl::SimpleAtod(absl::StripAsciiWhitespace(part), out) &&
           std::isfinite(*out);
  };
  const bool integer = IsIntegerParameter(name);
  ParameterFlag result;
  result.range.set_name(name);
  if (text.find(':') != std::string::npos) {
    std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
    if (parts.size() < 2 || parts.size() > 3)
      return bad("a range has 2 or 3 parts");
    double lo, hi;
    if (!number(parts[0], &lo) || !number(parts[1], &hi)) {
      return bad("range bounds must be numbers");
    }
    kennel::v1::Scale scale = kennel::v1::SCALE_LINEAR;
    if (parts.size() == 3) {
      const absl::string_view s = absl::StripAsciiWhitespace(parts[2]);
      if (s == "log") {
        scale = kennel::v1::SCALE_LOG;
      } else if (s != "linear" && s != "lin") {
        return bad(absl::StrCat("unknown scale \"", s, "\" (log or linear)"));
      }
    }
    if (integer) {
      if (!IsWhole(lo) || !IsWhole(hi))
        return bad("bounds must be whole numbers");
      auto* r = result.range.mutable_integer();
      r->set_min(static_cast<int64_t>(lo));
      r->set_max(static_cast<int64_t>(hi));
      r->set_scale(scale);
    } else {
      auto* r = result.range.mutable_continuous();
      r->set_min(lo);
      r->set_max(hi);
      r->set_scale(scale);
    }
    return result;
  }
  if (text.find(',') != std::string::npos) {
    auto* set = result.range.mutable_categorical();
    for (absl::string_view part : absl::StrSplit(text, ',')) {
      double v;
      if (!number(part, &v)) return bad("set members must be numbers");
      set->add_values(v);
    }
    return result;
  }
  if (!number(text, &result.value)) return bad("not a number");
  result.fixed = true;
  return result;
}

double ObjectiveCost(kennel::v1::Objective objective, double valid_loss,
                     double valid_accuracy) {
  const double cost = objective == kennel::v1::OBJECTIVE_VALID_ACCURACY
                          ? -valid_accuracy
                          : valid_loss;
  if (std::isnan(cost)) return std::numeric_limits<double>::infinity();
  return cost;
}

double CostToObjective(kennel::v1::Objective objective, double cost) {
  return objective == kennel::v1::OBJECTIVE_VALID_ACCURACY ? -cost : cost;
}

std::string ObjectiveName(kennel::v1::Objective objective) {
  return objective == kennel::v1::OBJECTIVE_VALID_ACCURACY ? "valid_accuracy"
                                                           : "valid_loss";
}

}  // namespace kennel::trainer
