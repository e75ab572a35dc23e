#include "services/trainer/feature_cache.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;

// Entry format: magic, format version, dim (little-endian uint32 each), then
// dim float32 values.
constexpr char kMagic[4] = {'K', 'F', 'E', 'A'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = 12;

}  // namespace

FeatureCache::FeatureCache(std::string dir) : dir_(std::move(dir)) {}

std::string FeatureCache::Key(const FeatureKeyContext& context,
                              absl::string_view content_digest) {
  std::string preprocessing;
  {
    google::protobuf::io::StringOutputStream stream(&preprocessing);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    context.preprocessing.SerializeToCodedStream(&coded);
  }
  Sha256 hash;
  hash.Update(absl::StrCat("kennel-features-v", kFormatVersion, "\n"));
  hash.Update(context.backbone_digest);
  hash.Update("\n", 1);
  hash.Update(absl::StrCat(preprocessing.size(), ":"));
  hash.Update(preprocessing);
  hash.Update(
      absl::StrCat("\n", kennel::v1::Precision_Name(context.precision), "\n"));
  hash.Update(content_digest);
  return hash.HexDigest();
}

std::string FeatureCache::PathFor(const std::string& key) const {
  return absl::StrCat(dir_, "/", key.substr(0, 2), "/", key, ".feat");
}

std::optional<std::vector<float>> FeatureCache::Get(const std::string& key,
                                                    int dim) {
  if (dir_.empty()) {
    ++misses_;
    return std::nullopt;
  }
  const std::string path = PathFor(key);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ++misses_;
    return std::nullopt;
  }
  char header[kHeaderBytes];
  uint32_t version = 0, stored_dim = 0;
  std::vector<float> features(dim);
  const size_t want = sizeof(float) * static_cast<size_t>(dim);
  bool good = in.read(header, kHeaderBytes).good() &&
              std::memcmp(header, kMagic, 4) == 0;
  if (good) {
    std::memcpy(&version, header + 4, 4);
    std::memcpy(&stored_dim, header + 8, 4);
    good = version == kFormatVersion && stored_dim == uint32_t(dim) &&
           in.read(reinterpret_cast<char*>(features.data()), want).good() &&
           in.peek() == std::char_traits<char>::eof();
  }
  if (!good) {
    // A damaged entry would otherwise miss forever; drop it so the next Put
    // repairs it.
    std::error_code ec;
    fs::remove(path, ec);
    ++misses_;
    return std::nullopt;
  }
  ++hits_;
  return features;
}

absl::Status FeatureCache::Put(const std::string& key, const float* features,
                               int dim) {
  if (dir_.empty()) return absl::OkStatus();
  const std::string path = PathFor(key);
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  if (ec) {
    return absl::InternalError(absl::StrCat(
        "feature cache: cannot create folder for ", path, ": ", ec.message()));
  }
  // A process-wide counter keeps concurrent writers of one key apart. (No
  // thread_local generator: static TLS shrinks the stack that libraries
  // such as civetweb leave their threads.)
  static std::atomic<uint64_t> counter{0};
  const std::string tmp =
      absl::StrCat(path, ".tmp.", getpid(), ".", counter.fetch_add(1));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    char header[kHeaderBytes];
    std::memcpy(header, kMagic, 4);
    const uint32_t dim32 = dim;
    std::memcpy(header + 4, &kFormatVersion, 4);
    std::memcpy(header + 8, &dim32, 4);
    out.write(header, kHeaderBytes);
    out.write(reinterpret_cast<const char*>(features),
              sizeof(float) * static_cast<size_t>(dim));
    out.close();
    if (!out) {
      fs::remove(tmp, ec);
      return absl::InternalError(
          absl::StrCat("feature cache: cannot write ", tmp));
    }
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    return absl::InternalError(
        absl::StrCat("feature cache: cannot rename into ", path));
  }
  return absl::OkStatus();
}

}  // namespace kennel::trainer
