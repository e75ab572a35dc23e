// An object store in memory, for tests: behaves like S3 (no local reads,
// keys with no folders), and can be told to ignore exclusive writes (as
// s3rver does) or to fail operations (an outage).
#ifndef KENNEL_COMMON_STORAGE_MEMORY_STORE_H_
#define KENNEL_COMMON_STORAGE_MEMORY_STORE_H_

#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/storage/object_store.h"

namespace kennel::storage {

// Thread-safe.
class MemoryStore : public ObjectStore {
 public:
  MemoryStore() = default;

  std::string Describe() const override { return "memory://"; }
  bool is_local() const override { return false; }
  absl::StatusOr<bool> CheckExclusiveWrites() override;

  absl::Status Put(const std::string& key, absl::string_view data,
                   const WriteOptions& options) override;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(
      const std::string& key, const WriteOptions& options) override;
  absl::Status Read(const std::string& key, int64_t offset, int64_t length,
                    const ByteSink& sink) override;
  absl::StatusOr<ObjectInfo> Stat(const std::string& key) override;
  absl::StatusOr<ListResult> List(const ListOptions& options) override;
  absl::Status Delete(const std::string& key) override;
  absl::StatusOr<int64_t> CleanStaging(absl::Time before) override;

  // Test controls.
  // Exclusive writes overwrite like plain ones.
  void set_ignore_exclusive(bool ignore);
  // Every operation fails with this status until it is cleared (OK).
  void set_failure(absl::Status failure);
  // Replaces an object's bytes and time without any check (corruption, age).
  void Overwrite(const std::string& key, std::string data);
  void SetModified(const std::string& key, absl::Time modified);
  // Uncommitted writers that are alive.
  int open_writers() const;
  int64_t object_count() const;

 private:
  friend class MemoryWriter;
  struct Object {
    std::string data;
    absl::Time modified;
  };
  absl::Status Fail() const;

  mutable absl::Mutex mu_;
  std::map<std::string, Object> objects_ ABSL_GUARDED_BY(mu_);
  bool ignore_exclusive_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  int open_writers_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kennel::storage

#endif  // KENNEL_COMMON_STORAGE_MEMORY_STORE_H_
