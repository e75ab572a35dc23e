#include "services/trainer/search_space.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace kennel::trainer {
namespace {

using kennel::v1::ParameterRange;
using kennel::v1::TuneRequest;
using ::testing::HasSubstr;

ParameterRange Continuous(const std::string& name, double min, double max,
                          bool log = false) {
  ParameterRange r;
  r.set_name(name);
  r.mutable_continuous()->set_min(min);
  r.mutable_continuous()->set_max(max);
  r.mutable_continuous()->set_scale(log ? kennel::v1::SCALE_LOG
                                        : kennel::v1::SCALE_LINEAR);
  return r;
}

ParameterRange Integer(const std::string& name, int64_t min, int64_t max,
                       bool log = false) {
  ParameterRange r;
  r.set_name(name);
  r.mutable_integer()->set_min(min);
  r.mutable_integer()->set_max(max);
  r.mutable_integer()->set_scale(log ? kennel::v1::SCALE_LOG
                                     : kennel::v1::SCALE_LINEAR);
  return r;
}

ParameterRange Categorical(const std::string& name,
                           std::vector<double> values) {
  ParameterRange r;
  r.set_name(name);
  r.mutable_categorical();
  for (double v : values) r.mutable_categorical()->add_values(v);
  return r;
}

TuneRequest OriginalSearch() {
  TuneRequest request;
  *request.add_space() = Continuous("learning_rate", 0.001, 0.1, true);
  *request.add_space() = Continuous("weight_decay", 0, 1e-5);
  *request.add_space() = Categorical("batch_size", {64, 128, 256});
  request.set_max_trials(16);
  request.set_max_parallel_trials(4);
  return request;
}

absl::Status Check(const TuneRequest& request) {
  return TuneOptionsFromRequest(request).status();
}

std::string Msg(const TuneRequest& request) {
  return std::string(Check(request).message());
}

TEST(SearchSpaceTest, AcceptsTheOriginalSearchAndFillsDefaults) {
  auto options = TuneOptionsFromRequest(OriginalSearch());
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->space.size(), 3u);
  EXPECT_EQ(options->max_trials, 16);
  EXPECT_EQ(options->max_parallel_trials, 4);
  EXPECT_EQ(options->eta, 3);
  EXPECT_TRUE(options->space.params()[0].log);
  EXPECT_EQ(options->space.params()[2].kind, ParamKind::kCategorical);
}

TEST(SearchSpaceTest, ParallelTrialsDefaultToOneAndNeverExceedTrials) {
  TuneRequest request = OriginalSearch();
  request.set_max_parallel_trials(0);
  EXPECT_EQ(TuneOptionsFromRequest(request)->max_parallel_trials, 1);
  request.set_max_parallel_trials(64);
  EXPECT_EQ(TuneOptionsFromRequest(request)->max_parallel_trials, 16);
}

TEST(SearchSpaceTest, RefusesZeroTrials) {
  TuneRequest request = OriginalSearch();
  request.set_max_trials(0);
  absl::Status s = Check(request);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("max_trials must be at least 1"));
  request.set_max_trials(-3);
  EXPECT_EQ(Check(request).code(), absl::StatusCode::kInvalidArgument);
  request.set_max_trials(kMaxTrials + 1);
  EXPECT_EQ(Check(request).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SearchSpaceTest, RefusesUnknownStrategyAndObjective) {
  TuneRequest request = OriginalSearch();
  request.set_strategy(static_cast<kennel::v1::SearchStrategy>(7));
  absl::Status s = Check(request);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("unknown search strategy 7"));
  request = OriginalSearch();
  request.set_objective(static_cast<kennel::v1::Objective>(9));
  EXPECT_THAT(Msg(request), HasSubstr("unknown objective"));
}

TEST(SearchSpaceTest, RefusesMinGreaterThanMax) {
  TuneRequest request = OriginalSearch();
  *request.mutable_space(0) = Continuous("learning_rate", 0.1, 0.001, true);
  absl::Status s = Check(request);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"learning_rate\""));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("min 0.1 is greater than max 0.001"));
  *request.mutable_space(0) = Integer("epochs", 5, 2);
  EXPECT_THAT(Msg(request), HasSubstr("greater than max"));
}

