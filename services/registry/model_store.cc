#include "services/registry/model_store.h"

#include <errno.h>
#include <fcntl.h>
#include <glog/logging.h>
#include <google/protobuf/util/json_util.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/preprocessing.h"
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
constexpr absl::string_view kTorchScript = "torchscript";

// Strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF.
bool IsUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int extra;
    uint32_t code;
    uint32_t min;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      extra = 1, code = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2, code = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3, code = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (i + extra >= s.size()) return false;  // cut short
    for (int k = 1; k <= extra; ++k) {
      const unsigned char next = static_cast<unsigned char>(s[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) {
      return false;
    }
    i += extra + 1;
  }
  return true;
}

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

// Reads a blob in segments on a few threads, a few segments ahead of the
// one being delivered; each thread checks its segment chunk by chunk,
// resuming the hash from the state the index recorded at the segment's
// start (the last segment's last chunk is checked against the blob's
// digest). The caller's thread delivers the checked chunks in order.
class SegmentReader {
 public:
  SegmentReader(storage::ObjectStore* store, std::string key,
                const ChunkIndex* index, int64_t segment_bytes, int threads)
      : store_(store),
        key_(std::move(key)),
        index_(index),
        segment_bytes_(segment_bytes),
        count_((index->size + segment_bytes - 1) / segment_bytes),
        threads_(threads) {}

  absl::Status Run(const ModelStore::ChunkSink& sink) {
    std::vector<std::thread> workers;
    for (int i = 0; i < threads_; ++i) {
      workers.push_back(storage::ThreadForRequest([this] { Work(); }));
    }
    absl::Status status;
    for (int64_t number = 0; number < count_ && status.ok(); ++number) {
      Segment segment;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &SegmentReader::NextReady));
        auto it = segments_.find(number);
        segment = std::move(it->second);
        segments_.erase(it);
        next_to_send_ = number + 1;
      }
      // A failed segment still holds the chunks checked before the failure.
      int64_t offset = number * segment_bytes_;
      for (size_t i = 0; i < segment.chunks.size() && status.ok(); ++i) {
        const int64_t size = static_cast<int64_t>(segment.chunks[i].size());
        status = sink(offset, &segment.chunks[i]);
        offset += size;
      }
      // The sink left other buffers (usually ones it has finished with) in
      // the chunks' place: the readers fill those next.
      {
        absl::MutexLock lock(&mu_);
        for (std::string& buffer : segment.chunks) {
          if (spare_.size() < kMaxSpare) spare_.push_back(std::move(buffer));
        }
      }
      if (status.ok()) status = segment.status;
    }
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    for (std::thread& worker : workers) worker.join();
    return status;
  }

 private:
  struct Segment {
    std::vector<std::string> chunks;
    absl::Status status;
    bool ready = false;
  };

  bool NextReady() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = segments_.find(next_to_send_);
    return it != segments_.end() && it->second.ready;
  }
  bool CanClaim() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // At most threads + 1 segments are read ahead of the one being sent.
    return stopping_ || next_to_read_ >= count_ ||
           next_to_read_ <= next_to_send_ + threads_;
  }

  void Work() {
    while (true) {
      int64_t number;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &SegmentReader::CanClaim));
        if (stopping_ || next_to_read_ >= count_) return;
        number = next_to_read_++;
        segments_[number];  // claimed, not ready
      }
      Segment segment;
      segment.status = Read(number, &segment.chunks);
      segment.ready = true;
      absl::MutexLock lock(&mu_);
      segments_[number] = std::move(segment);
    }
  }

  absl::Status Read(int64_t number, std::vector<std::string>* chunks) {
    const int64_t offset = number * segment_bytes_;
    const int64_t length = std::min(segment_bytes_, index_->size - offset);
    const bool last_segment = offset + length == index_->size;
    ChunkVerifier verifier(index_, offset / index_->chunk_bytes);
    // The last segment is read to the object's end, not just to the blob's,
    // and its last chunk is held until that end has been seen: a stored
    // object longer than the blob is corrupt, not cut short.
    std::string last;
    absl::Status status = store_->ReadPieces(
        key_, offset, last_segment ? -1 : length, index_->chunk_bytes,
        [&](std::string* piece) {
          {
            absl::MutexLock lock(&mu_);
            if (stopping_) return absl::CancelledError("the read was stopped");
          }
          RETURN_IF_ERROR(verifier.Check(*piece));
          if (verifier.done()) {
            last.swap(*piece);
          } else {
            chunks->emplace_back();
            chunks->back().swap(*piece);
          }
          // Read the next piece into a used buffer, not a fresh allocation
          // (which would be page-faulted and zeroed again).
          absl::MutexLock lock(&mu_);
          if (!spare_.empty()) {
            piece->swap(spare_.back());
            spare_.pop_back();
          }
          return absl::OkStatus();
        });
    if (absl::IsOutOfRange(status) ||
        (status.ok() && verifier.offset() != offset + length)) {
      return absl::DataLossError(absl::StrCat(
          "blob ", index_->digest,
          " is corrupt in storage: it ends before byte ", offset + length,
          "; refusing to serve it. Push the model again to "
          "repair it."));
    }
    if (status.ok() && last_segment) chunks->push_back(std::move(last));
    return status;
  }

  storage::ObjectStore* const store_;
  const std::string key_;
  const ChunkIndex* const index_;
  const int64_t segment_bytes_;
  const int64_t count_;
  const int threads_;

  absl::Mutex mu_;
  // Segments claimed or read and not yet taken for sending.
  std::map<int64_t, Segment> segments_ ABSL_GUARDED_BY(mu_);
  int64_t next_to_read_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_to_send_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Buffers handed back by the sink, for the readers to fill again.
  static constexpr size_t kMaxSpare = 4;
  std::vector<std::string> spare_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

