#include "services/inference/model_manager.h"

#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <stdlib.h>

#include <algorithm>
#include <fstream>

#include "common/sha256.h"
#include "services/inference/fake_model.h"

namespace kennel::inference {
namespace {

using testing::FakeBehaviour;
using testing::FakeLoader;

class ModelManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kennel_manager_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  // A file the fake loader opens as a model with `classes` outputs.
  ModelCandidate Candidate(int64_t version, std::shared_ptr<FakeBehaviour> b,
                           int labels = 3) {
    const std::string path = dir_ + "/v" + std::to_string(version);
    std::ofstream(path) << "model bytes of version " << version;
    loader_.Add(path, {b, {}, ""});
    ModelCandidate c;
    c.source = "fake@prod";
    c.name = "fake";
    c.version = version;
    c.path = path;
    c.digest = *Sha256File(path);
    for (int i = 0; i < labels; ++i)
      c.labels.push_back("l" + std::to_string(i));
    return c;
  }

  ManagerOptions Options(
      kennel::v1::Precision precision = kennel::v1::PRECISION_FP32) {
    ManagerOptions o;
    o.precision = precision;
    o.synthetic_warmup_images = 4;
    o.warmup_batch_sizes = {1, 4};
    return o;
  }

  std::string dir_;
  FakeLoader loader_;
  prometheus::Registry registry_;
  InferenceMetrics metrics_{registry_};
};

TEST_F(ModelManagerTest, NothingServesBeforeTheFirstLoad) {
  ModelManager manager(&loader_, Options(), &metrics_);
  EXPECT_EQ(manager.Current(), nullptr);
  EXPECT_EQ(metrics_.model_ready.Value(), 0);
}

TEST_F(ModelManagerTest, LoadPublishesWithDigestAndWarmsUp) {
  auto b = std::make_shared<FakeBehaviour>();
  ModelManager manager(&loader_, Options(), &metrics_);
  int published = 0;
  manager.SetOnPublished([&](const LoadedModel&) { ++published; });
  const ModelCandidate c = Candidate(1, b);
  ASSERT_TRUE(manager.Load(c).ok());
  auto current = manager.Current();
  ASSERT_NE(current, nullptr);
  EXPECT_EQ(current->version, 1);
  EXPECT_EQ(current->digest, c.digest);
  EXPECT_EQ(current->labels.size(), 3u);
  EXPECT_EQ(current->precision, kennel::v1::PRECISION_FP32);
  EXPECT_EQ(published, 1);
  absl::MutexLock lock(&b->mu);
  // The fp32 check ran (4 images, batch 4), then the warm-up at 1 and 4.
  EXPECT_EQ(b->batch_sizes, (std::vector<int>{4, 1, 4}));
  EXPECT_EQ(metrics_.loads_success.Value(), 1);
  EXPECT_EQ(metrics_.model_ready.Value(), 1);
}

TEST_F(ModelManagerTest, SwapLeavesRequestsInFlightOnTheirVersion) {
  auto b1 = std::make_shared<FakeBehaviour>();
  auto b2 = std::make_shared<FakeBehaviour>();
  ModelManager manager(&loader_, Options(), &metrics_);
  ASSERT_TRUE(manager.Load(Candidate(1, b1)).ok());
  std::shared_ptr<const LoadedModel> held = manager.Current();  // a request
  ASSERT_TRUE(manager.Load(Candidate(2, b2)).ok());
  EXPECT_EQ(manager.Current()->version, 2);
  // The request still runs on version 1, which is alive until it lets go.
  EXPECT_EQ(held->version, 1);
  EXPECT_TRUE(
      held->model->Forward(std::vector<float>(3 * 224 * 224).data(), 1, 224)
          .ok());
  const int destroyed_before = b1->destroyed.load();
  held.reset();
  EXPECT_GT(b1->destroyed.load(), destroyed_before);
  EXPECT_EQ(metrics_.loads_success.Value(), 2);
}

TEST_F(ModelManagerTest, FailedLoadKeepsTheOldVersionServing) {
  auto b1 = std::make_shared<FakeBehaviour>();
  ModelManager manager(&loader_, Options(), &metrics_);
  ASSERT_TRUE(manager.Load(Candidate(1, b1)).ok());
  ModelCandidate broken;
  broken.name = "fake";
  broken.version = 3;
  broken.path = dir_ + "/not-torchscript";
  std::ofstream(broken.path) << "garbage";
  const absl::Status s = manager.Load(broken);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(manager.Current()->version, 1);
  const ManagerStatus status = manager.Status();
  EXPECT_EQ(status.last_failed_version, 3);
  EXPECT_NE(status.last_error.find("not a TorchScript"), std::string::npos)
      << status.last_error;
  EXPECT_EQ(metrics_.loads_failure.Value(), 1);
  EXPECT_EQ(metrics_.model_ready.Value(), 1);
}

TEST_F(ModelManagerTest, DigestMismatchIsRefused) {
  auto b = std::make_shared<FakeBehaviour>();
  ModelManager manager(&loader_, Options(), &metrics_);
  ASSERT_TRUE(manager.Load(Candidate(1, b)).ok());
  ModelCandidate c = Candidate(2, std::make_shared<FakeBehaviour>());
  c.digest = "sha256:" + std::string(64, '0');
  const absl::Status s = manager.Load(c);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("digest mismatch"), std::string::npos);
  EXPECT_EQ(manager.Current()->version, 1);
}

