#include "common/sha256.h"

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace kennel {
namespace {

TEST(Sha256Test, KnownDigests) {
  EXPECT_EQ(Sha256Digest(""),
            "sha256:"
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 hash;
  hash.Update("a");
  hash.Update("bc");
  EXPECT_EQ(hash.HexDigest(), Sha256Hex("abc"));
}

TEST(Sha256Test, FilesOfEverySizeHashLikeTheirBytes) {
  char tmpl[] = "/tmp/kennel-sha256-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  std::mt19937 rng(1);
  // Around the size from which a second thread reads ahead.
  for (int64_t size :
       {int64_t{0}, int64_t{1}, int64_t{1} << 20, (int64_t{8} << 20) - 1,
        int64_t{8} << 20, (int64_t{20} << 20) + 3}) {
    std::string bytes(size, '\0');
    for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
    const std::string path = absl::StrCat(dir, "/f", size);
    std::ofstream(path, std::ios::binary) << bytes;
    int64_t got_size = -1;
    auto digest = Sha256File(path, &got_size);
    ASSERT_TRUE(digest.ok()) << digest.status();
    EXPECT_EQ(*digest, Sha256Digest(bytes)) << size;
    EXPECT_EQ(got_size, size);
  }
  EXPECT_TRUE(absl::IsNotFound(Sha256File(dir + "/absent").status()));
  EXPECT_FALSE(Sha256File(dir).ok());  // a folder
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kennel
