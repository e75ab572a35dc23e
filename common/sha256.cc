#include "common/sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <string.h>
#include <unistd.h>

#include <vector>

#include "absl/strings/str_cat.h"

namespace kennel {

struct Sha256::Context {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  ~Context() { EVP_MD_CTX_free(ctx); }
};

Sha256::Sha256() : context_(std::make_unique<Context>()) { Reset(); }
Sha256::~Sha256() = default;

void Sha256::Reset() {
  // Only fails on allocation failure, which would abort elsewhere anyway.
  EVP_DigestInit_ex(context_->ctx, EVP_sha256(), nullptr);
}

void Sha256::Update(const void* data, size_t size) {
  EVP_DigestUpdate(context_->ctx, data, size);
}

std::string Sha256::HexDigest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(context_->ctx, digest, &length);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(length * 2, '0');
  for (unsigned int i = 0; i < length; ++i) {
    out[2 * i] = kHex[digest[i] >> 4];
    out[2 * i + 1] = kHex[digest[i] & 15];
  }
  return out;
}

std::string Sha256Hex(absl::string_view data) {
  Sha256 hash;
  hash.Update(data);
  return hash.HexDigest();
}

std::string Sha256Digest(absl::string_view data) {
  return "sha256:" + Sha256Hex(data);
}

absl::StatusOr<std::string> Sha256File(const std::string& path, int64_t* size) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return absl::Status(
        err == ENOENT ? absl::StatusCode::kNotFound
                      : absl::StatusCode::kInvalidArgument,
        absl::StrCat("cannot open ", path, ": ", strerror(err)));
  }
  Sha256 hash;
  std::vector<char> buffer(1 << 20);
  int64_t total = 0;
  while (true) {
    ssize_t n = read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      return absl::InternalError(
          absl::StrCat("cannot read ", path, ": ", strerror(err)));
    }
    if (n == 0) break;
    hash.Update(buffer.data(), static_cast<size_t>(n));
    total += n;
  }
  close(fd);
  if (size != nullptr) *size = total;
  return hash.Digest();
}

}  // namespace kennel
