#include "common/names.h"

#include <gtest/gtest.h>

namespace kennel {
namespace {

TEST(NamesTest, AcceptsValidNames) {
  for (const char* name :
       {"a", "dogbreed", "resnet50-v2", "m.1_x", "0abc",
        "abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij012"}) {
    EXPECT_TRUE(ValidateName("model name", name).ok()) << name;
  }
}

TEST(NamesTest, RefusesNamesThatCouldEscapeOrConfuse) {
  for (const char* name :
       {"", "..", "../etc", "a/b", ".hidden", "-x", "_x", "Dog", "a b", "a\nb",
        "abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij0123"}) {
    absl::Status s = ValidateName("model name", name);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << name;
  }
}

TEST(NamesTest, ErrorEscapesHostileBytes) {
  absl::Status s = ValidateName("alias", std::string("x\x01\xff", 3));
  EXPECT_NE(std::string(s.message()).find("\\x01\\xff"), std::string::npos)
      << s.message();
}

TEST(ModelRefTest, ParsesTheThreeForms) {
  auto latest = ParseModelRef("dogs");
  ASSERT_TRUE(latest.ok());
  EXPECT_TRUE(latest->is_latest());
  EXPECT_EQ(latest->ToString(), "dogs");

  auto pinned = ParseModelRef("dogs:7");
  ASSERT_TRUE(pinned.ok());
  EXPECT_EQ(pinned->name, "dogs");
  EXPECT_EQ(pinned->version, 7);
  EXPECT_EQ(pinned->ToString(), "dogs:7");

  auto aliased = ParseModelRef("dogs@production");
  ASSERT_TRUE(aliased.ok());
  EXPECT_EQ(aliased->alias, "production");
  EXPECT_EQ(aliased->ToString(), "dogs@production");
}

TEST(ModelRefTest, RefusesMalformedRefs) {
  for (const char* ref : {"", "dogs:", "dogs:0", "dogs:-1", "dogs:x", "dogs@",
                          "dogs@Prod", "../x:1", "@prod", ":3"}) {
    EXPECT_EQ(ParseModelRef(ref).status().code(),
              absl::StatusCode::kInvalidArgument)
        << ref;
  }
}

TEST(DigestTest, AcceptsOnlySha256Hex) {
  std::string good = "sha256:" + std::string(64, 'a');
  EXPECT_TRUE(ValidateDigest(good).ok());
  EXPECT_FALSE(ValidateDigest("sha256:" + std::string(63, 'a')).ok());
  EXPECT_FALSE(ValidateDigest("sha256:" + std::string(64, 'A')).ok());
  EXPECT_FALSE(ValidateDigest("md5:" + std::string(64, 'a')).ok());
  EXPECT_FALSE(ValidateDigest("sha256:../" + std::string(61, 'a')).ok());
}

}  // namespace
}  // namespace kennel