// A blob at least this large is written by a thread of its own; at most
// this many bytes of it wait in memory to be written.
constexpr int64_t kThreadedUploadBytes = int64_t{4} << 20;
constexpr int64_t kMaxQueuedBytes = int64_t{8} << 20;

BlobUpload::BlobUpload(std::string digest, int64_t size,
                       std::unique_ptr<storage::ObjectWriter> writer,
                       storage::ObjectStore* store, std::string index_key)
    : digest_(std::move(digest)),
      size_(size),
      writer_(std::move(writer)),
      store_(store),
      index_key_(std::move(index_key)),
      hash_(size) {
  if (size_ >= kThreadedUploadBytes) {
    // It writes for the request that pushes, within that request's limits.
    writing_ = std::make_unique<std::thread>(
        storage::ThreadForRequest([this] { WriteLoop(); }));
  }
}

BlobUpload::~BlobUpload() { (void)StopWriting(/*discard=*/true); }

absl::Status BlobUpload::Write(absl::string_view data) {
  std::string copy(data);
  return Write(&copy);
}

absl::Status BlobUpload::Write(std::string* data) {
  const int64_t n = static_cast<int64_t>(data->size());
  if (received_ + n > size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob ", digest_, " was declared as ", size_,
                     " bytes but more were sent; nothing was stored"));
  }
  hash_.Update(*data);
  received_ += n;
  if (writing_ == nullptr) return writer_->Write(*data);
  absl::MutexLock lock(&mu_);
  // Waiting here holds the stream back (flow control) while the disk or
  // the store catches up.
  mu_.Await(absl::Condition(
      +[](BlobUpload* u) ABSL_EXCLUSIVE_LOCKS_REQUIRED(u->mu_) {
        return u->queued_bytes_ < kMaxQueuedBytes || !u->write_status_.ok();
      },
      this));
  RETURN_IF_ERROR(write_status_);
  queue_.emplace_back();
  queue_.back().swap(*data);
  queued_bytes_ += n;
  if (!spare_.empty()) {
    data->swap(spare_.back());
    spare_.pop_back();
  }
  return absl::OkStatus();
}

void BlobUpload::WriteLoop() {
  while (true) {
    std::string data;
    bool failed;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](BlobUpload* u) ABSL_EXCLUSIVE_LOCKS_REQUIRED(u->mu_) {
            return !u->queue_.empty() || u->closing_;
          },
          this));
      if (queue_.empty()) return;
      data.swap(queue_.front());
      queue_.pop_front();
      failed = !write_status_.ok();
    }
    // After a failure the rest is only drained: the upload is lost anyway.
    absl::Status status = failed ? absl::OkStatus() : writer_->Write(data);
    absl::MutexLock lock(&mu_);
    queued_bytes_ -= static_cast<int64_t>(data.size());
    if (!status.ok() && write_status_.ok()) write_status_ = status;
    if (spare_.size() < 4) {
      data.clear();
      spare_.push_back(std::move(data));
    }
  }
}

