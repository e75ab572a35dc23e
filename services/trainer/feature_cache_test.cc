#include "services/trainer/feature_cache.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;

FeatureKeyContext Context() {
  FeatureKeyContext context;
  context.backbone_digest = "sha256:" + std::string(64, 'a');
  context.preprocessing.set_input_size(224);
  context.preprocessing.set_resize(256);
  context.preprocessing.add_mean(0.5f);
  context.precision = kennel::v1::PRECISION_FP32;
  return context;
}

TEST(FeatureCacheKeyTest, KeyDependsOnEveryInput) {
  const std::string content = "sha256:" + std::string(64, 'c');
  const std::string base = FeatureCache::Key(Context(), content);
  EXPECT_EQ(base.size(), 64u);
  EXPECT_EQ(base, FeatureCache::Key(Context(), content));

  FeatureKeyContext other_backbone = Context();
  other_backbone.backbone_digest = "sha256:" + std::string(64, 'b');
  EXPECT_NE(base, FeatureCache::Key(other_backbone, content));

  FeatureKeyContext other_size = Context();
  other_size.preprocessing.set_input_size(28);
  EXPECT_NE(base, FeatureCache::Key(other_size, content));

  FeatureKeyContext other_mean = Context();
  other_mean.preprocessing.set_mean(0, 0.4f);
  EXPECT_NE(base, FeatureCache::Key(other_mean, content));

  FeatureKeyContext bf16 = Context();
  bf16.precision = kennel::v1::PRECISION_BF16;
  EXPECT_NE(base, FeatureCache::Key(bf16, content));

  EXPECT_NE(base,
            FeatureCache::Key(Context(), "sha256:" + std::string(64, 'd')));
}

class FeatureCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kennel-cache-test-XXXXXX";
    dir_ = mkdtemp(tmpl);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_F(FeatureCacheTest, PutThenGetHits) {
  FeatureCache cache(dir_ + "/features");
  const std::string key = FeatureCache::Key(Context(), "sha256:x");
  EXPECT_FALSE(cache.Get(key, 3).has_value());
  const float values[3] = {1.5f, -2.0f, 3.25f};
  ASSERT_TRUE(cache.Put(key, values, 3).ok());
  auto got = cache.Get(key, 3);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, std::vector<float>({1.5f, -2.0f, 3.25f}));
  EXPECT_EQ(cache.hits(), 1);
  EXPECT_EQ(cache.misses(), 1);
  // Survives a new cache object over the same folder (a trainer restart).
  FeatureCache again(dir_ + "/features");
  EXPECT_TRUE(again.Get(key, 3).has_value());
}

TEST_F(FeatureCacheTest, WrongWidthOrDamagedEntryMisses) {
  FeatureCache cache(dir_);
  const std::string key = FeatureCache::Key(Context(), "sha256:y");
  const float values[2] = {1, 2};
  ASSERT_TRUE(cache.Put(key, values, 2).ok());
  EXPECT_FALSE(cache.Get(key, 3).has_value());
  ASSERT_TRUE(cache.Put(key, values, 2).ok());
  std::ofstream(cache.PathFor(key), std::ios::app) << "junk";
  EXPECT_FALSE(cache.Get(key, 2).has_value());
  EXPECT_FALSE(fs::exists(cache.PathFor(key)));
}

TEST(FeatureCacheDisabledTest, EmptyDirAlwaysMisses) {
  FeatureCache cache("");
  const float values[1] = {1};
  EXPECT_TRUE(cache.Put("k", values, 1).ok());
  EXPECT_FALSE(cache.Get("k", 1).has_value());
}

}  // namespace
}  // namespace kennel::trainer