TEST_F(ModelManagerTest, OutputWidthMustMatchTheLabels) {
  auto b = std::make_shared<FakeBehaviour>();
  b->classes = 4;
  ModelManager manager(&loader_, Options(), &metrics_);
  const absl::Status s = manager.Load(Candidate(1, b, /*labels=*/3));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("outputs 4 values per image but has 3 labels"),
            std::string::npos)
      << s;
  EXPECT_EQ(manager.Current(), nullptr);
  EXPECT_EQ(metrics_.model_ready.Value(), 0);
}

TEST_F(ModelManagerTest, ForwardFailureDuringWarmUpIsRefused) {
  auto b = std::make_shared<FakeBehaviour>();
  b->forward_error = absl::InvalidArgumentError("shape mismatch");
  ModelManager manager(&loader_, Options(), &metrics_);
  EXPECT_FALSE(manager.Load(Candidate(1, b)).ok());
  EXPECT_EQ(manager.Current(), nullptr);
}

TEST_F(ModelManagerTest, LabelsAndPreprocessingFromTheFileWhenUnset) {
  auto b = std::make_shared<FakeBehaviour>();
  ModelCandidate c = Candidate(1, b, /*labels=*/0);
  loader_.Add(c.path,
              {b,
               {"cat", "dog", "fox"},
               R"({"input_size": 64, "resize_mode": "RESIZE_MODE_STRETCH",
                   "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})"});
  ModelManager manager(&loader_, Options(), &metrics_);
  ASSERT_TRUE(manager.Load(c).ok());
  auto current = manager.Current();
  EXPECT_EQ(current->labels, (std::vector<std::string>{"cat", "dog", "fox"}));
  EXPECT_EQ(current->preprocessing.input_size(), 64);
  EXPECT_EQ(current->preprocessing.resize_mode(),
            kennel::v1::RESIZE_MODE_STRETCH);
}

TEST_F(ModelManagerTest, NoLabelsAnywhereIsRefused) {
  ModelManager manager(&loader_, Options(), &metrics_);
  const absl::Status s =
      manager.Load(Candidate(1, std::make_shared<FakeBehaviour>(), 0));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelManagerTest, Bf16ServesWhenItAgreesWithFp32) {
  auto b = std::make_shared<FakeBehaviour>();
  ModelManager manager(&loader_, Options(kennel::v1::PRECISION_AUTO),
                       &metrics_);
  ASSERT_TRUE(manager.Load(Candidate(1, b)).ok());
  EXPECT_EQ(manager.Current()->precision, kennel::v1::PRECISION_BF16);
  EXPECT_DOUBLE_EQ(manager.Current()->bf16_agreement, 1.0);
}