absl::Status BlobUpload::StopWriting(bool discard) {
  if (writing_ == nullptr) return absl::OkStatus();
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    if (discard) {
      queue_.clear();
      queued_bytes_ = 0;
    }
  }
  writing_->join();
  writing_.reset();
  absl::MutexLock lock(&mu_);
  return write_status_;
}

absl::Status BlobUpload::Finish() {
  if (received_ != size_) {
    (void)StopWriting(/*discard=*/true);
    return absl::InvalidArgumentError(absl::StrCat(
        "blob ", digest_, " ended after ", received_, " of its ", size_,
        " declared bytes (a truncated push); nothing was stored"));
  }
  const ChunkIndex index = hash_.Finish();
  if (index.digest != digest_) {
    (void)StopWriting(/*discard=*/true);
    return absl::InvalidArgumentError(
        absl::StrCat("the bytes sent for ", digest_, " hash to ", index.digest,
                     "; nothing was stored"));
  }
  // The index only speeds up reads (without it a pull checks the whole blob
  // first and writes the index then). A large blob's is written while the
  // blob's last bytes are stored and published: an index whose blob never
  // appears is harmless, and gc removes it.
  absl::Status indexed;
  auto write_index = [&] {
    indexed = store_->Put(index_key_, index.Encode(), {});
  };
  std::unique_ptr<std::thread> indexing;
  if (writing_ != nullptr) {
    indexing = std::make_unique<std::thread>(
        storage::ThreadForRequest([&write_index] { write_index(); }));
  }
  absl::Status stored = StopWriting(/*discard=*/false);
  if (stored.ok()) stored = writer_->Commit();
  if (indexing != nullptr) {
    indexing->join();
  } else if (stored.ok()) {
    write_index();
  }
  RETURN_IF_ERROR(stored);
  if (!indexed.ok()) {
    LOG(WARNING) << "stored blob " << digest_
                 << " but not its chunk index (it will be made on the first "
                    "pull): "
                 << indexed;
  }
  return absl::OkStatus();
}

ModelStore::ModelStore(std::shared_ptr<storage::ObjectStore> store,
                       ModelStoreOptions options)
    : store_(std::move(store)), options_(std::move(options)) {}

std::string ModelStore::BlobKey(const std::string& digest) {
  // Digests are validated before they get here: "sha256:" + 64 hex.
  return "blobs/sha256/" + digest.substr(7);
}

std::string ModelStore::IndexKey(const std::string& digest) {
  return "blobs/sha256-chunks/" + digest.substr(7);
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
  int models = 0;
  for (int i = 0; i < header.components_size(); ++i) {
    const v1::ComponentSpec& c = header.components(i);
    RETURN_IF_ERROR(
        Annotate(ValidateDigest(c.digest()), absl::StrCat("component ", i)));
    if (!v1::ComponentRole_IsValid(c.role())) {
      return absl::InvalidArgumentError(
          absl::StrCat("component ", i, " has an unknown role ", c.role(),
                       " (use COMPONENT_ROLE_MODEL, _BACKBONE or _HEAD)"));
    }
    if (c.role() == v1::COMPONENT_ROLE_MODEL) ++models;
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
    // Nothing that reads the registry can load another format, so a version
    // with one could never serve.
    if (!c.format().empty() && c.format() != kTorchScript) {
      return absl::InvalidArgumentError(absl::StrCat(
          "component ", i, " has format \"", c.format(),
          "\"; the only format is \"", kTorchScript, "\" (or leave it empty)"));
    }
    if (c.role() == v1::COMPONENT_ROLE_MODEL && c.size() == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "component ", i,
          " (the model) is empty; push the TorchScript file itself"));
    }
    auto [it, inserted] = sizes.emplace(c.digest(), c.size());
    if (!inserted && it->second != c.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "digest ", c.digest(), " is declared with two different sizes"));
    }
  }
  if (models != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a push needs exactly one component with role COMPONENT_ROLE_MODEL "
        "(the TorchScript classifier inference loads), not ",
        models));
  }
  if (header.labels_size() > kMaxLabels) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxLabels, " labels"));
  }
  // Labels name the model's outputs by index: one that is empty, unreadable
  // or repeated leaves a class no answer could name.
  std::map<absl::string_view, int> seen_labels;
  for (int i = 0; i < header.labels_size(); ++i) {
    const std::string& label = header.labels(i);
    if (label.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("label ", i, " is empty; every class needs a name"));
    }
    if (label.size() > kMaxLabelBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("label ", i, " has ", label.size(),
                       " bytes; labels have at most ", kMaxLabelBytes));
    }
    if (!IsUtf8(label)) {
      return absl::InvalidArgumentError(
          absl::StrCat("label ", i, " is not valid UTF-8"));
    }
    auto [it, inserted] = seen_labels.emplace(label, i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(
          "labels ", it->second, " and ", i, " are the same",
          label.size() <= 64 ? absl::StrCat(" (\"", label, "\")") : "",
          "; each class needs its own name"));
    }
  }
  if (header.has_preprocessing()) {
    RETURN_IF_ERROR(Annotate(
        preprocessing::Validate(header.preprocessing()),
        "the push's preprocessing cannot be applied (leave it unset to use "
        "the model file's own)"));
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
  return std::make_unique<BlobUpload>(digest, size, std::move(writer),
                                      store_.get(), IndexKey(digest));
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
  return ReadBlobChunks(
      component, [&](int64_t, std::string* chunk) { return sink(*chunk); });
}

