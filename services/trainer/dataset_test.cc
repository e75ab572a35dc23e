#include "services/trainer/dataset.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kennel-dataset-test-XXXXXX";
    base_ = mkdtemp(tmpl);
    root_ = base_ + "/root";
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(base_); }

  void Touch(const std::string& relative, const std::string& bytes = "x") {
    const fs::path path = fs::path(root_) / relative;
    fs::create_directories(path.parent_path());
    std::ofstream(path) << bytes;
  }

  // A valid data set: 2 classes, 2/1/1 images per class.
  void MakeValid(const std::string& name) {
    for (const char* cls : {"001.Cat", "002.Dog"}) {
      Touch(name + "/train/" + cls + "/a.jpg");
      Touch(name + "/train/" + cls + "/b.PNG");
      Touch(name + "/valid/" + cls + "/c.jpg");
      Touch(name + "/test/" + cls + "/d.jpg");
    }
  }

  absl::StatusOr<Dataset> Scan(const std::string& path) {
    auto dir = ResolveUnderRoot(root_, path, "data set");
    if (!dir.ok()) return dir.status();
    return ScanImageFolder(*dir, root_);
  }

  std::string base_;
  std::string root_;
};

TEST(LabelTest, NumericPrefixIsDropped) {
  EXPECT_EQ(LabelFromFolder("001.Affenpinscher"), "Affenpinscher");
  EXPECT_EQ(LabelFromFolder("000.T-shirt_top"), "T-shirt_top");
  EXPECT_EQ(LabelFromFolder("cat"), "cat");
  EXPECT_EQ(LabelFromFolder("2020"), "2020");
}

TEST(LabelTest, ImageExtensions) {
  EXPECT_TRUE(HasImageExtension("a.JPG"));
  EXPECT_TRUE(HasImageExtension("a.webp"));
  EXPECT_FALSE(HasImageExtension("notes.txt"));
  EXPECT_FALSE(HasImageExtension("jpg"));
}

TEST_F(DatasetTest, ScansLayoutWithLabelsAndCounts) {
  MakeValid("pets");
  Touch("pets/train/001.Cat/readme.txt");
  auto dataset = Scan("pets");
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_THAT(dataset->labels, ::testing::ElementsAre("Cat", "Dog"));
  EXPECT_EQ(dataset->train.images.size(), 4u);
  EXPECT_EQ(dataset->valid.images.size(), 2u);
  EXPECT_EQ(dataset->test.images.size(), 2u);
  EXPECT_EQ(dataset->train.images[2].label, 1);
}

TEST_F(DatasetTest, MissingDataDirIsInvalidArgument) {
  auto dataset = Scan("nothing-here");
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dataset.status().message(), HasSubstr("does not exist"));
}

TEST_F(DatasetTest, PathOutsideRootIsRefused) {
  fs::create_directories(base_ + "/elsewhere");
  for (const std::string& path : {std::string("../elsewhere"),
                                  base_ + "/elsewhere", std::string("/etc")}) {
    auto dataset = Scan(path);
    EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument)
        << path;
    EXPECT_THAT(dataset.status().message(), HasSubstr("outside")) << path;
  }
}

TEST_F(DatasetTest, SymlinkOutOfRootIsRefused) {
  MakeValid("outside-set");
  fs::rename(fs::path(root_) / "outside-set", fs::path(base_) / "outside-set");
  fs::create_symlink(fs::path(base_) / "outside-set", fs::path(root_) / "link");
  auto dataset = Scan("link");
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dataset.status().message(), HasSubstr("outside"));
}

TEST_F(DatasetTest, SymlinkedImageOutOfRootIsRefused) {
  MakeValid("pets");
  std::ofstream(base_ + "/secret.jpg") << "x";
  fs::create_symlink(base_ + "/secret.jpg",
                     fs::path(root_) / "pets/train/001.Cat/secret.jpg");
  auto dataset = Scan("pets");
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dataset.status().message(), HasSubstr("outside"));
}

