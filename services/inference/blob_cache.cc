#include "services/inference/blob_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <glog/logging.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/names.h"
#include "common/status.h"

namespace kennel::inference {
namespace {

constexpr absl::string_view kTempInfix = ".tmp-";
// mkstemp replaces six X's.
constexpr size_t kTempSuffix = 6;

absl::Status Errno(absl::string_view what, const std::string& path) {
  const int err = errno;
  const std::string message =
      absl::StrCat("cannot ", what, " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(message);
  return absl::InternalError(message);
}

absl::Status MakeDirs(const std::string& path) {
  std::string partial;
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    partial += std::string(part) + "/";
    if (part.empty()) continue;
    if (mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      return Errno("create", partial);
    }
  }
  return absl::OkStatus();
}

// Whether `name` is `<base>.tmp-XXXXXX` with a base `is_base` accepts.
template <typename Pred>
bool IsTempOf(absl::string_view name, Pred is_base) {
  const size_t at = name.rfind(kTempInfix);
  if (at == absl::string_view::npos) return false;
  const absl::string_view suffix = name.substr(at + kTempInfix.size());
  if (suffix.size() != kTempSuffix) return false;
  for (char c : suffix) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c))) return false;
  }
  return is_base(name.substr(0, at));
}

bool IsHexDigestName(absl::string_view base) {
  if (base.size() != 64) return false;
  for (char c : base) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c)) &&
        !(c >= 'a' && c <= 'f')) {
      return false;
    }
  }
  return true;
}

bool IsStateName(absl::string_view base) {
  return absl::EndsWith(base, ".json");
}

// Unlinks the regular files in `dir` whose names `is_temp` accepts.
template <typename Pred>
int RemoveTempFiles(const std::string& dir, Pred is_temp) {
  int removed = 0;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return 0;
  std::vector<std::string> doomed;
  while (dirent* e = readdir(d)) {
    if (is_temp(absl::string_view(e->d_name))) doomed.push_back(e->d_name);
  }
  closedir(d);
  for (const std::string& name : doomed) {
    const std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (unlink(path.c_str()) == 0) {
      LOG(INFO) << "removed " << path << ", which a crash left half-written";
      ++removed;
    } else {
      LOG(WARNING) << "cannot remove " << path << ": " << std::strerror(errno);
    }
  }
  return removed;
}

// The state file for `ref`; refs are names, ':' and '@' only (names.h), so
// the ref itself is a safe file name.
absl::StatusOr<std::string> LastGoodPath(const std::string& dir,
                                         const std::string& ref) {
  RETURN_IF_ERROR(ParseModelRef(ref).status());
  return absl::StrCat(dir, "/last-good/", ref, ".json");
}

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& data) {
  std::string temp = path + ".tmp-XXXXXX";
  const int fd = mkstemp(temp.data());
  if (fd < 0) return Errno("create a temporary file beside", path);
  fchmod(fd, 0644);
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const absl::Status status = Errno("write", temp);
      close(fd);
      unlink(temp.c_str());
      return status;
    }
    done += static_cast<size_t>(n);
  }
  // The data must be on disk before the name points at it.
  if (fsync(fd) != 0 || close(fd) != 0) {
    const absl::Status status = Errno("write", temp);
    unlink(temp.c_str());
    return status;
  }
  if (rename(temp.c_str(), path.c_str()) != 0) {
    const absl::Status status = Errno("rename a temporary file to", path);
    unlink(temp.c_str());
    return status;
  }
  const std::string parent = path.substr(0, path.rfind('/'));
  if (const int dfd = open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return absl::OkStatus();
}

}  // namespace

std::string BlobCachePath(const std::string& cache_dir,
                          const std::string& digest) {
  absl::string_view hex = digest;
  absl::ConsumePrefix(&hex, "sha256:");
  return absl::StrCat(cache_dir, "/sha256/", hex);
}

bool IsTempBlobName(absl::string_view name) {
  return IsTempOf(name, IsHexDigestName);
}

