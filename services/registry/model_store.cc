#include "services/registry/model_store.h"

#include <errno.h>
#include <fcntl.h>
#include <glog/logging.h>
#include <google/protobuf/util/json_util.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/status.h"

namespace kennel::registry {
namespace {

// What a deleted version's key holds. No manifest is this short (every
// manifest names its model and at least one 71-character digest), so a
// listing tells tombstones by size without reading them.
constexpr absl::string_view kTombstone = "{\"deleted\": true}\n";
constexpr int64_t kMaxVersion = 99999999;  // eight digits sort as numbers
constexpr int kMaxLabels = 100000;
constexpr size_t kMaxLabelBytes = 256;
constexpr size_t kMaxDescriptionBytes = 64 << 10;

void SetNow(google::protobuf::Timestamp* ts) {
  const absl::Time now = absl::Now();
  const int64_t seconds = absl::ToUnixSeconds(now);
  ts->set_seconds(seconds);
  ts->set_nanos(static_cast<int32_t>(
      absl::ToInt64Nanoseconds(now - absl::FromUnixSeconds(seconds))));
}

absl::Time FromProto(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

void ToProto(absl::Time t, google::protobuf::Timestamp* ts) {
  const int64_t seconds = absl::ToUnixSeconds(t);
  ts->set_seconds(seconds);
  ts->set_nanos(static_cast<int32_t>(
      absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(seconds))));
}

std::string ToJson(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

absl::Status FromJson(const std::string& json, google::protobuf::Message* out,
                      const std::string& key) {
  google::protobuf::util::JsonParseOptions options;
  // Manifests written by a newer registry may carry fields this one lacks.
  options.ignore_unknown_fields = true;
  auto status = google::protobuf::util::JsonStringToMessage(json, out, options);
  if (!status.ok()) {
    return absl::DataLossError(absl::StrCat(
        "stored object ", key, " is not valid: ", status.message().ToString()));
  }
  return absl::OkStatus();
}

// Reads from a local file in 1 MiB pieces into `sink`.
absl::Status SendFile(int fd, int64_t size, const storage::ByteSink& sink) {
  std::string buffer(1 << 20, '\0');
  int64_t at = 0;
  while (at < size) {
    size_t want = std::min<int64_t>(buffer.size(), size - at);
    ssize_t n = pread(fd, buffer.data(), want, at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::InternalError(absl::StrCat(
          "cannot read a staged blob: ", n == 0 ? "short" : strerror(errno)));
    }
    RETURN_IF_ERROR(
        sink(absl::string_view(buffer.data(), static_cast<size_t>(n))));
    at += n;
  }
  return absl::OkStatus();
}

}  // namespace

BlobUpload::BlobUpload(std::string digest, int64_t size,
                       std::unique_ptr<storage::ObjectWriter> writer)
    : digest_(std::move(digest)), size_(size), writer_(std::move(writer)) {}

absl::Status BlobUpload::Write(absl::string_view data) {
  if (received_ + static_cast<int64_t>(data.size()) > size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob ", digest_, " was declared as ", size_,
                     " bytes but more were sent; nothing was stored"));
  }
  hash_.Update(data);
  received_ += static_cast<int64_t>(data.size());
  return writer_->Write(data);
}

absl::Status BlobUpload::Finish() {
  if (received_ != size_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blob ", digest_, " ended after ", received_, " of its ", size_,
        " declared bytes (a truncated push); nothing was stored"));
  }
  const std::string got = hash_.Digest();
  if (got != digest_) {
    return absl::InvalidArgumentError(absl::StrCat("the bytes sent for ",
                                                   digest_, " hash to ", got,
                                                   "; nothing was stored"));
  }
  return writer_->Commit();
}

ModelStore::ModelStore(std::shared_ptr<storage::ObjectStore> store,
                       ModelStoreOptions options)
    : store_(std::move(store)), options_(std::move(options)) {}

std::string ModelStore::BlobKey(const std::string& digest) {
  // Digests are validated before they get here: "sha256:" + 64 hex.
  return "blobs/sha256/" + digest.substr(7);
}

std::string ModelStore::VersionKey(const std::string& name, int64_t version) {
  return absl::StrFormat("models/%s/versions/%08d.json", name, version);
}

