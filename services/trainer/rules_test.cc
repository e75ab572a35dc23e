#include "services/trainer/rules.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace kennel::trainer {
namespace {

using kennel::v1::RuleConfig;
using ::testing::HasSubstr;

google::protobuf::RepeatedPtrField<RuleConfig> Configs(
    std::vector<RuleConfig> list) {
  google::protobuf::RepeatedPtrField<RuleConfig> out;
  for (auto& c : list) *out.Add() = c;
  return out;
}

RuleConfig Config(
    const std::string& name, std::map<std::string, double> params,
    kennel::v1::RuleAction action = kennel::v1::RULE_ACTION_WARN) {
  RuleConfig c;
  c.set_name(name);
  c.set_action(action);
  for (auto& [k, v] : params) (*c.mutable_params())[k] = v;
  return c;
}

EpochSignal Signal(int epoch, double train, double valid, double grad = 1e-3,
                   double wait = 0.05) {
  return {epoch, train, valid, grad, wait};
}

std::vector<std::string> Names(const std::vector<kennel::v1::RuleFired>& f) {
  std::vector<std::string> out;
  for (const auto& e : f) out.push_back(e.rule());
  return out;
}

TEST(RulesTest, HealthyRunFiresNothing) {
  RuleSet rules;
  std::vector<std::string> fired;
  double train = 2.0, valid = 2.1;
  for (int epoch = 1; epoch <= 12; ++epoch) {
    train *= 0.9;
    valid *= 0.93;
    for (auto& name : Names(rules.Observe(Signal(epoch, train, valid)))) {
      fired.push_back(name);
    }
  }
  EXPECT_THAT(fired, ::testing::IsEmpty());
  EXPECT_FALSE(rules.stop_requested());
}

TEST(RulesTest, FlatLossFiresLossNotDecreasing) {
  auto rules = RuleSet::Create(
      Configs({Config("loss_not_decreasing", {{"num_steps", 2}})}));
  ASSERT_TRUE(rules.ok());
  EXPECT_TRUE(rules->Observe(Signal(1, 1.5, 1.5)).empty());
  EXPECT_TRUE(rules->Observe(Signal(2, 1.5, 1.5)).empty());
  auto fired = rules->Observe(Signal(3, 1.5, 1.5));
  ASSERT_THAT(Names(fired), ::testing::ElementsAre("loss_not_decreasing"));
  EXPECT_EQ(fired[0].epoch(), 3);
  EXPECT_EQ(fired[0].action(), kennel::v1::RULE_ACTION_WARN);
  // Once per run.
  EXPECT_TRUE(rules->Observe(Signal(4, 1.5, 1.5)).empty());
}

TEST(RulesTest, NanLossFiresAtOnce) {
  RuleSet rules;
  auto fired = rules.Observe(Signal(1, NAN, 1.0));
  EXPECT_THAT(Names(fired), ::testing::Contains("loss_not_decreasing"));
}

TEST(RulesTest, TinyGradientFiresVanishingGradient) {
  RuleSet rules;
  EXPECT_TRUE(rules.Observe(Signal(1, 2.0, 2.0, 1e-3)).empty());
  auto fired = rules.Observe(Signal(2, 1.0, 1.0, 1e-9));
  EXPECT_THAT(Names(fired), ::testing::ElementsAre("vanishing_gradient"));
  EXPECT_THAT(fired[0].message(), HasSubstr("below"));
}

TEST(RulesTest, UnmeasuredGradientStaysQuiet) {
  RuleSet rules;
  EXPECT_TRUE(rules.Observe(Signal(1, 2.0, 2.0, -1)).empty());
}

TEST(RulesTest, OverfitNeedsPatience) {
  auto rules = RuleSet::Create(Configs({Config("overfit", {{"patience", 2}})}));
  ASSERT_TRUE(rules.ok());
  EXPECT_TRUE(rules->Observe(Signal(1, 1.0, 1.0)).empty());
  EXPECT_TRUE(rules->Observe(Signal(2, 0.8, 1.1)).empty());
  EXPECT_TRUE(rules->Observe(Signal(3, 0.7, 0.9)).empty());  // streak broken
  EXPECT_TRUE(rules->Observe(Signal(4, 0.6, 1.0)).empty());
  EXPECT_THAT(Names(rules->Observe(Signal(5, 0.5, 1.2))),
              ::testing::ElementsAre("overfit"));
}

TEST(RulesTest, LowUtilizationAndStopAction) {
  auto rules =
      RuleSet::Create(Configs({Config("low_utilization", {{"wait_share", 0.5}},
                                      kennel::v1::RULE_ACTION_STOP)}));
  ASSERT_TRUE(rules.ok());
  EXPECT_TRUE(rules->Observe(Signal(1, 2.0, 2.0, 1e-3, 0.4)).empty());
  EXPECT_FALSE(rules->stop_requested());
  auto fired = rules->Observe(Signal(2, 1.0, 1.0, 1e-3, 0.8));
  EXPECT_THAT(Names(fired), ::testing::ElementsAre("low_utilization"));
  EXPECT_EQ(fired[0].action(), kennel::v1::RULE_ACTION_STOP);
  EXPECT_TRUE(rules->stop_requested());
}

TEST(RulesTest, DisabledRuleStaysQuiet) {
  RuleConfig off;
  off.set_name("vanishing_gradient");
  off.set_disabled(true);
  auto rules = RuleSet::Create(Configs({off}));
  ASSERT_TRUE(rules.ok());
  EXPECT_TRUE(rules->Observe(Signal(1, 2.0, 2.0, 0.0)).empty());
}

TEST(RulesTest, BadConfigsAreInvalidArgument) {
  EXPECT_EQ(RuleSet::Create(Configs({Config("nope", {})})).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto unknown_param =
      RuleSet::Create(Configs({Config("overfit", {{"num_steps", 3}})}));
  EXPECT_EQ(unknown_param.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown_param.status().message(), HasSubstr("patience"));
  auto negative = RuleSet::Create(
      Configs({Config("vanishing_gradient", {{"threshold", -1}})}));
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  auto fractional = RuleSet::Create(
      Configs({Config("loss_not_decreasing", {{"num_steps", 0.5}})}));
  EXPECT_EQ(fractional.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kennel::trainer
