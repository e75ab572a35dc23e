// An object store in a local folder: each key is a file under the root.
// Writes are staged in <root>/.staging and published by link(2) (exclusive)
// or rename(2), after fsync, so a crash leaves either the whole object or
// none of it.
#ifndef KENNEL_COMMON_STORAGE_FILE_STORE_H_
#define KENNEL_COMMON_STORAGE_FILE_STORE_H_

#include <memory>
#include <string>

#include "common/storage/object_store.h"

namespace kennel::storage {

// Thread-safe; several processes may share one root (exclusive writes rely
// on link(2), which is atomic on local file systems).
class FileStore : public ObjectStore {
 public:
  // Creates the root and its staging folder when missing.
  static absl::StatusOr<std::unique_ptr<FileStore>> Open(
      const std::string& root);

  std::string Describe() const override { return "file://" + root_; }
  bool is_local() const override { return true; }
  absl::StatusOr<bool> CheckExclusiveWrites() override { return true; }

  absl::Status Put(const std::string& key, absl::string_view data,
                   const WriteOptions& options) override;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(
      const std::string& key, const WriteOptions& options) override;
  absl::Status Read(const std::string& key, int64_t offset, int64_t length,
                    const ByteSink& sink) override;
  absl::Status ReadPieces(const std::string& key, int64_t offset,
                          int64_t length, int64_t piece_bytes,
                          const PieceSink& sink) override;
  absl::StatusOr<ObjectInfo> Stat(const std::string& key) override;
  absl::StatusOr<ListResult> List(const ListOptions& options) override;
  absl::Status Delete(const std::string& key) override;
  absl::StatusOr<int64_t> CleanStaging(absl::Time before) override;

  const std::string& root() const { return root_; }
  // The file that holds `key`.
  std::string PathOf(const std::string& key) const { return root_ + "/" + key; }

 private:
  explicit FileStore(std::string root);

  // Constant after construction.
  const std::string root_;
  const std::string staging_;
};

}  // namespace kennel::storage

#endif  // KENNEL_COMMON_STORAGE_FILE_STORE_H_