std::string ModelStore::AliasKey(const std::string& name,
                                 const std::string& alias) {
  return absl::StrCat("models/", name, "/aliases/", alias, ".json");
}

absl::Status ModelStore::Init() {
  auto enforced = store_->CheckExclusiveWrites();
  if (!enforced.ok()) {
    serialise_ = true;
    return Annotate(enforced.status(),
                    absl::StrCat("cannot check whether ", store_->Describe(),
                                 " enforces exclusive writes"));
  }
  serialise_ = !*enforced;
  if (*enforced) {
    LOG(INFO) << store_->Describe()
              << " refuses exclusive writes to existing keys: versions are "
                 "allocated safely across registry replicas";
  } else {
    LOG(WARNING) << store_->Describe()
                 << " ignores conditional writes (If-None-Match: *): version "
                    "numbers are allocated under a lock inside this process. "
                    "Run a single registry against this store; several "
                    "replicas need one that honours conditional writes (AWS "
                    "S3, MinIO, Ceph).";
  }
  return absl::OkStatus();
}

void ModelStore::SetChangeListener(
    std::function<void(const std::string&)> listener) {
  absl::MutexLock lock(&listener_mu_);
  listener_ = std::move(listener);
}

void ModelStore::Changed(const std::string& name) {
  std::function<void(const std::string&)> listener;
  {
    absl::MutexLock lock(&listener_mu_);
    listener = listener_;
  }
  if (listener) listener(name);
}