absl::Status ModelStore::ReadBlobChunks(const v1::Component& component,
                                        const ChunkSink& sink) {
  RETURN_IF_ERROR(ValidateDigest(component.digest()));
  if (component.size() < 0) {
    return absl::DataLossError(absl::StrCat(
        "the manifest gives blob ", component.digest(), " a negative size"));
  }
  absl::StatusOr<std::shared_ptr<const ChunkIndex>> index = IndexFor(component);
  absl::Status status = index.status();
  if (status.ok()) status = SendVerified(component, **index, sink);
  if (absl::IsNotFound(status)) {
    return absl::DataLossError(absl::StrCat(
        "blob ", component.digest(),
        " is missing from storage although a manifest references it"));
  }
  return status;
}

absl::StatusOr<std::shared_ptr<const ChunkIndex>> ModelStore::IndexFor(
    const v1::Component& component) {
  {
    absl::MutexLock lock(&index_mu_);
    auto it = index_cache_.find(component.digest());
    if (it != index_cache_.end() && it->second->size == component.size()) {
      return it->second;
    }
  }
  absl::StatusOr<ChunkIndex> index = LoadIndex(component);
  if (absl::IsNotFound(index.status())) {
    // Pushed before indexes existed, or its index was lost: check the whole
    // blob before sending any of it, and keep the index for next time.
    index = BuildIndex(component);
    if (index.ok()) {
      absl::Status saved =
          store_->Put(IndexKey(component.digest()), index->Encode(), {});
      if (!saved.ok()) {
        LOG_EVERY_N(WARNING, 100) << "cannot store the chunk index of "
                                  << component.digest() << ": " << saved;
      }
    }
  }
  RETURN_IF_ERROR(index.status());
  auto shared = std::make_shared<const ChunkIndex>(*std::move(index));
  absl::MutexLock lock(&index_mu_);
  if (index_cache_.emplace(component.digest(), shared).second) {
    index_order_.push_back(component.digest());
    while (index_order_.size() > kCachedIndexes) {
      index_cache_.erase(index_order_.front());
      index_order_.pop_front();
    }
  }
  return shared;
}

absl::StatusOr<ChunkIndex> ModelStore::LoadIndex(
    const v1::Component& component) {
  const std::string key = IndexKey(component.digest());
  ASSIGN_OR_RETURN(std::string data, store_->ReadAll(key));
  absl::StatusOr<ChunkIndex> index = ChunkIndex::Decode(data);
  if (index.ok() && (index->digest != component.digest() ||
                     index->size != component.size())) {
    index = absl::DataLossError(absl::StrCat(
        "it describes ", index->size, " bytes hashing to ", index->digest));
  }
  if (!index.ok()) {
    LOG(WARNING) << "ignoring the chunk index " << key << ": "
                 << index.status().message()
                 << "; the blob is checked whole and the index rewritten";
    return absl::NotFoundError(key);
  }
  return index;
}

