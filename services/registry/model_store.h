// The registry's storage logic over an ObjectStore, laid out like an OCI
// registry:
//
//   blobs/sha256/<hex>                       immutable bytes
//   models/<name>/versions/<00000007>.json   immutable manifest, written last
//   models/<name>/aliases/<alias>.json       mutable pointer to a version
//
// A version exists once its manifest does; the manifest is created
// exclusively, and that create is the commit point and the version
// allocator (on a conflict the next number is tried). A deleted version
// leaves a small tombstone at its key, so its number is never reused.
#ifndef KENNEL_SERVICES_REGISTRY_MODEL_STORE_H_
#define KENNEL_SERVICES_REGISTRY_MODEL_STORE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/names.h"
#include "common/sha256.h"
#include "common/storage/object_store.h"
#include "kennel/v1/registry.pb.h"
#include "services/registry/chunk_index.h"

namespace kennel::registry {

struct ModelStoreOptions {
  // Largest accepted push header; the manifest is made from it and read on
  // every lookup, so it stays small.
  int64_t max_header_bytes = 1 << 20;
  int max_components = 16;
  // Largest accepted component.
  int64_t max_component_bytes = int64_t{16} << 30;
  // Blobs larger than two segments are read by this many threads, one
  // segment each (ranged reads), checked there and sent in order; at most
  // (parallelism + 2) segments of one pull are in memory at once.
  int read_parallelism = 2;
  int64_t read_segment_bytes = int64_t{4} << 20;
};

// Receives one blob of a push: hashes the bytes as they arrive and
// publishes the blob only if size and digest match the declaration, then
// its chunk index (chunk_index.h). A large blob is written to storage by a
// thread of its own, so hashing and receiving go on while earlier chunks
// are written. Not thread-safe; destroying it unfinished discards the
// bytes.
class BlobUpload {
 public:
  // The index goes to `store` (which must outlive the upload) under
  // `index_key`.
  BlobUpload(std::string digest, int64_t size,
             std::unique_ptr<storage::ObjectWriter> writer,
             storage::ObjectStore* store, std::string index_key);
  ~BlobUpload();
  BlobUpload(const BlobUpload&) = delete;
  BlobUpload& operator=(const BlobUpload&) = delete;

  // INVALID_ARGUMENT past the declared size; a storage error from an
  // earlier write.
  absl::Status Write(absl::string_view data);
  // The same, taking the bytes' buffer: `data` is left holding another
  // (empty) buffer, usually one already written and big enough to be
  // filled again without allocating.
  absl::Status Write(std::string* data);
  // INVALID_ARGUMENT when the bytes are short or hash differently.
  absl::Status Finish();
  int64_t received() const { return received_; }
  const std::string& digest() const { return digest_; }

 private:
  // Stops the writing thread after it has written what it was given (or
  // dropped it, when `discard`), and returns its first error.
  absl::Status StopWriting(bool discard);
  void WriteLoop();

  const std::string digest_;
  const int64_t size_;
  std::unique_ptr<storage::ObjectWriter> writer_;
  storage::ObjectStore* const store_;
  const std::string index_key_;
  ChunkIndexBuilder hash_;
  int64_t received_ = 0;

  // Set when the blob is large enough to be written by its own thread.
  std::unique_ptr<std::thread> writing_;
  absl::Mutex mu_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> spare_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status write_status_ ABSL_GUARDED_BY(mu_);
};

// Thread-safe. Several processes may share one store when it enforces
// exclusive writes; otherwise version allocation is serialised in this
// process only, and a second replica could overwrite a version.
class ModelStore {
 public:
  explicit ModelStore(std::shared_ptr<storage::ObjectStore> store,
                      ModelStoreOptions options = {});

  // Asks the store whether it refuses exclusive writes to existing keys.
  // When it does not (s3rver), or cannot be asked now, version allocation
  // is serialised inside this process; the answer is logged either way.
  absl::Status Init();
  bool serialising() const { return serialise_.load(); }

  // Called with a model name after any change to its versions or aliases
  // made through this store.
  void SetChangeListener(std::function<void(const std::string&)> listener);

  // Checks names, digests, sizes and limits; touches no storage.
  absl::Status ValidateHeader(const v1::PushHeader& header) const;

  // The subset of `digests` that is stored.
  absl::StatusOr<std::vector<std::string>> PresentBlobs(
      const std::vector<std::string>& digests);
  absl::StatusOr<std::unique_ptr<BlobUpload>> StartBlob(
      const std::string& digest, int64_t size);

  // Commits a version described by a validated header whose blobs are all
  // stored: allocates the next number, writes the manifest, then points the
  // header's aliases at it. FAILED_PRECONDITION naming a blob that is not
  // stored.
  absl::StatusOr<v1::ModelVersion> Commit(const v1::PushHeader& header);

  // The manifest a ref points at, with `aliases` filled in.
  absl::StatusOr<v1::ModelVersion> Resolve(const ModelRef& ref);
  absl::StatusOr<v1::ModelVersion> Resolve(const std::string& ref);

