#include "services/inference/blob_cache.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <fstream>
#include <set>
#include <string>

namespace kennel::inference {
namespace {

const std::string kHex(64, 'a');
const std::string kRegistry = "registry.example:50051";

class BlobCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kennel_blob_cache_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  void Write(const std::string& path, const std::string& text = "bytes") {
    std::ofstream(path) << text;
  }
  static bool Exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
  }
  static std::set<std::string> List(const std::string& dir) {
    std::set<std::string> names;
    if (DIR* d = opendir(dir.c_str())) {
      while (dirent* e = readdir(d)) {
        if (e->d_name[0] != '.') names.insert(e->d_name);
      }
      closedir(d);
    }
    return names;
  }

  static kennel::v1::ModelVersion Version(int64_t n) {
    kennel::v1::ModelVersion v;
    v.set_name("pets");
    v.set_version(n);
    v.add_labels("cat");
    v.add_labels("dog");
    v.add_aliases("production");
    v.set_precision(kennel::v1::PRECISION_BF16);
    v.mutable_preprocessing()->set_input_size(64);
    v.mutable_created_at()->set_seconds(1700000000 + n);
    auto* c = v.add_components();
    c->set_role(kennel::v1::COMPONENT_ROLE_MODEL);
    c->set_format("torchscript");
    c->set_digest("sha256:" + std::string(64, '0' + n % 10));
    c->set_size(123456789012 + n);
    return v;
  }

  std::string dir_;
};

TEST(BlobCacheNames, TempNamesAreTheDownloadPattern) {
  EXPECT_EQ(BlobCachePath("/c", "sha256:" + kHex), "/c/sha256/" + kHex);
  EXPECT_TRUE(IsTempBlobName(kHex + ".tmp-Ab12cZ"));
  EXPECT_FALSE(IsTempBlobName(kHex));
  EXPECT_FALSE(IsTempBlobName(kHex + ".tmp-Ab12c"));
  EXPECT_FALSE(IsTempBlobName(kHex + ".tmp-Ab12c/"));
  EXPECT_FALSE(IsTempBlobName(kHex + ".tmp-Ab12cZZ"));
  EXPECT_FALSE(IsTempBlobName(std::string(63, 'a') + ".tmp-Ab12cZ"));
  EXPECT_FALSE(IsTempBlobName(std::string(64, 'A') + ".tmp-Ab12cZ"));
  EXPECT_FALSE(IsTempBlobName("notes.tmp-Ab12cZ"));
  EXPECT_FALSE(IsTempBlobName(kHex + ".part"));
}

TEST_F(BlobCacheTest, OpenRemovesOnlyTheTempFilesCrashesLeft) {
  ASSERT_TRUE(BlobCache::Open(dir_).ok());  // makes the folders
  const std::string blobs = dir_ + "/sha256/";
  Write(blobs + kHex);                  // a finished blob
  Write(blobs + kHex + ".tmp-AbC123");  // a cut download
  Write(blobs + std::string(64, 'b') + ".tmp-zzzzzz");
  Write(blobs + "notes.tmp-AbC123");  // not a download
  Write(blobs + "README");
  ASSERT_EQ(mkdir((blobs + std::string(64, 'c') + ".tmp-dirdir").c_str(), 0755),
            0);  // not a file
  Write(dir_ + "/last-good/pets@production.json.tmp-Q1w2e3");
  Write(dir_ + "/last-good/pets@production.json");

  int removed = -1;
  auto cache = BlobCache::Open(dir_, &removed);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ(removed, 3);
  EXPECT_EQ(List(blobs),
            (std::set<std::string>{kHex, "notes.tmp-AbC123", "README",
                                   std::string(64, 'c') + ".tmp-dirdir"}));
  EXPECT_EQ(List(dir_ + "/last-good"),
            std::set<std::string>{"pets@production.json"});
}

TEST_F(BlobCacheTest, TempFilesAreKeptWhileAnotherProcessUsesTheCache) {
  // flock locks belong to open files, so a second Open in this process
  // stands for a second process.
  auto first = BlobCache::Open(dir_);
  ASSERT_TRUE(first.ok());
  const std::string temp = dir_ + "/sha256/" + kHex + ".tmp-live01";
  Write(temp);  // the first one's download in progress
  int removed = -1;
  auto second = BlobCache::Open(dir_, &removed);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(removed, 0);
  EXPECT_TRUE(Exists(temp));
  first->reset();
  // The second still holds the cache: still nothing removed.
  ASSERT_TRUE(BlobCache::Open(dir_, &removed).ok());
  EXPECT_EQ(removed, 0);
  EXPECT_TRUE(Exists(temp));
  second->reset();
  // Nobody else: the file belongs to a download that will never finish.
  auto third = BlobCache::Open(dir_, &removed);
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(removed, 1);
  EXPECT_FALSE(Exists(temp));
}

