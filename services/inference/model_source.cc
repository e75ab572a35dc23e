#include "services/inference/model_source.h"

#include <glog/logging.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/names.h"
#include "common/status.h"

namespace kennel::inference {
namespace {

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string VersionKey(const kennel::v1::ModelVersion& v) {
  std::string key = absl::StrCat(v.name(), ":", v.version());
  for (const auto& c : v.components()) absl::StrAppend(&key, ",", c.digest());
  return key;
}

// The component that serves: the version's model, not a backbone or head.
const kennel::v1::Component* ModelComponent(
    const kennel::v1::ModelVersion& version) {
  const kennel::v1::Component* model = nullptr;
  for (const auto& c : version.components()) {
    if (c.role() == kennel::v1::COMPONENT_ROLE_MODEL) model = &c;
  }
  return model;
}

}  // namespace

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

absl::Status RegistrySource::OpenCache() {
  ASSIGN_OR_RETURN(cache_, BlobCache::Open(options_.cache_dir));
  return absl::OkStatus();
}

absl::Status RegistrySource::ServeLastGood() {
  if (cache_ == nullptr) RETURN_IF_ERROR(OpenCache());
  ASSIGN_OR_RETURN(std::optional<kennel::v1::ModelVersion> remembered,
                   cache_->ReadLastGood(options_.client.address, options_.ref));
  if (!remembered.has_value()) {
    return absl::NotFoundError(absl::StrCat(
        "no version of ", options_.ref, " from ", options_.client.address,
        " has served from ", options_.cache_dir, " before"));
  }
  const std::string described =
      absl::StrCat(remembered->name(), ":", remembered->version());
  ModelCandidate candidate;
  RETURN_IF_ERROR(MakeCandidate(*remembered, &candidate));
  const std::string path = cache_->BlobPath(candidate.digest);
  if (!FileExists(path)) {
    return absl::NotFoundError(
        absl::StrCat(described, ", the last version of ", options_.ref,
                     " that served, is no longer in the cache (", path, ")"));
  }
  candidate.path = path;
  LOG(INFO) << "loading " << described << ", the last version of "
            << options_.ref << " that served, from the cache, before asking "
            << options_.client.address << " for the current one";
  const absl::Status loaded = manager_->Load(candidate);
  // The cached file is damaged: drop it so the registry's copy replaces it.
  if (absl::IsDataLoss(loaded)) std::remove(path.c_str());
  return loaded;
}

void RegistrySource::Run() {
  if (options_.on_thread_start) options_.on_thread_start();
  if (absl::Status s = OpenCache(); !s.ok()) {
    LOG(ERROR) << "the model cache " << options_.cache_dir
               << " cannot be used: " << s;
  } else if (s = ServeLastGood();
             absl::IsNotFound(s) || absl::IsFailedPrecondition(s)) {
    LOG(INFO) << s.message() << "; waiting for the registry";
  } else if (!s.ok()) {
    LOG(WARNING) << "the last version of " << options_.ref
                 << " that served is not serving after this restart: " << s;
  }
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
        manager_->SetWaitingFor(absl::StrCat(
            "the registry at ", options_.client.address, " has no version of ",
            options_.ref, " (push one, or check --model)"));
        continue;
      }
      manager_->SetWaitingFor("");
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
      manager_->SetWaitingFor(
          absl::StrCat("the registry at ", options_.client.address,
                       " cannot be followed: ", watch->status().message()));
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
  if (cache_ == nullptr) RETURN_IF_ERROR(OpenCache());
  const std::string path = cache_->BlobPath(component.digest());
  if (FileExists(path)) return path;
  const std::string ref = absl::StrCat(version.name(), ":", version.version());
  LOG(INFO) << "downloading " << ref << " (" << component.size()
            << " bytes) into " << path;
  RETURN_IF_ERROR(client_.PullComponent(ref, component.digest(), path));
  return path;
}

absl::Status RegistrySource::MakeCandidate(
    const kennel::v1::ModelVersion& version, ModelCandidate* candidate) const {
  candidate->source = options_.ref;
  candidate->name = version.name();
  candidate->version = version.version();
  candidate->labels.assign(version.labels().begin(), version.labels().end());
  if (version.has_preprocessing()) {
    candidate->preprocessing = version.preprocessing();
  }
  candidate->manifest_precision = version.precision();
  candidate->aliases.assign(version.aliases().begin(), version.aliases().end());
  const kennel::v1::Component* model = ModelComponent(version);
  if (model == nullptr) {
    return absl::InvalidArgumentError(
        "the version has no model component (a backbone or head alone "
        "cannot serve)");
  }
  if (!model->format().empty() && model->format() != "torchscript") {
    return absl::InvalidArgumentError(
        absl::StrCat("the model component's format is \"", model->format(),
                     "\"; only torchscript can serve"));
  }
  RETURN_IF_ERROR(ValidateDigest(model->digest()));
  candidate->digest = model->digest();
  return absl::OkStatus();
}

void RegistrySource::Handle(const kennel::v1::ModelVersion& version) {
  const std::string key = VersionKey(version);
  if (key == last_handled_) return;
  last_handled_ = key;

  ModelCandidate candidate;
  if (absl::Status s = MakeCandidate(version, &candidate); !s.ok()) {
    manager_->RecordFailure(candidate, s);
    return;
  }
  if (auto current = manager_->Current();
      current != nullptr && current->name == candidate.name &&
      current->version == candidate.version &&
      current->digest == candidate.digest) {
    return;  // already serving it (the watch restarted, or it was restored)
  }
  absl::StatusOr<std::string> path = Fetch(version, *ModelComponent(version));
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
  if (!loaded.ok()) return;
  // A restart serves this version until the registry offers one that loads.
  if (absl::Status s =
          cache_->SaveLastGood(options_.client.address, options_.ref, version);
      !s.ok()) {
    LOG(WARNING) << "cannot remember " << candidate.name << ":"
                 << candidate.version << " as the last version of "
                 << options_.ref << " that served: " << s;
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
