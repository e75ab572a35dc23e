// kennel-inference's local cache (--cache-dir):
//   DIR/sha256/<hex>             model files by digest, whole and verified
//   DIR/sha256/<hex>.tmp-XXXXXX  downloads in progress, or cut by a crash
//   DIR/last-good/<ref>.json     for each followed ref, the registry's
//                                address and the manifest of the last
//                                version that served
//   DIR/lock                     held (shared) by every process using DIR
// The last-good manifest lets a restart serve the version that worked while
// the registry is unreachable or its current version cannot serve.
#ifndef KENNEL_SERVICES_INFERENCE_BLOB_CACHE_H_
#define KENNEL_SERVICES_INFERENCE_BLOB_CACHE_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kennel/v1/common.pb.h"

namespace kennel::inference {

// The cache file for a blob: DIR/sha256/<hex>.
std::string BlobCachePath(const std::string& cache_dir,
                          const std::string& digest);

// Whether `name` is a download's temporary file, "<64 hex>.tmp-XXXXXX" (the
// name the registry client's PullComponent gives it).
bool IsTempBlobName(absl::string_view name);

class BlobCache {
 public:
  // Creates the folders and takes a shared lock on DIR/lock for the life of
  // the object. When no other process holds the lock, it first removes the
  // temporary files that downloads cut by a crash left behind (a live
  // process's download in progress is never touched); `removed` (optional)
  // receives how many.
  static absl::StatusOr<std::unique_ptr<BlobCache>> Open(
      const std::string& dir, int* removed = nullptr);
  ~BlobCache();
  BlobCache(const BlobCache&) = delete;
  BlobCache& operator=(const BlobCache&) = delete;

  const std::string& dir() const { return dir_; }
  std::string BlobPath(const std::string& digest) const {
    return BlobCachePath(dir_, digest);
  }

  // Remembers `version` as the last one that served `ref` of the registry
  // at `registry`, replacing the previous one atomically (a crash leaves
  // the old file or the new one).
  absl::Status SaveLastGood(const std::string& registry, const std::string& ref,
                            const kennel::v1::ModelVersion& version) const;
  // The version SaveLastGood remembered for exactly this ref of this
  // registry; nullopt when there is none. FAILED_PRECONDITION when the file
  // for `ref` names another registry (the same name there may be another
  // model); DATA_LOSS when it is damaged.
  absl::StatusOr<std::optional<kennel::v1::ModelVersion>> ReadLastGood(
      const std::string& registry, const std::string& ref) const;

 private:
  BlobCache(std::string dir, int lock_fd);

  const std::string dir_;
  const int lock_fd_;
};

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_BLOB_CACHE_H_
