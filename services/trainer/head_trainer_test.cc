#include "services/trainer/head_trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace kennel::trainer {
namespace {

// Three Gaussian blobs in 8 dimensions: separable, so a head learns them.
std::shared_ptr<FeatureSet> Blobs(int per_class = 40, float scale = 1.0f) {
  auto data = std::make_shared<FeatureSet>();
  data->num_classes = 3;
  data->feature_dim = 8;
  torch::manual_seed(7);
  auto make = [&](int n) {
    FeatureSplit split;
    torch::Tensor labels = torch::arange(3).repeat_interleave(n);
    torch::Tensor centres = torch::eye(3, 8) * 3;
    split.features =
        (centres.index_select(0, labels) + torch::randn({3 * n, 8})) * scale;
    split.labels = labels.to(torch::kInt64);
    return split;
  };
  data->train = make(per_class);
  data->valid = make(per_class / 2);
  data->test = make(per_class / 2);
  return data;
}

HeadConfig Config(uint64_t seed = 1) {
  HeadConfig c;
  c.learning_rate = 0.05;
  c.batch_size = 16;
  c.epochs = 4;
  c.seed = seed;
  return c;
}

TEST(HeadTrainerTest, SameSeedSameRunBitForBit) {
  HeadTrainer trainer(Blobs());
  auto a = trainer.Train(Config(3), nullptr, nullptr);
  auto b = trainer.Train(Config(3), nullptr, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(torch::equal(a->weights.weight, b->weights.weight));
  EXPECT_TRUE(torch::equal(a->weights.bias, b->weights.bias));
  ASSERT_EQ(a->epochs.size(), 4u);
  for (size_t i = 0; i < a->epochs.size(); ++i) {
    EXPECT_EQ(a->epochs[i].train_loss, b->epochs[i].train_loss);
    EXPECT_EQ(a->epochs[i].valid_loss, b->epochs[i].valid_loss);
  }
  auto c = trainer.Train(Config(4), nullptr, nullptr);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(torch::equal(a->weights.weight, c->weights.weight));
}

TEST(HeadTrainerTest, LearnsSeparableData) {
  HeadTrainer trainer(Blobs());
  auto run = trainer.Train(Config(), nullptr, nullptr);
  ASSERT_TRUE(run.ok());
  EXPECT_LT(run->epochs.back().train_loss, run->epochs.front().train_loss);
  EXPECT_GT(run->epochs.back().valid_accuracy, 0.9);
  EXPECT_GT(run->epochs.back().mean_abs_gradient, 1e-5);
  Evaluation test = HeadTrainer::Evaluate(run->weights, trainer.data().test);
  EXPECT_GT(test.accuracy, 0.9);
}

TEST(HeadTrainerTest, ZeroLearningRateIsRefused) {
  HeadTrainer trainer(Blobs());
  HeadConfig c = Config();
  c.learning_rate = 0;
  EXPECT_EQ(trainer.Train(c, nullptr, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  c = Config();
  c.batch_size = 0;
  EXPECT_EQ(trainer.Train(c, nullptr, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(HeadTrainerTest, RunsBeyondTheSizeBoundsAreRefused) {
  HeadConfig c = Config();
  c.epochs = 1000000000;
  absl::Status s = ValidateHeadConfig(c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()),
              ::testing::HasSubstr("epochs must be at most 10000"));
  c.epochs = 10001;
  EXPECT_EQ(ValidateHeadConfig(c).code(), absl::StatusCode::kInvalidArgument);
  c.epochs = 10000;
  EXPECT_TRUE(ValidateHeadConfig(c).ok());
  c.batch_size = 65537;
  s = ValidateHeadConfig(c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()),
              ::testing::HasSubstr("batch_size must be at most 65536"));
  c.batch_size = 65536;
  EXPECT_TRUE(ValidateHeadConfig(c).ok());
}

TEST(HeadTrainerTest, TinyFeaturesGiveTinyWeightGradients) {
  HeadTrainer trainer(Blobs(40, 1e-10f));
  auto run = trainer.Train(Config(), nullptr, nullptr);
  ASSERT_TRUE(run.ok());
  EXPECT_LT(run->epochs.back().mean_abs_gradient, 1e-7);
}

TEST(HeadTrainerTest, CallbackStopsAndCancelEndsAtStep) {
  HeadTrainer trainer(Blobs());
  auto stopped = trainer.Train(
      Config(),
      [](const EpochStats& s) {
        return s.epoch == 2 ? EpochDecision::kStop : EpochDecision::kContinue;
      },
      nullptr);
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->epochs.size(), 2u);
  EXPECT_TRUE(stopped->stopped);

  std::atomic<int> polls{0};
  auto cancelled =
      trainer.Train(Config(), nullptr, [&] { return ++polls > 3; });
  ASSERT_TRUE(cancelled.ok());
  EXPECT_TRUE(cancelled->cancelled);
  EXPECT_TRUE(cancelled->epochs.empty());
}

TEST(HeadTrainerTest, ParallelTrialsMatchSequentialOnes) {
  HeadTrainer trainer(Blobs());
  std::vector<HeadConfig> configs;
  for (int i = 0; i < 4; ++i) {
    HeadConfig c = Config(i);
    c.learning_rate = 0.01 * (i + 1);
    c.batch_size = 8 << (i % 2);
    configs.push_back(c);
  }
  std::vector<torch::Tensor> sequential;
  for (const auto& c : configs) {
    sequential.push_back(trainer.Train(c, nullptr, nullptr)->weights.weight);
  }
  std::vector<torch::Tensor> parallel(configs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < configs.size(); ++i) {
    threads.emplace_back([&, i] {
      parallel[i] = trainer.Train(configs[i], nullptr, nullptr)->weights.weight;
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < configs.size(); ++i) {
    EXPECT_TRUE(torch::allclose(sequential[i], parallel[i], 1e-6, 1e-7)) << i;
  }
}

TEST(HeadTrainerTest, TraceRecordsInitAndOrder) {
  HeadTrainer trainer(Blobs());
  HeadTrace trace;
  auto run = trainer.Train(Config(5), nullptr, nullptr, &trace);
  ASSERT_TRUE(run.ok());
  HeadWeights init = HeadTrainer::InitialWeights(3, 8, 5);
  EXPECT_TRUE(torch::equal(trace.initial.weight, init.weight));
  ASSERT_EQ(trace.epoch_orders.size(), 4u);
  EXPECT_EQ(trace.epoch_orders[1], HeadTrainer::EpochOrder(120, 5, 2));
  EXPECT_EQ(trace.step_losses.size(), 4u * 8);  // 120 / 16 -> 8 steps
  // A permutation.
  std::vector<int64_t> sorted = trace.epoch_orders[0];
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 120; ++i) ASSERT_EQ(sorted[i], i);
}

}  // namespace
}  // namespace kennel::trainer