absl::Status ModelStore::ValidateHeader(const v1::PushHeader& header) const {
  const size_t bytes = header.ByteSizeLong();
  if (static_cast<int64_t>(bytes) > options_.max_header_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("the push header is ", bytes, " bytes; the limit is ",
                     options_.max_header_bytes,
                     " (labels, description and lineage must stay small)"));
  }
  RETURN_IF_ERROR(ValidateName("model name", header.name()));
  if (header.components_size() == 0) {
    return absl::InvalidArgumentError("a push needs at least one component");
  }
  if (header.components_size() > options_.max_components) {
    return absl::InvalidArgumentError(
        absl::StrCat("a push has at most ", options_.max_components,
                     " components, not ", header.components_size()));
  }
  std::map<std::string, int64_t> sizes;
  for (int i = 0; i < header.components_size(); ++i) {
    const v1::ComponentSpec& c = header.components(i);
    RETURN_IF_ERROR(
        Annotate(ValidateDigest(c.digest()), absl::StrCat("component ", i)));
    if (!v1::ComponentRole_IsValid(c.role())) {
      return absl::InvalidArgumentError(
          absl::StrCat("component ", i, " has an unknown role ", c.role()));
    }
    if (c.size() < 0 || c.size() > options_.max_component_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "component ", i, " has size ", c.size(), "; sizes run from 0 to ",
          options_.max_component_bytes, " bytes"));
    }
    bool format_ok = c.format().size() <= 32;
    for (char ch : c.format()) {
      format_ok =
          format_ok && ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                        ch == '-' || ch == '_');
    }
    if (!format_ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("component ", i,
                       " has an invalid format (use up to 32 of a-z 0-9 - _)"));
    }
    auto [it, inserted] = sizes.emplace(c.digest(), c.size());
    if (!inserted && it->second != c.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "digest ", c.digest(), " is declared with two different sizes"));
    }
  }
  if (header.labels_size() > kMaxLabels) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxLabels, " labels"));
  }
  for (const std::string& label : header.labels()) {
    if (label.size() > kMaxLabelBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("labels have at most ", kMaxLabelBytes, " bytes each"));
    }
  }
  if (header.description().size() > kMaxDescriptionBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the description has at most ", kMaxDescriptionBytes, " bytes"));
  }
  for (const std::string& alias : header.aliases()) {
    RETURN_IF_ERROR(ValidateName("alias", alias));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ModelStore::PresentBlobs(
    const std::vector<std::string>& digests) {
  std::vector<std::string> present;
  for (const std::string& digest : digests) {
    RETURN_IF_ERROR(ValidateDigest(digest));
  }
  for (const std::string& digest : digests) {
    auto info = store_->Stat(BlobKey(digest));
    if (info.ok()) {
      present.push_back(digest);
    } else if (!absl::IsNotFound(info.status())) {
      return info.status();
    }
  }
  return present;
}

absl::StatusOr<std::unique_ptr<BlobUpload>> ModelStore::StartBlob(
    const std::string& digest, int64_t size) {
  RETURN_IF_ERROR(ValidateDigest(digest));
  storage::WriteOptions options;
  options.size_hint = size;
  options.sha256_hex = digest.substr(7);
  ASSIGN_OR_RETURN(std::unique_ptr<storage::ObjectWriter> writer,
                   store_->NewWriter(BlobKey(digest), options));
  return std::make_unique<BlobUpload>(digest, size, std::move(writer));
}

absl::StatusOr<std::vector<ModelStore::VersionEntry>>
ModelStore::VersionEntries(const std::string& name) {
  const std::string prefix = absl::StrCat("models/", name, "/versions/");
  ASSIGN_OR_RETURN(std::vector<storage::ObjectInfo> objects,
                   store_->ListAll(prefix));
  std::vector<VersionEntry> out;
  for (const storage::ObjectInfo& info : objects) {
    absl::string_view file = absl::string_view(info.key).substr(prefix.size());
    int64_t version = 0;
    if (!absl::ConsumeSuffix(&file, ".json") ||
        !absl::SimpleAtoi(file, &version) || version <= 0) {
      continue;  // not ours
    }
    out.push_back(VersionEntry{
        version, info.size == static_cast<int64_t>(kTombstone.size()),
        info.modified});
  }
  std::sort(out.begin(), out.end(),
            [](const VersionEntry& a, const VersionEntry& b) {
              return a.version < b.version;
            });
  return out;
}

absl::StatusOr<v1::ModelVersion> ModelStore::ReadManifest(
    const std::string& name, int64_t version) {
  const std::string key = VersionKey(name, version);
  auto data = store_->ReadAll(key);
  if (absl::IsNotFound(data.status())) {
    return absl::NotFoundError(
        absl::StrCat("model ", name, " has no version ", version));
  }
  RETURN_IF_ERROR(data.status());
  if (*data == kTombstone) {
    return absl::NotFoundError(
        absl::StrCat("version ", version, " of model ", name, " was deleted"));
  }
  v1::ModelVersion manifest;
  RETURN_IF_ERROR(FromJson(*data, &manifest, key));
  if (manifest.name() != name || manifest.version() != version ||
      manifest.components().empty()) {
    return absl::DataLossError(absl::StrCat(
        "stored manifest ", key, " describes ", manifest.name(), ":",
        manifest.version(), " with ", manifest.components_size(),
        " components; refusing to use it"));
  }
  return manifest;
}

absl::StatusOr<std::map<std::string, v1::Alias>> ModelStore::ReadAliases(
    const std::string& name) {
  const std::string prefix = absl::StrCat("models/", name, "/aliases/");
  ASSIGN_OR_RETURN(std::vector<storage::ObjectInfo> objects,
                   store_->ListAll(prefix));
  std::map<std::string, v1::Alias> out;
  for (const storage::ObjectInfo& info : objects) {
    absl::string_view file = absl::string_view(info.key).substr(prefix.size());
    if (!absl::ConsumeSuffix(&file, ".json") ||
        !ValidateName("alias", file).ok()) {
      continue;
    }
    auto data = store_->ReadAll(info.key);
    if (absl::IsNotFound(data.status())) continue;  // deleted meanwhile
    RETURN_IF_ERROR(data.status());
    v1::Alias alias;
    RETURN_IF_ERROR(FromJson(*data, &alias, info.key));
    if (alias.name() != name || alias.alias() != file || alias.version() <= 0) {
      return absl::DataLossError(
          "stored alias " + info.key +
          " does not describe itself; refusing to use it");
    }
    out.emplace(alias.alias(), std::move(alias));
  }
  return out;
}

absl::StatusOr<int64_t> ModelStore::AllocateAndWrite(
    v1::ModelVersion* manifest) {
  const bool serialise = serialise_.load();
  absl::MutexLockMaybe lock(serialise ? &commit_mu_ : nullptr);
  ASSIGN_OR_RETURN(std::vector<VersionEntry> entries,
                   VersionEntries(manifest->name()));
  int64_t next = entries.empty() ? 1 : entries.back().version + 1;
  storage::WriteOptions exclusive;
  exclusive.exclusive = true;
  for (int attempt = 0; attempt < 100; ++attempt) {
    if (next > kMaxVersion) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "model ", manifest->name(), " has used every version number"));
    }
    const std::string key = VersionKey(manifest->name(), next);
    if (serialise) {
      // The store will not refuse an existing key, so look first (safe only
      // against writers in this process, which hold commit_mu_).
      auto existing = store_->Stat(key);
      if (existing.ok()) {
        ++next;
        continue;
      }
      if (!absl::IsNotFound(existing.status())) return existing.status();
    }
    manifest->set_version(next);
    SetNow(manifest->mutable_created_at());
    absl::Status status = store_->Put(key, ToJson(*manifest), exclusive);
    if (status.ok()) return next;
    if (absl::IsAlreadyExists(status)) {
      ++next;  // another push took this number
    } else if (absl::IsAborted(status)) {
      absl::SleepFor(absl::Milliseconds(20 * (attempt + 1)));
    } else {
      return status;
    }
  }
  return absl::AbortedError(
      absl::StrCat("could not allocate a version of ", manifest->name(),
                   " after 100 tries; too many concurrent pushes, try again"));
}

