// On-disk cache of backbone features, one file per image, keyed by what
// determines the features: the backbone's digest, the preprocessing spec,
// the precision of the backbone pass and the image file's content digest.
// A renamed or moved image hits; an edited image, another backbone or
// another preprocessing misses. Head-mode epochs and every tuning trial read
// features from here instead of running the backbone again.
//
// Layout: <dir>/<key[0:2]>/<key>.feat, written to a temporary file and
// renamed, so a reader sees a whole entry or none. Thread-safe: entries are
// immutable once written and the counters are atomic.
#ifndef KENNEL_SERVICES_TRAINER_FEATURE_CACHE_H_
#define KENNEL_SERVICES_TRAINER_FEATURE_CACHE_H_

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kennel/v1/common.pb.h"

namespace kennel::trainer {

// What the features of one image depend on, apart from the image itself.
struct FeatureKeyContext {
  std::string backbone_digest;  // "sha256:<hex>" of the TorchScript file
  kennel::v1::Preprocessing preprocessing;
  // The precision the backbone pass ran in (FP32 or BF16; never AUTO).
  kennel::v1::Precision precision = kennel::v1::PRECISION_FP32;
};

class FeatureCache {
 public:
  // `dir` is created on first Put. An empty `dir` disables the cache: every
  // Get misses and Put does nothing.
  explicit FeatureCache(std::string dir);

  // The hex key of one image's features: sha256 over the context (the
  // preprocessing in its deterministic serialisation) and the content
  // digest of the image file.
  static std::string Key(const FeatureKeyContext& context,
                         absl::string_view content_digest);

  // The stored features when present and `dim` wide; nullopt on a miss. A
  // damaged entry (wrong size or magic) counts as a miss and is removed.
  std::optional<std::vector<float>> Get(const std::string& key, int dim);
  absl::Status Put(const std::string& key, const float* features, int dim);

  int64_t hits() const { return hits_.load(); }
  int64_t misses() const { return misses_.load(); }
  const std::string& dir() const { return dir_; }

  // Path of an entry (whether or not it exists).
  std::string PathFor(const std::string& key) const;

 private:
  const std::string dir_;
  std::atomic<int64_t> hits_{0};
  std::atomic<int64_t> misses_{0};
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_FEATURE_CACHE_H_