  // Receives a blob in chunks; `offset` is where `chunk` starts. May swap
  // the chunk's contents out (see storage::PieceSink).
  using ChunkSink =
      std::function<absl::Status(int64_t offset, std::string* chunk)>;

  // Streams a blob to `sink` in chunks of about 1 MiB, each checked before
  // it is delivered, with the whole blob's digest checked before the last
  // one: a corrupt chunk is DATA_LOSS and is never delivered. A blob whose
  // chunk index is missing or damaged is checked whole before its first
  // chunk is delivered, and its index is written for the next read.
  absl::Status ReadBlobChunks(const v1::Component& component,
                              const ChunkSink& sink);
  // The same, as plain bytes.
  absl::Status ReadBlob(const v1::Component& component,
                        const storage::ByteSink& sink);

  absl::StatusOr<v1::ListModelsResponse> ListModels();
  absl::StatusOr<v1::ListVersionsResponse> ListVersions(
      const v1::ListVersionsRequest& request);
  absl::StatusOr<v1::Alias> SetAlias(const std::string& name,
                                     const std::string& alias, int64_t version);
  absl::Status DeleteAlias(const std::string& name, const std::string& alias);
  // FAILED_PRECONDITION while an alias points at the version.
  absl::Status DeleteVersion(const std::string& name, int64_t version);
  // Removes blobs no manifest references that are older than `grace`, and
  // staged uploads older than it.
  absl::StatusOr<v1::GarbageCollectResponse> GarbageCollect(
      absl::Duration grace, bool dry_run);

  storage::ObjectStore& object_store() { return *store_; }

  static std::string BlobKey(const std::string& digest);
  // Where a blob's chunk index lives.
  static std::string IndexKey(const std::string& digest);
  static std::string VersionKey(const std::string& name, int64_t version);
  static std::string AliasKey(const std::string& name,
                              const std::string& alias);

 private:
  struct VersionEntry {
    int64_t version;
    bool deleted;  // a tombstone
    absl::Time modified;
  };
  // Every version key of a model, ascending, tombstones included.
  absl::StatusOr<std::vector<VersionEntry>> VersionEntries(
      const std::string& name);
  absl::StatusOr<v1::ModelVersion> ReadManifest(const std::string& name,
                                                int64_t version);
  absl::StatusOr<std::map<std::string, v1::Alias>> ReadAliases(
      const std::string& name);
  absl::StatusOr<v1::Alias> WriteAlias(const std::string& name,
                                       const std::string& alias,
                                       int64_t version)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(alias_mu_);
  absl::StatusOr<int64_t> AllocateAndWrite(v1::ModelVersion* manifest);
  // The blob's index: from memory, from storage, or made by reading the
  // whole blob (then stored). DATA_LOSS when the blob does not match.
  absl::StatusOr<std::shared_ptr<const ChunkIndex>> IndexFor(
      const v1::Component& component);
  // The blob's stored index; NOT_FOUND when it has none (or a damaged one,
  // or one that describes other bytes).
  absl::StatusOr<ChunkIndex> LoadIndex(const v1::Component& component);
  // Reads and hashes the whole blob to make its index, failing with
  // DATA_LOSS when the blob does not match its digest.
  absl::StatusOr<ChunkIndex> BuildIndex(const v1::Component& component);
  absl::Status SendVerified(const v1::Component& component,
                            const ChunkIndex& index, const ChunkSink& sink);
  absl::Status SendSegments(const v1::Component& component,
                            const ChunkIndex& index, int64_t segment_bytes,
                            const ChunkSink& sink);
  void Changed(const std::string& name);

  // Constant after construction.
  const std::shared_ptr<storage::ObjectStore> store_;
  const ModelStoreOptions options_;

  std::atomic<bool> serialise_{true};
  // Held (exclusively) while allocating versions when the store does not
  // enforce exclusive writes.
  absl::Mutex commit_mu_;
  // Commits hold it shared from checking their blobs until the manifest is
  // written; garbage collection holds it exclusively, so a blob a commit has
  // just counted on cannot be collected under it (within this process).
  absl::Mutex gc_mu_;
  // Orders alias changes against version deletion, so a version cannot be
  // deleted while an alias is being pointed at it.
  absl::Mutex alias_mu_;
  // Indexes depend only on the blob's bytes, so recently used ones are
  // kept: a pull then starts without reading one from storage.
  static constexpr size_t kCachedIndexes = 64;
  absl::Mutex index_mu_;
  std::map<std::string, std::shared_ptr<const ChunkIndex>> index_cache_
      ABSL_GUARDED_BY(index_mu_);
  std::deque<std::string> index_order_ ABSL_GUARDED_BY(index_mu_);
  absl::Mutex listener_mu_;
  std::function<void(const std::string&)> listener_
      ABSL_GUARDED_BY(listener_mu_);
};

}  // namespace kennel::registry

#endif  // KENNEL_SERVICES_REGISTRY_MODEL_STORE_H_