absl::StatusOr<v1::ModelVersion> ModelStore::Commit(
    const v1::PushHeader& header) {
  RETURN_IF_ERROR(ValidateHeader(header));
  v1::ModelVersion manifest;
  manifest.set_name(header.name());
  for (const v1::ComponentSpec& spec : header.components()) {
    v1::Component* c = manifest.add_components();
    c->set_role(spec.role());
    c->set_digest(spec.digest());
    c->set_size(spec.size());
    c->set_format(spec.format().empty() ? "torchscript" : spec.format());
  }
  *manifest.mutable_labels() = header.labels();
  *manifest.mutable_preprocessing() = header.preprocessing();
  *manifest.mutable_lineage() = header.lineage();
  *manifest.mutable_metrics() = header.metrics();
  manifest.set_precision(header.precision());
  manifest.set_description(header.description());
  {
    absl::ReaderMutexLock gc(&gc_mu_);
    std::set<std::string> checked;
    for (int i = 0; i < header.components_size(); ++i) {
      const v1::ComponentSpec& spec = header.components(i);
      if (!checked.insert(spec.digest()).second) continue;
      auto info = store_->Stat(BlobKey(spec.digest()));
      if (absl::IsNotFound(info.status())) {
        return absl::FailedPreconditionError(
            absl::StrCat("blob ", spec.digest(), " (component ", i,
                         ") is not stored; send its bytes in the push"));
      }
      RETURN_IF_ERROR(info.status());
      if (info->size != spec.size()) {
        return absl::DataLossError(
            absl::StrCat("stored blob ", spec.digest(), " has ", info->size,
                         " bytes but the push declares ", spec.size()));
      }
    }
    RETURN_IF_ERROR(AllocateAndWrite(&manifest).status());
  }
  absl::Status alias_status;
  {
    absl::MutexLock lock(&alias_mu_);
    for (const std::string& alias : header.aliases()) {
      auto written = WriteAlias(manifest.name(), alias, manifest.version());
      if (!written.ok()) {
        alias_status =
            Annotate(written.status(),
                     absl::StrCat("version ", manifest.version(), " of ",
                                  manifest.name(), " was committed, but alias ",
                                  alias, " was not set"));
        break;
      }
      manifest.add_aliases(alias);
    }
  }
  Changed(manifest.name());
  RETURN_IF_ERROR(alias_status);
  return manifest;
}

absl::StatusOr<v1::ModelVersion> ModelStore::Resolve(const std::string& ref) {
  ASSIGN_OR_RETURN(ModelRef parsed, ParseModelRef(ref));
  return Resolve(parsed);
}