TEST_F(DatasetTest, MismatchedClassesAreNamed) {
  MakeValid("pets");
  Touch("pets/valid/003.Bird/x.jpg");
  auto dataset = Scan("pets");
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dataset.status().message(),
              HasSubstr("only in valid/: 003.Bird"));
}

TEST_F(DatasetTest, NoImagesIsInvalidArgument) {
  fs::create_directories(fs::path(root_) / "empty/train/001.Cat");
  fs::create_directories(fs::path(root_) / "empty/train/002.Dog");
  fs::create_directories(fs::path(root_) / "empty/valid/001.Cat");
  fs::create_directories(fs::path(root_) / "empty/valid/002.Dog");
  auto dataset = Scan("empty");
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dataset.status().message(), HasSubstr("no images"));
}

TEST_F(DatasetTest, ClassFolderThatIsNotUtf8IsInvalidArgument) {
  MakeValid("pets");
  for (const char* split : {"train", "valid", "test"}) {
    Touch(std::string("pets/") + split + "/003.Bad\xff\xfe/a.jpg");
  }
  auto dataset = Scan("pets");
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dataset.status().message(), HasSubstr("003.Bad\\xff\\xfe"));
  EXPECT_THAT(dataset.status().message(), HasSubstr("not valid UTF-8"));
}

TEST_F(DatasetTest, ClassFolderInOtherScriptsIsAccepted) {
  for (const char* cls :
       {"001.Chien_\xc3\xa9", "002.\xe7\x8a\xac", "003.\xf0\x9f\x90\x95"}) {
    for (const char* split : {"train", "valid"}) {
      Touch(std::string("pets/") + split + "/" + cls + "/a.jpg");
    }
  }
  auto dataset = Scan("pets");
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->labels[1], "\xe7\x8a\xac");
}

TEST_F(DatasetTest, MissingValidSplitIsInvalidArgument) {
  Touch("pets/train/001.Cat/a.jpg");
  Touch("pets/train/002.Dog/a.jpg");
  auto dataset = Scan("pets");
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dataset.status().message(), HasSubstr("no valid/"));
}

TEST_F(DatasetTest, NoDataRootRefusesLocalData) {
  auto dir = ResolveUnderRoot("", "pets", "data set");
  EXPECT_EQ(dir.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dir.status().message(), HasSubstr("--data-root"));
}

TEST(DatasetFromListingTest, SameRulesAsFolders) {
  auto dataset = DatasetFromListing(
      "/cache/x",
      {"train/001.Cat/a.jpg", "train/002.Dog/b.png", "valid/001.Cat/c.jpg",
       "valid/002.Dog/d.jpg", "train/002.Dog/notes.txt", "README.md"});
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_THAT(dataset->labels, ::testing::ElementsAre("Cat", "Dog"));
  EXPECT_EQ(dataset->train.images[1].path, "/cache/x/train/002.Dog/b.png");
  EXPECT_TRUE(dataset->test.images.empty());
  auto mismatched = DatasetFromListing(
      "/cache/x", {"train/001.Cat/a.jpg", "train/002.Dog/b.png",
                   "valid/001.Cat/c.jpg", "valid/003.Bird/d.jpg"});
  EXPECT_EQ(mismatched.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(mismatched.status().message(), HasSubstr("003.Bird"));
}

TEST(BadImageBudgetTest, FailsAboveShare) {
  BadImageBudget budget{0.1};
  EXPECT_TRUE(budget.Check("train", 100, {"a", "b"}).ok());
  absl::Status s = budget.Check("train", 10, {"a", "b"});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("2 of 10 images in train/"));
}

TEST_F(DatasetTest, FingerprintFollowsContent) {
  MakeValid("pets");
  auto dataset = Scan("pets");
  ASSERT_TRUE(dataset.ok());
  std::vector<std::string> digests(8, "sha256:aa");
  const std::string a = DatasetFingerprint(*dataset, digests);
  digests[3] = "sha256:bb";
  EXPECT_NE(a, DatasetFingerprint(*dataset, digests));
  EXPECT_EQ(a.rfind("sha256:", 0), 0u);
}

}  // namespace
}  // namespace kennel::trainer