TEST(SearchSpaceTest, RefusesEmptyRangesAndSets) {
  TuneRequest request = OriginalSearch();
  *request.mutable_space(1) = Continuous("weight_decay", 1e-5, 1e-5);
  absl::Status s = Check(request);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("is empty"));

  request = OriginalSearch();
  *request.mutable_space(2) = Categorical("batch_size", {});
  EXPECT_THAT(Msg(request), HasSubstr("categorical set is empty"));

  request = OriginalSearch();
  ParameterRange no_range;
  no_range.set_name("epochs");
  *request.add_space() = no_range;
  EXPECT_THAT(Msg(request), HasSubstr("no range given"));

  request = OriginalSearch();
  request.clear_space();
  EXPECT_THAT(Msg(request), HasSubstr("search space is empty"));
}

TEST(SearchSpaceTest, RefusesLogScaleWithMinNotPositive) {
  TuneRequest request = OriginalSearch();
  *request.mutable_space(1) = Continuous("weight_decay", 0, 1e-5, true);
  absl::Status s = Check(request);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("log scale needs min > 0"));
  *request.mutable_space(1) = Integer("batch_size", 0, 256, true);
  EXPECT_THAT(Msg(request), HasSubstr("log scale needs min > 0"));
}

TEST(SearchSpaceTest, RefusesUnknownAndRepeatedParameters) {
  TuneRequest request = OriginalSearch();
  *request.add_space() = Continuous("momentum", 0.1, 0.9);
  absl::Status s = Check(request);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("unknown parameter \"momentum\""));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("learning_rate, weight_decay"));

  request = OriginalSearch();
  *request.add_space() = Continuous("learning_rate", 0.01, 0.1);
  EXPECT_THAT(Msg(request), HasSubstr("named more than once"));
}