absl::StatusOr<ChunkIndex> ModelStore::BuildIndex(
    const v1::Component& component) {
  ChunkIndexBuilder builder(component.size());
  RETURN_IF_ERROR(store_->Read(BlobKey(component.digest()), 0, -1,
                               [&](absl::string_view data) {
                                 builder.Update(data);
                                 return absl::OkStatus();
                               }));
  const int64_t size = builder.bytes();
  ChunkIndex index = builder.Finish();
  if (index.digest != component.digest() || size != component.size()) {
    return absl::DataLossError(absl::StrCat(
        "blob ", component.digest(), " is corrupt in storage (", size,
        " bytes hashing to ", index.digest, ", expected ", component.size(),
        " bytes); refusing to serve it. Push the model again to repair it."));
  }
  return index;
}

absl::Status ModelStore::SendVerified(const v1::Component& component,
                                      const ChunkIndex& index,
                                      const ChunkSink& sink) {
  const int64_t segment =
      std::max(index.chunk_bytes, options_.read_segment_bytes /
                                      index.chunk_bytes * index.chunk_bytes);
  if (options_.read_parallelism > 1 && index.size > 2 * segment) {
    return SendSegments(component, index, segment, sink);
  }
  ChunkVerifier verifier(&index);
  // The last chunk is held until the read has ended, so a stored object
  // longer than the blob is reported as corrupt rather than cut short.
  std::string last;
  int64_t last_offset = 0;
  RETURN_IF_ERROR(store_->ReadPieces(BlobKey(component.digest()), 0, -1,
                                     index.chunk_bytes,
                                     [&](std::string* piece) -> absl::Status {
                                       const int64_t offset = verifier.offset();
                                       RETURN_IF_ERROR(verifier.Check(*piece));
                                       if (!verifier.done())
                                         return sink(offset, piece);
                                       last.swap(*piece);
                                       last_offset = offset;
                                       return absl::OkStatus();
                                     }));
  if (!verifier.done()) {
    // Nothing more arrived: fine for an empty blob, corrupt otherwise.
    RETURN_IF_ERROR(verifier.Check(""));
  }
  if (index.size == 0) return absl::OkStatus();
  return sink(last_offset, &last);
}

absl::Status ModelStore::SendSegments(const v1::Component& component,
                                      const ChunkIndex& index,
                                      int64_t segment_bytes,
                                      const ChunkSink& sink) {
  SegmentReader reader(store_.get(), BlobKey(component.digest()), &index,
                       segment_bytes, options_.read_parallelism);
  return reader.Run(sink);
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
  std::set<std::string> kept;
  for (const storage::ObjectInfo& blob : blobs) {
    const std::string digest = "sha256:" + blob.key.substr(13);
    if (!ValidateDigest(digest).ok() || referenced.count(digest) ||
        blob.modified > cutoff) {
      response.set_kept_blobs(response.kept_blobs() + 1);
      kept.insert(digest);
      continue;
    }
    if (!dry_run) {
      // Each delete stands alone: what was removed stays removed, and the
      // next run takes up the rest.
      RETURN_IF_ERROR(
          Annotate(store_->Delete(blob.key),
                   absl::StrCat("garbage collection stopped after removing ",
                                response.removed_digests_size(),
                                response.removed_digests_size() == 1
                                    ? " unreferenced blob"
                                    : " unreferenced blobs",
                                "; run it again for the rest")));
    }
    response.add_removed_digests(digest);
    response.set_removed_bytes(response.removed_bytes() + blob.size);
  }
  // Chunk indexes go with their blobs; one whose blob is gone is an orphan
  // (a pull can rewrite an index just as its blob is collected), removed
  // once it is older than the grace period.
  ASSIGN_OR_RETURN(std::vector<storage::ObjectInfo> indexes,
                   store_->ListAll("blobs/sha256-chunks/"));
  const std::set<std::string> removed(response.removed_digests().begin(),
                                      response.removed_digests().end());
  for (const storage::ObjectInfo& index : indexes) {
    const std::string digest = "sha256:" + index.key.substr(20);
    if (!ValidateDigest(digest).ok() || kept.count(digest)) continue;
    if (!removed.count(digest) && index.modified > cutoff) continue;
    if (!dry_run) RETURN_IF_ERROR(store_->Delete(index.key));
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
