#include "services/registry/chunk_index.h"

// OpenSSL 3 marks the SHA256_* functions deprecated in favour of EVP, but
// EVP does not expose the running state this file is about. Both run the
// same block function (SHA-NI where the CPU has it).
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kennel::registry {
namespace {

constexpr absl::string_view kMagic = "KNLCHK01";
constexpr int64_t kMinChunk = int64_t{64} << 10;
constexpr int64_t kMaxChunk = int64_t{64} << 20;
// Header: magic, chunk bytes, size, digest, state count.
constexpr size_t kHeaderBytes = 8 + 8 + 8 + 32 + 8;
constexpr size_t kTrailerBytes = 32;

void PutU64(std::string* out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) {
    out->push_back(static_cast<char>((v >> shift) & 0xff));
  }
}

uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

std::string Hex(const uint8_t* bytes, size_t n) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kHex[bytes[i] >> 4];
    out[2 * i + 1] = kHex[bytes[i] & 15];
  }
  return out;
}

// 64 hex digits -> 32 bytes; false when `hex` is not that.
bool Unhex(absl::string_view hex, uint8_t* out) {
  if (hex.size() != 64) return false;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < 32; ++i) {
    int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

absl::Status Damaged(absl::string_view why) {
  return absl::DataLossError(absl::StrCat("chunk index is damaged: ", why));
}

}  // namespace

struct ChainedSha256::Context {
  SHA256_CTX ctx;
};

ChainedSha256::ChainedSha256() : context_(std::make_unique<Context>()) {
  SHA256_Init(&context_->ctx);
}

ChainedSha256::~ChainedSha256() = default;

void ChainedSha256::Resume(const State& state, int64_t bytes) {
  SHA256_CTX& c = context_->ctx;
  SHA256_Init(&c);
  for (int i = 0; i < 8; ++i) {
    c.h[i] = static_cast<SHA_LONG>(state[4 * i]) << 24 |
             static_cast<SHA_LONG>(state[4 * i + 1]) << 16 |
             static_cast<SHA_LONG>(state[4 * i + 2]) << 8 |
             static_cast<SHA_LONG>(state[4 * i + 3]);
  }
  const uint64_t bits = static_cast<uint64_t>(bytes) * 8;
  c.Nl = static_cast<SHA_LONG>(bits & 0xffffffffu);
  c.Nh = static_cast<SHA_LONG>(bits >> 32);
  c.num = 0;
  bytes_ = bytes;
}

void ChainedSha256::Update(absl::string_view data) {
  SHA256_Update(&context_->ctx, data.data(), data.size());
  bytes_ += static_cast<int64_t>(data.size());
}

ChainedSha256::State ChainedSha256::state() const {
  State out;
  const SHA256_CTX& c = context_->ctx;
  for (int i = 0; i < 8; ++i) {
    out[4 * i] = static_cast<uint8_t>(c.h[i] >> 24);
    out[4 * i + 1] = static_cast<uint8_t>(c.h[i] >> 16);
    out[4 * i + 2] = static_cast<uint8_t>(c.h[i] >> 8);
    out[4 * i + 3] = static_cast<uint8_t>(c.h[i]);
  }
  return out;
}

std::string ChainedSha256::Digest() {
  uint8_t digest[SHA256_DIGEST_LENGTH];
  SHA256_Final(digest, &context_->ctx);
  return "sha256:" + Hex(digest, sizeof(digest));
}

int64_t ChunkIndex::StateCount(int64_t size, int64_t chunk_bytes) {
  if (size <= 0) return 0;
  return (size - 1) / chunk_bytes;
}

std::string ChunkIndex::Encode() const {
  std::string out(kMagic);
  PutU64(&out, static_cast<uint64_t>(chunk_bytes));
  PutU64(&out, static_cast<uint64_t>(size));
  uint8_t raw[32] = {0};
  Unhex(absl::string_view(digest).substr(std::min<size_t>(7, digest.size())),
        raw);
  out.append(reinterpret_cast<const char*>(raw), sizeof(raw));
  PutU64(&out, states.size());
  for (const ChainedSha256::State& state : states) {
    out.append(reinterpret_cast<const char*>(state.data()), state.size());
  }
  ChainedSha256 sum;
  sum.Update(out);
  const std::string trailer = sum.Digest();
  uint8_t trailer_raw[32];
  Unhex(absl::string_view(trailer).substr(7), trailer_raw);
  out.append(reinterpret_cast<const char*>(trailer_raw), sizeof(trailer_raw));
  return out;
}