TEST(SearchSpaceTest, RefusesValuesTheTrainerWouldRefuse) {
  TuneRequest request = OriginalSearch();
  *request.mutable_space(0) = Continuous("learning_rate", 0, 0.1);
  EXPECT_THAT(Msg(request), HasSubstr("learning rate must be > 0"));
  *request.mutable_space(0) = Continuous("weight_decay", -1, 0.1);
  EXPECT_THAT(Msg(request), HasSubstr("weight decay must be >= 0"));
  *request.mutable_space(0) = Categorical("batch_size", {64, 0});
  EXPECT_THAT(Msg(request), HasSubstr("whole number"));
  *request.mutable_space(0) = Categorical("batch_size", {64, 96.5});
  EXPECT_THAT(Msg(request), HasSubstr("whole number"));
  *request.mutable_space(0) = Categorical("batch_size", {64, 64});
  EXPECT_THAT(Msg(request), HasSubstr("repeats 64"));
  *request.mutable_space(0) = Continuous("batch_size", 16, 256);
  EXPECT_THAT(Msg(request), HasSubstr("not a continuous range"));
  *request.mutable_space(0) = Integer("learning_rate", 1, 2);
  EXPECT_THAT(Msg(request), HasSubstr("not an integer range"));
  *request.mutable_space(0) = Continuous("learning_rate", 0.01, INFINITY);
  EXPECT_EQ(Check(request).code(), absl::StatusCode::kInvalidArgument);
  *request.mutable_space(0) = Categorical("learning_rate", {NAN});
  EXPECT_EQ(Check(request).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SearchSpaceTest, RefusesBadEtaAndNegativeParallelism) {
  TuneRequest request = OriginalSearch();
  request.set_eta(1);
  EXPECT_THAT(Msg(request), HasSubstr("eta must be in 2..100"));
  request.set_eta(0);
  request.set_max_parallel_trials(-1);
  EXPECT_THAT(Msg(request), HasSubstr("max_parallel_trials"));
}

TEST(ParamDefTest, LogRangeMapsUnitIntervalGeometrically) {
  ParamDef p;
  p.kind = ParamKind::kContinuous;
  p.min = 0.001;
  p.max = 0.1;
  p.log = true;
  EXPECT_NEAR(p.FromUnit(0), 0.001, 1e-15);
  EXPECT_NEAR(p.FromUnit(1), 0.1, 1e-15);
  EXPECT_NEAR(p.FromUnit(0.5), 0.01, 1e-12);
  for (double v : {0.001, 0.0042, 0.05, 0.1}) {
    EXPECT_NEAR(p.FromUnit(p.ToUnit(v)), v, v * 1e-9);
  }
}

TEST(ParamDefTest, IntegersGetEqualShares) {
  ParamDef p;
  p.kind = ParamKind::kInteger;
  p.min = 1;
  p.max = 4;
  std::vector<int> counts(5, 0);
  for (int i = 0; i < 400; ++i)
    ++counts[static_cast<int>(p.FromUnit((i + 0.5) / 400))];
  EXPECT_EQ(counts[0], 0);
  for (int v = 1; v <= 4; ++v) EXPECT_EQ(counts[v], 100) << v;
  for (int v = 1; v <= 4; ++v) EXPECT_EQ(p.FromUnit(p.ToUnit(v)), v);
  EXPECT_EQ(p.NumIntegers(), 4);
}

TEST(ParamDefTest, CategoricalPiecesAndRoundTrip) {
  ParamDef p;
  p.kind = ParamKind::kCategorical;
  p.values = {256, 64, 128};
  EXPECT_EQ(p.FromUnit(0.0), 256);
  EXPECT_EQ(p.FromUnit(0.5), 64);
  EXPECT_EQ(p.FromUnit(1.0), 128);
  for (double v : p.values) EXPECT_EQ(p.FromUnit(p.ToUnit(v)), v);
  EXPECT_EQ(p.Describe(), "256,64,128");
}

TEST(SearchSpaceTest, ApplyAndExtractAreInverses) {
  auto options = TuneOptionsFromRequest(OriginalSearch());
  ASSERT_TRUE(options.ok());
  kennel::v1::Hyperparameters base;
  base.set_epochs(5);
  base.set_seed(42);
  const Point point = {0.0123, 4e-6, 128};
  kennel::v1::Hyperparameters hp = options->space.Apply(point, base);
  EXPECT_DOUBLE_EQ(hp.learning_rate(), 0.0123);
  EXPECT_DOUBLE_EQ(hp.weight_decay(), 4e-6);
  EXPECT_EQ(hp.batch_size(), 128);
  EXPECT_EQ(hp.epochs(), 5);
  EXPECT_EQ(hp.seed(), 42u);
  EXPECT_EQ(options->space.Extract(hp), point);
}

TEST(ParameterFlagTest, ParsesValuesSetsAndRanges) {
  auto fixed = ParseParameterFlag("learning_rate", "lr", "0.01");
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  EXPECT_TRUE(fixed->fixed);
  EXPECT_DOUBLE_EQ(fixed->value, 0.01);

  auto log = ParseParameterFlag("learning_rate", "lr", "0.001:0.1:log");
  ASSERT_TRUE(log.ok());
  EXPECT_FALSE(log->fixed);
  EXPECT_EQ(log->range.name(), "learning_rate");
  EXPECT_DOUBLE_EQ(log->range.continuous().min(), 0.001);
  EXPECT_DOUBLE_EQ(log->range.continuous().max(), 0.1);
  EXPECT_EQ(log->range.continuous().scale(), kennel::v1::SCALE_LOG);

  auto wd = ParseParameterFlag("weight_decay", "weight-decay", "0:1e-5");
  ASSERT_TRUE(wd.ok());
  EXPECT_EQ(wd->range.continuous().scale(), kennel::v1::SCALE_LINEAR);
  EXPECT_DOUBLE_EQ(wd->range.continuous().max(), 1e-5);

  auto bs = ParseParameterFlag("batch_size", "batch-size", "64,128,256");
  ASSERT_TRUE(bs.ok());
  EXPECT_EQ(bs->range.categorical().values_size(), 3);

  auto epochs = ParseParameterFlag("epochs", "epochs", "2:8");
  ASSERT_TRUE(epochs.ok());
  EXPECT_EQ(epochs->range.integer().min(), 2);
  EXPECT_EQ(epochs->range.integer().max(), 8);
}

TEST(ParameterFlagTest, RefusesWhatItCannotRead) {
  for (const char* text :
       {"", "abc", "0.1:", "1:2:3:4", "0.1:1:cubic", "64,x"}) {
    auto parsed = ParseParameterFlag("learning_rate", "lr", text);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument)
        << text;
    EXPECT_THAT(std::string(parsed.status().message()), HasSubstr("--lr="))
        << text;
  }
  EXPECT_FALSE(ParseParameterFlag("batch_size", "batch-size", "16.5:64").ok());
}

TEST(ObjectiveTest, AccuracyIsNegatedAndNanRanksLast) {
  EXPECT_EQ(ObjectiveCost(kennel::v1::OBJECTIVE_VALID_LOSS, 0.5, 0.9), 0.5);
  EXPECT_EQ(ObjectiveCost(kennel::v1::OBJECTIVE_VALID_ACCURACY, 0.5, 0.9),
            -0.9);
  EXPECT_TRUE(
      std::isinf(ObjectiveCost(kennel::v1::OBJECTIVE_VALID_LOSS, NAN, 0)));
  EXPECT_EQ(CostToObjective(kennel::v1::OBJECTIVE_VALID_ACCURACY, -0.9), 0.9);
}

}  // namespace
}  // namespace kennel::trainer