absl::StatusOr<v1::ModelVersion> ModelStore::Resolve(const ModelRef& ref) {
  RETURN_IF_ERROR(ValidateName("model name", ref.name));
  v1::ModelVersion manifest;
  std::map<std::string, v1::Alias> aliases;
  if (ref.version > 0) {
    ASSIGN_OR_RETURN(manifest, ReadManifest(ref.name, ref.version));
    ASSIGN_OR_RETURN(aliases, ReadAliases(ref.name));
  } else if (!ref.alias.empty()) {
    RETURN_IF_ERROR(ValidateName("alias", ref.alias));
    ASSIGN_OR_RETURN(aliases, ReadAliases(ref.name));
    auto it = aliases.find(ref.alias);
    if (it == aliases.end()) {
      return absl::NotFoundError(
          absl::StrCat("model ", ref.name, " has no alias ", ref.alias));
    }
    ASSIGN_OR_RETURN(manifest, ReadManifest(ref.name, it->second.version()));
  } else {
    ASSIGN_OR_RETURN(std::vector<VersionEntry> entries,
                     VersionEntries(ref.name));
    bool found = false;
    for (auto it = entries.rbegin(); it != entries.rend() && !found; ++it) {
      if (it->deleted) continue;
      auto read = ReadManifest(ref.name, it->version);
      if (absl::IsNotFound(read.status())) continue;  // deleted meanwhile
      RETURN_IF_ERROR(read.status());
      manifest = *std::move(read);
      found = true;
    }
    if (!found) {
      return absl::NotFoundError(absl::StrCat("no model named ", ref.name));
    }
    ASSIGN_OR_RETURN(aliases, ReadAliases(ref.name));
  }
  for (const auto& [alias, value] : aliases) {
    if (value.version() == manifest.version()) manifest.add_aliases(alias);
  }
  return manifest;
}

absl::Status ModelStore::ReadBlob(const v1::Component& component,
                                  const storage::ByteSink& sink) {
  RETURN_IF_ERROR(ValidateDigest(component.digest()));
  absl::Status status = VerifyBlob(component, sink);
  if (absl::IsNotFound(status)) {
    return absl::DataLossError(absl::StrCat(
        "blob ", component.digest(),
        " is missing from storage although a manifest references it"));
  }
  return status;
}

absl::Status ModelStore::VerifyBlob(const v1::Component& component,
                                    const storage::ByteSink& sink) {
  const std::string key = BlobKey(component.digest());
  auto corrupt = [&](int64_t size, const std::string& digest) {
    return absl::DataLossError(absl::StrCat(
        "blob ", component.digest(), " is corrupt in storage (", size,
        " bytes hashing to ", digest, ", expected ", component.size(),
        " bytes); refusing to serve it. Push the model again to repair it."));
  };
  Sha256 hash;
  int64_t size = 0;
  if (store_->is_local()) {
    // Cheap to read twice: check every byte first, then send.
    RETURN_IF_ERROR(store_->Read(key, 0, -1, [&](absl::string_view data) {
      hash.Update(data);
      size += static_cast<int64_t>(data.size());
      return absl::OkStatus();
    }));
    const std::string digest = hash.Digest();
    if (digest != component.digest() || size != component.size()) {
      return corrupt(size, digest);
    }
    return store_->Read(key, 0, component.size(), sink);
  }
  // Remote: stage the bytes on local disk while hashing, then send them.
  std::string dir = options_.spool_dir;
  if (dir.empty()) dir = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::string path = dir + "/kennel-pull-XXXXXX";
    fd = mkostemp(path.data(), O_CLOEXEC);
    if (fd < 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot stage a blob in ", dir, ": ", strerror(errno)));
    }
    unlink(path.c_str());
  }
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } closer{fd};
  RETURN_IF_ERROR(store_->Read(key, 0, -1, [&](absl::string_view data) {
    hash.Update(data);
    size += static_cast<int64_t>(data.size());
    const char* p = data.data();
    size_t left = data.size();
    while (left > 0) {
      ssize_t n = write(fd, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "cannot stage a blob in ", dir, ": ", strerror(errno)));
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
    return absl::OkStatus();
  }));
  const std::string digest = hash.Digest();
  if (digest != component.digest() || size != component.size()) {
    return corrupt(size, digest);
  }
  return SendFile(fd, size, sink);
}

