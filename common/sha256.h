// SHA-256 over streams and files (OpenSSL EVP), and the "sha256:<hex>" digest
// form that Kennel uses for blobs.
#ifndef KENNEL_COMMON_SHA256_H_
#define KENNEL_COMMON_SHA256_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kennel {

// Incremental hasher. One per stream; not safe to share between threads.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  void Update(absl::string_view data) { Update(data.data(), data.size()); }

  // 64 lowercase hex digits of everything fed so far. Ends the stream: call
  // Reset() before feeding more.
  std::string HexDigest();
  // "sha256:" + HexDigest().
  std::string Digest() { return "sha256:" + HexDigest(); }
  void Reset();

 private:
  struct Context;
  std::unique_ptr<Context> context_;
};

// "sha256:<hex>" of a byte string.
std::string Sha256Digest(absl::string_view data);
// 64 lowercase hex digits of a byte string.
std::string Sha256Hex(absl::string_view data);

// "sha256:<hex>" of a file's contents, read in 1 MiB pieces; `size` receives
// the number of bytes read when not null.
absl::StatusOr<std::string> Sha256File(const std::string& path,
                                       int64_t* size = nullptr);

}  // namespace kennel

#endif  // KENNEL_COMMON_SHA256_H_