TEST_F(BlobCacheTest, OpenFailsClearlyWhereNoFolderCanBeMade) {
  Write(dir_ + "/file");
  auto cache = BlobCache::Open(dir_ + "/file/cache");
  EXPECT_FALSE(cache.ok());
  EXPECT_NE(cache.status().message().find("cannot create"), std::string::npos)
      << cache.status();
}

TEST_F(BlobCacheTest, LastGoodRoundTripsWithoutAliases) {
  auto cache = BlobCache::Open(dir_);
  ASSERT_TRUE(cache.ok());
  const kennel::v1::ModelVersion v = Version(7);
  ASSERT_TRUE((*cache)->SaveLastGood(kRegistry, "pets@production", v).ok());
  auto read = (*cache)->ReadLastGood(kRegistry, "pets@production");
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_TRUE(read->has_value());
  kennel::v1::ModelVersion expected = v;
  expected.clear_aliases();
  EXPECT_EQ((*read)->SerializeAsString(), expected.SerializeAsString())
      << (*read)->DebugString();
  // Only the state file is left: the temporary one was renamed.
  EXPECT_EQ(List(dir_ + "/last-good"),
            std::set<std::string>{"pets@production.json"});
}

TEST_F(BlobCacheTest, LaterVersionsReplaceTheRememberedOne) {
  auto cache = BlobCache::Open(dir_);
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE(
      (*cache)->SaveLastGood(kRegistry, "pets@production", Version(1)).ok());
  ASSERT_TRUE(
      (*cache)->SaveLastGood(kRegistry, "pets@production", Version(3)).ok());
  auto read = (*cache)->ReadLastGood(kRegistry, "pets@production");
  ASSERT_TRUE(read.ok() && read->has_value());
  EXPECT_EQ((*read)->version(), 3);
  EXPECT_EQ(List(dir_ + "/last-good").size(), 1u);
}

TEST_F(BlobCacheTest, EachRefHasItsOwnMemory) {
  auto cache = BlobCache::Open(dir_);
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE(
      (*cache)->SaveLastGood(kRegistry, "pets@production", Version(1)).ok());
  for (const std::string ref : {"pets", "pets@staging", "pets:1", "dogs"}) {
    auto read = (*cache)->ReadLastGood(kRegistry, ref);
    ASSERT_TRUE(read.ok()) << ref << ": " << read.status();
    EXPECT_FALSE(read->has_value()) << ref;
  }
  ASSERT_TRUE((*cache)->SaveLastGood(kRegistry, "pets", Version(2)).ok());
  EXPECT_EQ((*(*cache)->ReadLastGood(kRegistry, "pets@production"))->version(),
            1);
  EXPECT_EQ((*(*cache)->ReadLastGood(kRegistry, "pets"))->version(), 2);
}

TEST_F(BlobCacheTest, AnotherRegistrysVersionIsNotOffered) {
  auto cache = BlobCache::Open(dir_);
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE(
      (*cache)->SaveLastGood(kRegistry, "pets@production", Version(1)).ok());
  auto read = (*cache)->ReadLastGood("elsewhere:50051", "pets@production");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kFailedPrecondition)
      << read.status();
  EXPECT_NE(read.status().message().find(kRegistry), std::string::npos);
}

TEST_F(BlobCacheTest, AFileForAnotherRefOrDamagedIsAnError) {
  auto cache = BlobCache::Open(dir_);
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE(
      (*cache)->SaveLastGood(kRegistry, "pets@production", Version(1)).ok());
  // Copied by hand under another ref's name.
  ASSERT_EQ(std::system(("cp " + dir_ + "/last-good/pets@production.json " +
                         dir_ + "/last-good/pets@staging.json")
                            .c_str()),
            0);
  auto foreign = (*cache)->ReadLastGood(kRegistry, "pets@staging");
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kFailedPrecondition)
      << foreign.status();
  Write(dir_ + "/last-good/pets@production.json", "{\"ref\": \"pets@produ");
  auto damaged = (*cache)->ReadLastGood(kRegistry, "pets@production");
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss)
      << damaged.status();
  Write(dir_ + "/last-good/pets@production.json",
        "{\"registry\": \"" + kRegistry +
            "\", \"ref\": \"pets@production\", \"model\": {\"version\": "
            "\"seven\"}}");
  damaged = (*cache)->ReadLastGood(kRegistry, "pets@production");
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss)
      << damaged.status();
}

TEST_F(BlobCacheTest, RefsThatAreNotNamesAreRefused) {
  auto cache = BlobCache::Open(dir_);
  ASSERT_TRUE(cache.ok());
  for (const std::string ref : {"../../etc/passwd", "", "a/b", "PETS"}) {
    EXPECT_EQ((*cache)->SaveLastGood(kRegistry, ref, Version(1)).code(),
              absl::StatusCode::kInvalidArgument)
        << ref;
    EXPECT_EQ((*cache)->ReadLastGood(kRegistry, ref).status().code(),
              absl::StatusCode::kInvalidArgument)
        << ref;
  }
}

}  // namespace
}  // namespace kennel::inference