absl::StatusOr<v1::ListModelsResponse> ModelStore::ListModels() {
  std::vector<std::string> names;
  storage::ListOptions options;
  options.prefix = "models/";
  options.delimiter = "/";
  while (true) {
    ASSIGN_OR_RETURN(storage::ListResult page, store_->List(options));
    for (const std::string& prefix : page.prefixes) {
      std::string name = prefix.substr(7, prefix.size() - 8);
      if (ValidateName("model name", name).ok()) names.push_back(name);
    }
    if (page.next_page_token.empty()) break;
    options.page_token = page.next_page_token;
  }
  v1::ListModelsResponse response;
  for (const std::string& name : names) {
    ASSIGN_OR_RETURN(std::vector<VersionEntry> entries, VersionEntries(name));
    ASSIGN_OR_RETURN(auto aliases, ReadAliases(name));
    v1::ModelSummary summary;
    summary.set_name(name);
    absl::Time updated = absl::InfinitePast();
    for (const VersionEntry& entry : entries) {
      updated = std::max(updated, entry.modified);
      if (entry.deleted) continue;
      summary.set_latest_version(entry.version);
      summary.set_version_count(summary.version_count() + 1);
    }
    for (auto& [alias, value] : aliases) {
      updated = std::max(updated, FromProto(value.updated_at()));
      *summary.add_aliases() = value;
    }
    if (summary.version_count() == 0 && aliases.empty()) continue;
    if (updated != absl::InfinitePast())
      ToProto(updated, summary.mutable_updated_at());
    *response.add_models() = std::move(summary);
  }
  return response;
}

absl::StatusOr<v1::ListVersionsResponse> ModelStore::ListVersions(
    const v1::ListVersionsRequest& request) {
  RETURN_IF_ERROR(ValidateName("model name", request.name()));
  if (request.page_size() < 0) {
    return absl::InvalidArgumentError("page_size must not be negative");
  }
  const int page_size =
      request.page_size() == 0 ? 50 : std::min(request.page_size(), 1000);
  int64_t below = kMaxVersion + 1;
  if (!request.page_token().empty() &&
      (!absl::SimpleAtoi(request.page_token(), &below) || below <= 0)) {
    return absl::InvalidArgumentError(
        "page_token is not one this registry issued; pass the "
        "next_page_token of the previous page");
  }
  ASSIGN_OR_RETURN(std::vector<VersionEntry> entries,
                   VersionEntries(request.name()));
  std::vector<int64_t> live;
  for (const VersionEntry& entry : entries) {
    if (!entry.deleted) live.push_back(entry.version);
  }
  if (live.empty()) {
    return absl::NotFoundError(absl::StrCat("no model named ", request.name()));
  }
  ASSIGN_OR_RETURN(auto aliases, ReadAliases(request.name()));
  v1::ListVersionsResponse response;
  int taken = 0;
  for (auto it = live.rbegin(); it != live.rend(); ++it) {
    if (*it >= below) continue;
    if (taken == page_size) {
      response.set_next_page_token(absl::StrCat(
          response.versions(response.versions_size() - 1).version()));
      break;
    }
    auto manifest = ReadManifest(request.name(), *it);
    if (absl::IsNotFound(manifest.status())) continue;  // deleted meanwhile
    RETURN_IF_ERROR(manifest.status());
    for (const auto& [alias, value] : aliases) {
      if (value.version() == *it) manifest->add_aliases(alias);
    }
    *response.add_versions() = *std::move(manifest);
    ++taken;
  }
  return response;
}

absl::StatusOr<v1::Alias> ModelStore::WriteAlias(const std::string& name,
                                                 const std::string& alias,
                                                 int64_t version) {
  v1::Alias value;
  value.set_name(name);
  value.set_alias(alias);
  value.set_version(version);
  SetNow(value.mutable_updated_at());
  RETURN_IF_ERROR(store_->Put(AliasKey(name, alias), ToJson(value), {}));
  return value;
}

absl::StatusOr<v1::Alias> ModelStore::SetAlias(const std::string& name,
                                               const std::string& alias,
                                               int64_t version) {
  RETURN_IF_ERROR(ValidateName("model name", name));
  RETURN_IF_ERROR(ValidateName("alias", alias));
  if (version <= 0) {
    return absl::InvalidArgumentError(
        "an alias points at a version number > 0");
  }
  absl::StatusOr<v1::Alias> result;
  {
    absl::MutexLock lock(&alias_mu_);
    RETURN_IF_ERROR(ReadManifest(name, version).status());
    result = WriteAlias(name, alias, version);
  }
  if (result.ok()) Changed(name);
  return result;
}

