#include "common/sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <deque>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

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

namespace {

// Files at least this large are read by a second thread while this one
// hashes, so reading (a copy out of the page cache, or the disk) and
// hashing overlap instead of taking turns.
constexpr int64_t kOverlapBytes = int64_t{8} << 20;
constexpr size_t kBlockBytes = 1 << 20;
constexpr size_t kBlocksAhead = 4;

absl::Status ReadError(const std::string& path, int err) {
  return absl::InternalError(
      absl::StrCat("cannot read ", path, ": ", strerror(err)));
}

// Reads `fd` to its end into blocks that the caller hashes in order.
class ReadAhead {
 public:
  ReadAhead(int fd, std::string path)
      : fd_(fd), path_(std::move(path)), thread_([this] { Run(); }) {}
  ~ReadAhead() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }

  // The next block (empty at the end) in `block`, whose previous contents
  // go back to be filled again.
  absl::Status Next(std::vector<char>* block) {
    absl::MutexLock lock(&mu_);
    if (!block->empty()) free_.push_back(std::move(*block));
    mu_.Await(absl::Condition(
        +[](ReadAhead* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->mu_) {
          return !r->full_.empty() || r->done_;
        },
        this));
    block->clear();
    if (!full_.empty()) {
      *block = std::move(full_.front());
      full_.pop_front();
      return absl::OkStatus();
    }
    return status_;
  }

 private:
  void Run() {
    while (true) {
      std::vector<char> block;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](ReadAhead* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->mu_) {
              return r->full_.size() < kBlocksAhead || r->stop_;
            },
            this));
        if (stop_) return;
        if (!free_.empty()) {
          block = std::move(free_.back());
          free_.pop_back();
        }
      }
      block.resize(kBlockBytes);
      ssize_t n;
      do {
        n = read(fd_, block.data(), block.size());
      } while (n < 0 && errno == EINTR);
      absl::MutexLock lock(&mu_);
      if (n <= 0) {
        if (n < 0) status_ = ReadError(path_, errno);
        done_ = true;
        return;
      }
      block.resize(static_cast<size_t>(n));
      full_.push_back(std::move(block));
    }
  }

  const int fd_;
  const std::string path_;
  absl::Mutex mu_;
  std::deque<std::vector<char>> full_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<char>> free_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;  // last: starts once the rest is ready
};

}  // namespace

absl::StatusOr<std::string> Sha256File(const std::string& path, int64_t* size) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return absl::Status(
        err == ENOENT ? absl::StatusCode::kNotFound
                      : absl::StatusCode::kInvalidArgument,
        absl::StrCat("cannot open ", path, ": ", strerror(err)));
  }
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } closer{fd};
  Sha256 hash;
  int64_t total = 0;
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
      st.st_size >= kOverlapBytes) {
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    ReadAhead reader(fd, path);
    std::vector<char> block;
    while (true) {
      absl::Status status = reader.Next(&block);
      if (!status.ok()) return status;
      if (block.empty()) break;
      hash.Update(block.data(), block.size());
      total += static_cast<int64_t>(block.size());
    }
  } else {
    std::vector<char> buffer(kBlockBytes);
    while (true) {
      ssize_t n = read(fd, buffer.data(), buffer.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return ReadError(path, errno);
      if (n == 0) break;
      hash.Update(buffer.data(), static_cast<size_t>(n));
      total += n;
    }
  }
  if (size != nullptr) *size = total;
  return hash.Digest();
}

}  // namespace kennel