TEST_F(ModelManagerTest, Bf16ThatDisagreesFallsBackToFp32) {
  auto b = std::make_shared<FakeBehaviour>();
  b->bf16_winner = 1;  // every top-1 answer differs
  ModelManager manager(&loader_, Options(kennel::v1::PRECISION_BF16),
                       &metrics_);
  ASSERT_TRUE(manager.Load(Candidate(1, b)).ok());
  EXPECT_EQ(manager.Current()->precision, kennel::v1::PRECISION_FP32);
  EXPECT_DOUBLE_EQ(manager.Current()->bf16_agreement, 0.0);
}

TEST_F(ModelManagerTest, PrecisionFollowsFlagsCpuAndManifest) {
  {
    ModelManager manager(&loader_, Options(kennel::v1::PRECISION_FP32),
                         &metrics_);
    ASSERT_TRUE(
        manager.Load(Candidate(1, std::make_shared<FakeBehaviour>())).ok());
    EXPECT_EQ(manager.Current()->precision, kennel::v1::PRECISION_FP32);
  }
  {
    // auto follows a manifest that says fp32.
    ModelManager manager(&loader_, Options(kennel::v1::PRECISION_AUTO),
                         &metrics_);
    ModelCandidate c = Candidate(2, std::make_shared<FakeBehaviour>());
    c.manifest_precision = kennel::v1::PRECISION_FP32;
    ASSERT_TRUE(manager.Load(c).ok());
    EXPECT_EQ(manager.Current()->precision, kennel::v1::PRECISION_FP32);
  }
  {
    // bf16 requested on a CPU without it.
    loader_.bf16_supported = false;
    ModelManager manager(&loader_, Options(kennel::v1::PRECISION_BF16),
                         &metrics_);
    ASSERT_TRUE(
        manager.Load(Candidate(3, std::make_shared<FakeBehaviour>())).ok());
    EXPECT_EQ(manager.Current()->precision, kennel::v1::PRECISION_FP32);
  }
}

TEST_F(ModelManagerTest, TuningCapsBatchesWhereLargerStopsPaying) {
  auto b = std::make_shared<FakeBehaviour>();
  b->cost = [](int batch) {
    return batch <= 4 ? absl::Milliseconds(10) : absl::Milliseconds(300);
  };
  ManagerOptions options = Options();
  options.tune_batch_size = true;
  options.max_batch_size = 8;
  ModelManager manager(&loader_, options, &metrics_);
  ASSERT_TRUE(manager.Load(Candidate(1, b)).ok());
  EXPECT_EQ(manager.Current()->max_batch_size, 4);
  absl::MutexLock lock(&b->mu);
  // Every power of two up to the maximum ran (once untimed, twice timed).
  EXPECT_EQ(std::count(b->batch_sizes.begin(), b->batch_sizes.end(), 8), 3);
}

TEST_F(ModelManagerTest, TuningKeepsTheMaximumWhenBiggerBatchesPay) {
  auto b = std::make_shared<FakeBehaviour>();
  b->cost = [](int) { return absl::Milliseconds(20); };
  ManagerOptions options = Options();
  options.tune_batch_size = true;
  options.max_batch_size = 6;
  ModelManager manager(&loader_, options, &metrics_);
  ASSERT_TRUE(manager.Load(Candidate(1, b)).ok());
  EXPECT_EQ(manager.Current()->max_batch_size, 6);
}

TEST_F(ModelManagerTest, ModelInfoGaugeNamesOnlyTheServingVersion) {
  ModelManager manager(&loader_, Options(), &metrics_);
  ASSERT_TRUE(
      manager.Load(Candidate(1, std::make_shared<FakeBehaviour>())).ok());
  ASSERT_TRUE(
      manager.Load(Candidate(2, std::make_shared<FakeBehaviour>())).ok());
  int series = 0;
  for (const auto& family : registry_.Collect()) {
    if (family.name != "kennel_inference_model_info") continue;
    for (const auto& metric : family.metric) {
      ++series;
      for (const auto& label : metric.label) {
        if (label.name == "version") {
          EXPECT_EQ(label.value, "2");
        }
        if (label.name == "precision") {
          EXPECT_EQ(label.value, "fp32");
        }
      }
      EXPECT_EQ(metric.gauge.value, 1);
    }
  }
  EXPECT_EQ(series, 1);
}

}  // namespace
}  // namespace kennel::inference