absl::StatusOr<ChunkIndex> ChunkIndex::Decode(absl::string_view data) {
  if (data.size() < kHeaderBytes + kTrailerBytes ||
      data.substr(0, kMagic.size()) != kMagic) {
    return Damaged("not an index of this format");
  }
  const absl::string_view body = data.substr(0, data.size() - kTrailerBytes);
  ChainedSha256 sum;
  sum.Update(body);
  const std::string want = sum.Digest();
  if (Hex(reinterpret_cast<const uint8_t*>(data.data() + body.size()),
          kTrailerBytes) != absl::string_view(want).substr(7)) {
    return Damaged("its checksum does not match");
  }
  ChunkIndex index;
  const char* p = data.data() + kMagic.size();
  const uint64_t chunk_bytes = GetU64(p);
  const uint64_t size = GetU64(p + 8);
  const uint64_t count = GetU64(p + 48);
  if (chunk_bytes < kMinChunk || chunk_bytes > kMaxChunk ||
      chunk_bytes % 64 != 0 || size > (uint64_t{1} << 62)) {
    return Damaged("impossible chunk size or blob size");
  }
  index.chunk_bytes = static_cast<int64_t>(chunk_bytes);
  index.size = static_cast<int64_t>(size);
  if (count !=
          static_cast<uint64_t>(StateCount(index.size, index.chunk_bytes)) ||
      body.size() != kHeaderBytes + count * 32) {
    return Damaged("wrong number of chunk states");
  }
  index.digest = "sha256:" + Hex(reinterpret_cast<const uint8_t*>(p + 16), 32);
  index.states.resize(count);
  for (uint64_t k = 0; k < count; ++k) {
    memcpy(index.states[k].data(), data.data() + kHeaderBytes + k * 32, 32);
  }
  return index;
}

ChunkIndexBuilder::ChunkIndexBuilder(int64_t size, int64_t chunk_bytes)
    : size_(size), chunk_bytes_(chunk_bytes) {}

void ChunkIndexBuilder::Update(absl::string_view data) {
  while (!data.empty()) {
    const int64_t at = hash_.bytes();
    const int64_t to_boundary = chunk_bytes_ - at % chunk_bytes_;
    const size_t n = std::min<int64_t>(to_boundary, data.size());
    hash_.Update(data.substr(0, n));
    data.remove_prefix(n);
    const int64_t now = hash_.bytes();
    if (now % chunk_bytes_ == 0 && now < size_) {
      states_.push_back(hash_.state());
    }
  }
}

ChunkIndex ChunkIndexBuilder::Finish() {
  ChunkIndex index;
  index.chunk_bytes = chunk_bytes_;
  index.size = hash_.bytes();
  index.states = std::move(states_);
  index.digest = hash_.Digest();
  return index;
}

ChunkVerifier::ChunkVerifier(const ChunkIndex* index, int64_t first_chunk)
    : index_(index) {
  if (first_chunk > 0) {
    hash_.Resume(index_->states[first_chunk - 1],
                 first_chunk * index_->chunk_bytes);
  }
}

int64_t ChunkVerifier::next_length() const {
  if (done_) return 0;
  return std::min(index_->chunk_bytes, index_->size - hash_.bytes());
}

absl::Status ChunkVerifier::Check(absl::string_view chunk) {
  const int64_t offset = hash_.bytes();
  const int64_t number = offset / index_->chunk_bytes;
  auto corrupt = [&](absl::string_view what) {
    return absl::DataLossError(absl::StrCat(
        "blob ", index_->digest, " is corrupt in storage: ", what, " (chunk ",
        number, ", bytes ", offset, " to ",
        offset + static_cast<int64_t>(chunk.size()), " of ", index_->size,
        "); refusing to serve it. Push the model again to "
        "repair it."));
  };
  if (done_ || static_cast<int64_t>(chunk.size()) != next_length()) {
    return corrupt("the stored object has a different length");
  }
  hash_.Update(chunk);
  if (hash_.bytes() < index_->size) {
    if (hash_.state() != index_->states[number]) {
      return corrupt("the chunk does not hash as it did when it was pushed");
    }
    return absl::OkStatus();
  }
  done_ = true;
  const std::string digest = hash_.Digest();
  if (digest != index_->digest) {
    return corrupt(absl::StrCat("the blob hashes to ", digest));
  }
  return absl::OkStatus();
}

}  // namespace kennel::registry
