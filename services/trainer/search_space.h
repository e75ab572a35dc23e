// The search space of a tuning job and the checks a TuneRequest must pass
// before any work starts. Torch-free, so it is cheap to test and the service
// can refuse a bad request without touching a backbone.
#ifndef KENNEL_SERVICES_TRAINER_SEARCH_SPACE_H_
#define KENNEL_SERVICES_TRAINER_SEARCH_SPACE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kennel/v1/trainer.pb.h"

namespace kennel::trainer {

// Upper bounds on one run's size, for a single training job and for every
// value a search space may span: beyond them a job would hold its slot for
// days or allocate without limit.
inline constexpr int kMaxBatchSize = 65536;
inline constexpr int kMaxEpochs = 10000;

// One value per parameter of a SearchSpace, in the space's order, in the
// parameter's own units (a learning rate of 0.01 is 0.01, a batch size of 128
// is 128).
using Point = std::vector<double>;

enum class ParamKind { kContinuous, kInteger, kCategorical };

// One tuned hyperparameter. Strategies work in a unit interval: FromUnit maps
// [0, 1] onto the range (on a log scale when `log`), so a uniform draw in the
// unit interval is a uniform (or log-uniform) draw of the parameter.
struct ParamDef {
  // "learning_rate", "weight_decay", "batch_size" or "epochs".
  std::string name;
  ParamKind kind = ParamKind::kContinuous;
  // Bounds of continuous and integer ranges.
  double min = 0;
  double max = 0;
  bool log = false;
  // Choices of a categorical set, in the order the request gave them.
  std::vector<double> values;

  // Continuous: min..max. Integer: each integer in min..max gets an equal
  // share of the unit interval (an equal share of its logarithm when `log`).
  // Categorical: the unit interval is cut into len(values) equal pieces.
  double FromUnit(double u) const;
  // The inverse of FromUnit; a categorical value maps to its piece's centre.
  double ToUnit(double value) const;
  // Choices of a categorical set; 0 otherwise.
  int NumChoices() const { return static_cast<int>(values.size()); }
  // Distinct integers of an integer range; 0 otherwise.
  int64_t NumIntegers() const;
  // "1e-3:0.1:log", "64,128,256", "1..8".
  std::string Describe() const;
};

// Names a ParameterRange may use.
inline constexpr const char* kTunableParameters[] = {
    "learning_rate", "weight_decay", "batch_size", "epochs"};

// The validated parameters of a tuning job. Immutable; safe to share.
class SearchSpace {
 public:
  SearchSpace() = default;

  // INVALID_ARGUMENT, naming the parameter, for an unknown or repeated name, a
  // missing or empty range, min > max, a log scale with min <= 0, a value the
  // trainer would refuse (learning rate <= 0, negative weight decay, batch
  // size or epochs < 1 or not whole), or a kind the parameter cannot take (a
  // continuous batch size).
  static absl::StatusOr<SearchSpace> FromProto(
      const google::protobuf::RepeatedPtrField<kennel::v1::ParameterRange>&
          ranges);

  const std::vector<ParamDef>& params() const { return params_; }
  size_t size() const { return params_.size(); }
  // Index of the parameter called `name`, or -1.
  int IndexOf(const std::string& name) const;

  // `base` with the tuned parameters set from `point`.
  kennel::v1::Hyperparameters Apply(
      const Point& point, const kennel::v1::Hyperparameters& base) const;
  // The tuned parameters' values in `hp`: the inverse of Apply.
  Point Extract(const kennel::v1::Hyperparameters& hp) const;

 private:
  std::vector<ParamDef> params_;
};

// A TuneRequest's search settings, validated, with defaults filled in.
struct TuneOptions {
  SearchSpace space;
  kennel::v1::Objective objective = kennel::v1::OBJECTIVE_VALID_LOSS;
  kennel::v1::SearchStrategy strategy = kennel::v1::SEARCH_STRATEGY_RANDOM;
  int max_trials = 0;
  // At least 1 and at most max_trials.
  int max_parallel_trials = 1;
  uint64_t seed = 0;
  bool early_stopping = false;
  // At least 2.
  int eta = 3;
  // Hyperparameters of every trial before the space's values are applied.
  kennel::v1::Hyperparameters base;
};

// Most trials one job may ask for.
inline constexpr int kMaxTrials = 1000;

// Validates everything in `request` that is about the search (space,
// objective, strategy, trial counts, eta) and returns it with defaults
// filled in. The JobSpec and the base hyperparameters' other checks belong to
// the trainer, which applies them to every trial's hyperparameters.
absl::StatusOr<TuneOptions> TuneOptionsFromRequest(
    const kennel::v1::TuneRequest& request);

// One hyperparameter as a person writes it on a command line.
struct ParameterFlag {
  // A single value: not tuned, it goes into the base hyperparameters.
  bool fixed = false;
  double value = 0;
  // Otherwise the range to search.
  kennel::v1::ParameterRange range;
};

// Parses "0.01" (fixed), "64,128,256" (a categorical set), "0.001:0.1" or
// "0.001:0.1:log" (a range: integer for batch_size and epochs, continuous
// otherwise). INVALID_ARGUMENT naming `flag` for anything else. The range
// itself is checked by SearchSpace::FromProto.
absl::StatusOr<ParameterFlag> ParseParameterFlag(const std::string& name,
                                                 const std::string& flag,
                                                 const std::string& text);

// The objective as a cost to minimise: the valid loss, or minus the valid
// accuracy. NaN (a diverged trial) becomes +infinity so it ranks last.
double ObjectiveCost(kennel::v1::Objective objective, double valid_loss,
                     double valid_accuracy);
// The reported value of a cost: the loss, or the accuracy.
double CostToObjective(kennel::v1::Objective objective, double cost);
// "valid_loss" or "valid_accuracy".
std::string ObjectiveName(kennel::v1::Objective objective);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_SEARCH_SPACE_H_
