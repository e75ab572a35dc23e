#include "services/registry/chunk_index.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kennel::registry {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kChunk = int64_t{64} << 10;

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

ChunkIndex IndexOf(const std::string& bytes, int64_t chunk = kChunk) {
  ChunkIndexBuilder builder(bytes.size(), chunk);
  // Odd piece sizes, so boundaries fall inside pieces.
  for (size_t at = 0; at < bytes.size(); at += 10007) {
    builder.Update(absl::string_view(bytes).substr(at, 10007));
  }
  return builder.Finish();
}

// Checks `bytes` chunk by chunk from `first`; returns the first failure's
// chunk number, or -1 when every chunk passed.
int64_t FirstBadChunk(const ChunkIndex& index, const std::string& bytes,
                      int64_t first = 0) {
  ChunkVerifier verifier(&index, first);
  int64_t number = first;
  while (!verifier.done()) {
    const int64_t offset = verifier.offset();
    absl::Status s = verifier.Check(
        absl::string_view(bytes).substr(offset, verifier.next_length()));
    if (!s.ok()) {
      EXPECT_TRUE(absl::IsDataLoss(s)) << s;
      EXPECT_THAT(std::string(s.message()), HasSubstr("corrupt"));
      return number;
    }
    ++number;
  }
  return -1;
}

TEST(ChainedSha256Test, DigestMatchesPlainSha256AndResumes) {
  const std::string bytes = RandomBytes(300000, 1);
  ChainedSha256 whole;
  whole.Update(absl::string_view(bytes).substr(0, 1000));
  whole.Update(absl::string_view(bytes).substr(1000));
  EXPECT_EQ(whole.Digest(), Sha256Digest(bytes));

  // The state after a 64-byte-aligned prefix carries the rest.
  ChainedSha256 prefix;
  prefix.Update(absl::string_view(bytes).substr(0, 128 * 64));
  ChainedSha256 resumed;
  resumed.Resume(prefix.state(), 128 * 64);
  resumed.Update(absl::string_view(bytes).substr(128 * 64));
  EXPECT_EQ(resumed.Digest(), Sha256Digest(bytes));

  ChainedSha256 empty;
  EXPECT_EQ(empty.Digest(), Sha256Digest(""));
}

TEST(ChunkIndexTest, EverySizeRoundTripsAndVerifies) {
  for (int64_t size : {int64_t{0}, int64_t{1}, kChunk - 1, kChunk, kChunk + 1,
                       3 * kChunk, 3 * kChunk + 17}) {
    SCOPED_TRACE(absl::StrCat("size ", size));
    const std::string bytes = RandomBytes(size, 2);
    ChunkIndex index = IndexOf(bytes);
    EXPECT_EQ(index.digest, Sha256Digest(bytes));
    EXPECT_EQ(index.size, size);
    EXPECT_EQ(static_cast<int64_t>(index.states.size()),
              ChunkIndex::StateCount(size, kChunk));
    auto decoded = ChunkIndex::Decode(index.Encode());
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->digest, index.digest);
    EXPECT_EQ(decoded->size, size);
    EXPECT_EQ(decoded->chunk_bytes, kChunk);
    EXPECT_EQ(decoded->states, index.states);
    EXPECT_EQ(FirstBadChunk(*decoded, bytes), -1);
  }
}

TEST(ChunkIndexTest, CorruptChunkFailsAtThatChunk) {
  const std::string good = RandomBytes(4 * kChunk + 100, 3);
  const ChunkIndex index = IndexOf(good);
  for (int64_t chunk = 0; chunk < 5; ++chunk) {
    std::string bad = good;
    bad[chunk * kChunk + 7] ^= 1;
    EXPECT_EQ(FirstBadChunk(index, bad), chunk);
  }
  // A last chunk of the right length with other bytes fails on the digest.
  std::string bad_tail = good;
  bad_tail.back() ^= 0x80;
  EXPECT_EQ(FirstBadChunk(index, bad_tail), 4);

  // A chunk of the wrong length is refused without hashing it.
  ChunkVerifier verifier(&index);
  absl::Status s = verifier.Check(absl::string_view(good).substr(0, 100));
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("different length"));
}

TEST(ChunkIndexTest, VerificationCanStartAtAnyChunk) {
  const std::string bytes = RandomBytes(5 * kChunk + 3, 4);
  const ChunkIndex index = IndexOf(bytes);
  for (int64_t first = 0; first <= 5; ++first) {
    EXPECT_EQ(FirstBadChunk(index, bytes, first), -1) << first;
  }
  std::string bad = bytes;
  bad[2 * kChunk] ^= 1;
  EXPECT_EQ(FirstBadChunk(index, bad, 2), 2);
  EXPECT_EQ(FirstBadChunk(index, bad, 3), -1);
}

TEST(ChunkIndexTest, IndexOfOtherBytesFailsTheRead) {
  // An index that is intact but belongs to other bytes cannot make those
  // bytes pass: the digest check on the last chunk still catches them.
  const std::string bytes = RandomBytes(3 * kChunk, 5);
  const std::string other = RandomBytes(3 * kChunk, 6);
  ChunkIndex forged = IndexOf(other);
  forged.digest = Sha256Digest(bytes);
  EXPECT_EQ(FirstBadChunk(forged, other), 2);
  EXPECT_EQ(FirstBadChunk(forged, bytes), 0);
}

TEST(ChunkIndexTest, DamagedEncodingsAreDataLoss) {
  const std::string encoded = IndexOf(RandomBytes(3 * kChunk, 7)).Encode();
  for (size_t at = 0; at < encoded.size(); at += 13) {
    std::string bad = encoded;
    bad[at] ^= 0x10;
    EXPECT_TRUE(absl::IsDataLoss(ChunkIndex::Decode(bad).status())) << at;
  }
  for (size_t cut : {size_t{0}, size_t{8}, encoded.size() - 1}) {
    EXPECT_TRUE(
        absl::IsDataLoss(ChunkIndex::Decode(encoded.substr(0, cut)).status()))
        << cut;
  }
  EXPECT_TRUE(absl::IsDataLoss(ChunkIndex::Decode(encoded + "extra").status()));
  EXPECT_TRUE(absl::IsDataLoss(ChunkIndex::Decode("{\"json\": 1}").status()));
}

}  // namespace
}  // namespace kennel::registry
