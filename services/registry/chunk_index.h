// Per-chunk check values for a blob, so a pull can verify every chunk just
// before it sends it, in the same single pass that checks the whole blob's
// sha256, instead of reading and hashing the blob once before sending it.
//
// The index of a blob holds SHA-256's running state (the eight chaining
// words) after every whole chunk, that is the state the blob's own digest
// computation is in at each chunk boundary. A reader hashes the blob as one
// stream, as it would to check its digest, and compares the running state
// with the index at each boundary before the chunk is released; the last
// chunk is released only when the finished digest equals the blob's
// digest. So a sequential read costs one hash pass, checks every chunk
// before it leaves, and still checks the digest named in the manifest: an
// index that does not belong to the blob makes the read fail, it cannot make
// wrong bytes pass. A read may also start at any chunk boundary by resuming
// from the state recorded there.
//
// Stored at blobs/sha256-chunks/<hex>, beside blobs/sha256/<hex>; a blob
// without one (pushed before indexes existed) is read the old way: hashed
// whole, then sent.
#ifndef KENNEL_SERVICES_REGISTRY_CHUNK_INDEX_H_
#define KENNEL_SERVICES_REGISTRY_CHUNK_INDEX_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kennel::registry {

// SHA-256 whose running state can be read at 64-byte boundaries and resumed
// from. Not thread-safe.
class ChainedSha256 {
 public:
  using State = std::array<uint8_t, 32>;

  ChainedSha256();
  ~ChainedSha256();
  ChainedSha256(const ChainedSha256&) = delete;
  ChainedSha256& operator=(const ChainedSha256&) = delete;

  // Continues a stream whose first `bytes` bytes (a multiple of 64) left
  // the hash in `state`.
  void Resume(const State& state, int64_t bytes);
  void Update(absl::string_view data);
  // Bytes hashed so far, resumed ones included.
  int64_t bytes() const { return bytes_; }
  // The running state; only meaningful when bytes() is a multiple of 64.
  State state() const;
  // "sha256:<hex>" of the whole stream. Ends the stream.
  std::string Digest();

 private:
  struct Context;
  std::unique_ptr<Context> context_;
  int64_t bytes_ = 0;
};

// The chunk size written by this registry: the size of the chunks the
// registry sends.
inline constexpr int64_t kIndexChunkBytes = int64_t{1} << 20;

struct ChunkIndex {
  // A multiple of 64, from 64 KiB to 64 MiB.
  int64_t chunk_bytes = kIndexChunkBytes;
  int64_t size = 0;
  std::string digest;  // "sha256:<hex>"
  // states[k]: the running state after (k + 1) * chunk_bytes bytes, for
  // every boundary strictly inside the blob (none for a blob of at most one
  // chunk).
  std::vector<ChainedSha256::State> states;

  // How many states a blob of `size` bytes has.
  static int64_t StateCount(int64_t size, int64_t chunk_bytes);

  // A compact binary form that ends with its own sha256, so a damaged index
  // is recognised as such.
  std::string Encode() const;
  // DATA_LOSS for anything that is not an intact index.
  static absl::StatusOr<ChunkIndex> Decode(absl::string_view data);
};

// Hashes a blob's bytes as they arrive (in pieces of any size) and records
// the running state at every chunk boundary.
class ChunkIndexBuilder {
 public:
  // `size` is the blob's declared size: no state is recorded at its end.
  explicit ChunkIndexBuilder(int64_t size,
                             int64_t chunk_bytes = kIndexChunkBytes);
  void Update(absl::string_view data);
  int64_t bytes() const { return hash_.bytes(); }
  // The digest of everything fed, and the index, valid when exactly `size`
  // bytes were fed. Call once.
  ChunkIndex Finish();

 private:
  const int64_t size_;
  const int64_t chunk_bytes_;
  ChainedSha256 hash_;
  std::vector<ChainedSha256::State> states_;
};

// Checks a blob chunk by chunk against its index and digest.
class ChunkVerifier {
 public:
  // `index` must describe the blob (its size and digest are the manifest's);
  // it must outlive the verifier. Starts at chunk `first_chunk`.
  explicit ChunkVerifier(const ChunkIndex* index, int64_t first_chunk = 0);
  // The next chunk's offset and length.
  int64_t offset() const { return hash_.bytes(); }
  int64_t next_length() const;
  bool done() const { return done_; }
  // Hashes `chunk`, which must be next_length() bytes, and checks it: OK when
  // it may be sent; DATA_LOSS (naming the chunk) when it must not.
  absl::Status Check(absl::string_view chunk);

 private:
  const ChunkIndex* const index_;
  ChainedSha256 hash_;
  bool done_ = false;
};

}  // namespace kennel::registry

#endif  // KENNEL_SERVICES_REGISTRY_CHUNK_INDEX_H_