absl::Status ModelStore::DeleteAlias(const std::string& name,
                                     const std::string& alias) {
  RETURN_IF_ERROR(ValidateName("model name", name));
  RETURN_IF_ERROR(ValidateName("alias", alias));
  {
    absl::MutexLock lock(&alias_mu_);
    auto info = store_->Stat(AliasKey(name, alias));
    if (absl::IsNotFound(info.status())) {
      return absl::NotFoundError(
          absl::StrCat("model ", name, " has no alias ", alias));
    }
    RETURN_IF_ERROR(info.status());
    RETURN_IF_ERROR(store_->Delete(AliasKey(name, alias)));
  }
  Changed(name);
  return absl::OkStatus();
}

absl::Status ModelStore::DeleteVersion(const std::string& name,
                                       int64_t version) {
  RETURN_IF_ERROR(ValidateName("model name", name));
  if (version <= 0) {
    return absl::InvalidArgumentError("versions are numbered from 1");
  }
  {
    absl::MutexLock lock(&alias_mu_);
    ASSIGN_OR_RETURN(auto aliases, ReadAliases(name));
    std::vector<std::string> holding;
    for (const auto& [alias, value] : aliases) {
      if (value.version() == version) holding.push_back(alias);
    }
    if (!holding.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "version ", version, " of ", name, " is aliased as ",
          absl::StrJoin(holding, ", "),
          "; move or delete the alias before deleting the version"));
    }
    RETURN_IF_ERROR(ReadManifest(name, version).status());
    // A tombstone, not a delete: the number stays taken, so a later push
    // never reuses it for different bytes.
    RETURN_IF_ERROR(store_->Put(VersionKey(name, version), kTombstone, {}));
  }
  Changed(name);
  return absl::OkStatus();
}

absl::StatusOr<v1::GarbageCollectResponse> ModelStore::GarbageCollect(
    absl::Duration grace, bool dry_run) {
  if (grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the grace period must not be negative");
  }
  absl::WriterMutexLock gc(&gc_mu_);
  std::set<std::string> referenced;
  storage::ListOptions options;
  options.prefix = "models/";
  options.delimiter = "/";
  while (true) {
    ASSIGN_OR_RETURN(storage::ListResult page, store_->List(options));
    for (const std::string& prefix : page.prefixes) {
      std::string name = prefix.substr(7, prefix.size() - 8);
      if (!ValidateName("model name", name).ok()) continue;
      auto entries = VersionEntries(name);
      RETURN_IF_ERROR(Annotate(entries.status(),
                               "garbage collection stopped, nothing deleted"));
      for (const VersionEntry& entry : *entries) {
        if (entry.deleted) continue;
        auto manifest = ReadManifest(name, entry.version);
        if (absl::IsNotFound(manifest.status())) continue;
        // A manifest that cannot be read might reference any blob.
        RETURN_IF_ERROR(Annotate(
            manifest.status(), "garbage collection stopped, nothing deleted"));
        for (const v1::Component& c : manifest->components()) {
          referenced.insert(c.digest());
        }
      }
    }
    if (page.next_page_token.empty()) break;
    options.page_token = page.next_page_token;
  }
  ASSIGN_OR_RETURN(std::vector<storage::ObjectInfo> blobs,
                   store_->ListAll("blobs/sha256/"));
  const absl::Time cutoff = absl::Now() - grace;
  v1::GarbageCollectResponse response;
  for (const storage::ObjectInfo& blob : blobs) {
    const std::string digest = "sha256:" + blob.key.substr(13);
    if (!ValidateDigest(digest).ok() || referenced.count(digest) ||
        blob.modified > cutoff) {
      response.set_kept_blobs(response.kept_blobs() + 1);
      continue;
    }
    if (!dry_run) RETURN_IF_ERROR(store_->Delete(blob.key));
    response.add_removed_digests(digest);
    response.set_removed_bytes(response.removed_bytes() + blob.size);
  }
  if (!dry_run) {
    auto cleaned = store_->CleanStaging(cutoff);
    if (!cleaned.ok()) {
      LOG(WARNING) << "could not clean staged uploads: " << cleaned.status();
    } else if (*cleaned > 0) {
      LOG(INFO) << "removed " << *cleaned << " abandoned staged uploads";
    }
  }
  LOG(INFO) << (dry_run ? "garbage collection (dry run): "
                        : "garbage collection: ")
            << response.removed_digests_size() << " blobs ("
            << response.removed_bytes()
            << " bytes) unreferenced and older than " << grace << ", "
            << response.kept_blobs() << " kept";
  return response;
}

}  // namespace kennel::registry