absl::StatusOr<std::unique_ptr<BlobCache>> BlobCache::Open(
    const std::string& dir, int* removed) {
  if (removed != nullptr) *removed = 0;
  RETURN_IF_ERROR(MakeDirs(dir + "/sha256"));
  RETURN_IF_ERROR(MakeDirs(dir + "/last-good"));
  const std::string lock_path = dir + "/lock";
  const int fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("open", lock_path);
  // An exclusive lock means no other process uses this cache now, so every
  // temporary file in it belongs to a download that will never finish.
  // Otherwise another process may be downloading: leave them all.
  if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
    const int n =
        RemoveTempFiles(dir + "/sha256", IsTempBlobName) +
        RemoveTempFiles(dir + "/last-good", [](absl::string_view name) {
          return IsTempOf(name, IsStateName);
        });
    if (removed != nullptr) *removed = n;
  } else if (errno != EWOULDBLOCK) {
    const absl::Status status = Errno("lock", lock_path);
    close(fd);
    return status;
  }
  // Shared from here on (waits only while another process cleans up).
  while (flock(fd, LOCK_SH) != 0) {
    if (errno == EINTR) continue;
    const absl::Status status = Errno("lock", lock_path);
    close(fd);
    return status;
  }
  return std::unique_ptr<BlobCache>(new BlobCache(dir, fd));
}

BlobCache::BlobCache(std::string dir, int lock_fd)
    : dir_(std::move(dir)), lock_fd_(lock_fd) {}

BlobCache::~BlobCache() { close(lock_fd_); }

absl::Status BlobCache::SaveLastGood(
    const std::string& registry, const std::string& ref,
    const kennel::v1::ModelVersion& version) const {
  ASSIGN_OR_RETURN(const std::string path, LastGoodPath(dir_, ref));
  kennel::v1::ModelVersion stored = version;
  // Aliases move; what they pointed at then would be stale on a restart.
  stored.clear_aliases();
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string model_json;
  google::protobuf::Struct state;
  auto& fields = *state.mutable_fields();
  fields["registry"].set_string_value(registry);
  fields["ref"].set_string_value(ref);
  auto status =
      google::protobuf::util::MessageToJsonString(stored, &model_json, options);
  if (status.ok()) {
    status = google::protobuf::util::JsonStringToMessage(
        model_json, fields["model"].mutable_struct_value());
  }
  std::string state_json;
  options.add_whitespace = true;
  if (status.ok()) {
    status = google::protobuf::util::MessageToJsonString(state, &state_json,
                                                         options);
  }
  if (!status.ok()) {
    return absl::InternalError(
        absl::StrCat("cannot encode the manifest of ", version.name(), ":",
                     version.version(), ": ", status.ToString()));
  }
  return WriteFileAtomically(path, state_json);
}

absl::StatusOr<std::optional<kennel::v1::ModelVersion>> BlobCache::ReadLastGood(
    const std::string& registry, const std::string& ref) const {
  ASSIGN_OR_RETURN(const std::string path, LastGoodPath(dir_, ref));
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::nullopt;
    return Errno("read", path);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  google::protobuf::Struct state;
  if (const auto s =
          google::protobuf::util::JsonStringToMessage(text.str(), &state);
      !s.ok()) {
    return absl::DataLossError(
        absl::StrCat(path, " is not a JSON object: ", s.ToString()));
  }
  const auto& fields = state.fields();
  const auto stored_registry = fields.find("registry");
  const auto stored_ref = fields.find("ref");
  const auto model = fields.find("model");
  if (stored_registry == fields.end() || stored_ref == fields.end() ||
      model == fields.end() || !model->second.has_struct_value()) {
    return absl::DataLossError(
        absl::StrCat(path, " lacks the registry, the ref or the model"));
  }
  if (stored_ref->second.string_value() != ref) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, " belongs to ", stored_ref->second.string_value(),
                     ", not to ", ref));
  }
  if (stored_registry->second.string_value() != registry) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, " remembers a version from the registry at ",
        stored_registry->second.string_value(), ", not from ", registry));
  }
  std::string model_json;
  kennel::v1::ModelVersion version;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  if (const auto s = google::protobuf::util::MessageToJsonString(
          model->second.struct_value(), &model_json);
      !s.ok()) {
    return absl::DataLossError(absl::StrCat(path, ": ", s.ToString()));
  }
  if (const auto s = google::protobuf::util::JsonStringToMessage(
          model_json, &version, options);
      !s.ok()) {
    return absl::DataLossError(absl::StrCat(
        path, "'s \"model\" is not a model manifest: ", s.ToString()));
  }
  return version;
}

}  // namespace kennel::inference
