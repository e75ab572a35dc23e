#include "services/inference/model_source.h"

#include <glog/logging.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/names.h"
#include "common/status.h"

namespace kennel::inference {
namespace {

absl::Status MakeDirs(const std::string& path) {
  std::string partial;
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    partial += std::string(part) + "/";
    if (part.empty()) continue;
    if (mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::InternalError(
          absl::StrCat("cannot create ", partial, ": ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string VersionKey(const kennel::v1::ModelVersion& v) {
  std::string key = absl::StrCat(v.name(), ":", v.version());
  for (const auto& c : v.components()) absl::StrAppend(&key, ",", c.digest());
  return key;
}

}  // namespace

std::string BlobCachePath(const std::string& cache_dir,
                          const std::string& digest) {
  absl::string_view hex = digest;
  absl::ConsumePrefix(&hex, "sha256:");
  return absl::StrCat(cache_dir, "/sha256/", hex);
}

RegistrySource::RegistrySource(Options options, ModelManager* manager)
    : options_(std::move(options)),
      manager_(manager),
      client_(options_.client) {}

RegistrySource::~RegistrySource() { Stop(); }

void RegistrySource::Start() {
  thread_ = std::thread([this] { Run(); });
}

void RegistrySource::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    if (watch_ != nullptr) watch_->Cancel();
  }
  if (thread_.joinable()) thread_.join();
}

void RegistrySource::Run() {
  if (options_.on_thread_start) options_.on_thread_start();
  absl::Duration backoff = absl::Milliseconds(250);
  const absl::Duration max_backoff = absl::Seconds(10);
  while (true) {
    ModelWatch* watch;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      watch_ = client_.Watch(options_.ref);
      watch = watch_.get();
    }
    kennel::v1::WatchModelResponse response;
    while (watch->Next(&response)) {
      backoff = absl::Milliseconds(250);
      if (!response.has_model()) {
        LOG(WARNING) << options_.ref
                     << " points at no version; the current model (if any) "
                        "keeps serving";
        continue;
      }
      Handle(response.model());
      absl::MutexLock lock(&mu_);
      if (stopping_) break;
    }
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      LOG(WARNING) << "watch of " << options_.ref << " on "
                   << options_.client.address << " ended: " << watch->status()
                   << "; watching again in " << backoff;
      // Waits for the backoff or for Stop, whichever comes first.
      mu_.AwaitWithTimeout(
          absl::Condition(
              +[](bool* stopping) { return *stopping; }, &stopping_),
          backoff);
      if (stopping_) return;
    }
    backoff = std::min(backoff * 2, max_backoff);
  }
}

absl::StatusOr<std::string> RegistrySource::Fetch(
    const kennel::v1::ModelVersion& version,
    const kennel::v1::Component& component) {
  RETURN_IF_ERROR(ValidateDigest(component.digest()));
  const std::string path =
      BlobCachePath(options_.cache_dir, component.digest());
  if (FileExists(path)) return path;
  RETURN_IF_ERROR(MakeDirs(options_.cache_dir + "/sha256"));
  const std::string ref = absl::StrCat(version.name(), ":", version.version());
  LOG(INFO) << "downloading " << ref << " (" << component.size()
            << " bytes) into " << path;
  RETURN_IF_ERROR(client_.PullComponent(ref, component.digest(), path));
  return path;
}

void RegistrySource::Handle(const kennel::v1::ModelVersion& version) {
  const std::string key = VersionKey(version);
  if (key == last_handled_) return;
  last_handled_ = key;

  ModelCandidate candidate;
  candidate.source = options_.ref;
  candidate.name = version.name();
  candidate.version = version.version();
  candidate.labels.assign(version.labels().begin(), version.labels().end());
  if (version.has_preprocessing()) {
    candidate.preprocessing = version.preprocessing();
  }
  candidate.manifest_precision = version.precision();
  candidate.aliases.assign(version.aliases().begin(), version.aliases().end());

  const kennel::v1::Component* model = nullptr;
  for (const auto& c : version.components()) {
    if (c.role() == kennel::v1::COMPONENT_ROLE_MODEL) model = &c;
  }
  if (model == nullptr) {
    manager_->RecordFailure(
        candidate, absl::InvalidArgumentError(
                       "the version has no model component (a backbone or "
                       "head alone cannot serve)"));
    return;
  }
  if (!model->format().empty() && model->format() != "torchscript") {
    manager_->RecordFailure(
        candidate, absl::InvalidArgumentError(absl::StrCat(
                       "the model component's format is \"", model->format(),
                       "\"; only torchscript can serve")));
    return;
  }
  candidate.digest = model->digest();
  if (auto current = manager_->Current();
      current != nullptr && current->name == candidate.name &&
      current->version == candidate.version &&
      current->digest == candidate.digest) {
    return;  // already serving it (the watch restarted)
  }
  absl::StatusOr<std::string> path = Fetch(version, *model);
  if (!path.ok()) {
    manager_->RecordFailure(candidate, path.status());
    // A download that failed for a passing reason is tried again when the
    // watch reports the version again (after a re-watch).
    last_handled_.clear();
    return;
  }
  candidate.path = *path;
  absl::Status loaded = manager_->Load(candidate);
  if (absl::IsDataLoss(loaded)) {
    // The cached file is damaged: drop it so the next attempt downloads.
    std::remove(path->c_str());
    last_handled_.clear();
  }
}

LocalFileSource::LocalFileSource(
    ModelCandidate candidate, ModelManager* manager,
    std::function<void()> on_thread_start,
    std::function<void(const absl::Status&)> on_done)
    : candidate_(std::move(candidate)),
      manager_(manager),
      on_thread_start_(std::move(on_thread_start)),
      on_done_(std::move(on_done)) {}

LocalFileSource::~LocalFileSource() { Stop(); }

void LocalFileSource::Start() {
  thread_ = std::thread([this] {
    if (on_thread_start_) on_thread_start_();
    const absl::Status status = manager_->Load(candidate_);
    if (on_done_) on_done_(status);
  });
}

void LocalFileSource::Stop() {
  if (thread_.joinable()) thread_.join();
}

}  // namespace kennel::inference
