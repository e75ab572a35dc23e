#include "common/storage/memory_store.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kennel::storage {

class MemoryWriter : public ObjectWriter {
 public:
  MemoryWriter(MemoryStore* store, std::string key, WriteOptions options)
      : store_(store), key_(std::move(key)), options_(std::move(options)) {
    absl::MutexLock lock(&store_->mu_);
    ++store_->open_writers_;
  }
  ~MemoryWriter() override {
    absl::MutexLock lock(&store_->mu_);
    --store_->open_writers_;
  }
  absl::Status Write(absl::string_view data) override {
    RETURN_IF_ERROR(store_->Fail());
    data_.append(data.data(), data.size());
    return absl::OkStatus();
  }
  absl::Status Commit() override { return store_->Put(key_, data_, options_); }
  int64_t bytes_written() const override { return data_.size(); }

 private:
  MemoryStore* const store_;
  const std::string key_;
  const WriteOptions options_;
  std::string data_;
};

absl::Status MemoryStore::Fail() const {
  absl::MutexLock lock(&mu_);
  return failure_;
}

absl::StatusOr<bool> MemoryStore::CheckExclusiveWrites() {
  RETURN_IF_ERROR(Fail());
  absl::MutexLock lock(&mu_);
  return !ignore_exclusive_;
}

absl::Status MemoryStore::Put(const std::string& key, absl::string_view data,
                              const WriteOptions& options) {
  RETURN_IF_ERROR(ValidateKey(key));
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(failure_);
  if (options.exclusive && !ignore_exclusive_ && objects_.count(key)) {
    return absl::AlreadyExistsError(key + " already exists");
  }
  objects_[key] = Object{std::string(data), absl::Now()};
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ObjectWriter>> MemoryStore::NewWriter(
    const std::string& key, const WriteOptions& options) {
  RETURN_IF_ERROR(ValidateKey(key));
  RETURN_IF_ERROR(Fail());
  return std::unique_ptr<ObjectWriter>(new MemoryWriter(this, key, options));
}

absl::Status MemoryStore::Read(const std::string& key, int64_t offset,
                               int64_t length, const ByteSink& sink) {
  RETURN_IF_ERROR(ValidateKey(key));
  std::string copy;
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(failure_);
    auto it = objects_.find(key);
    if (it == objects_.end()) return absl::NotFoundError("no object " + key);
    const std::string& data = it->second.data;
    if (offset > static_cast<int64_t>(data.size()) ||
        (length >= 0 && offset + length > static_cast<int64_t>(data.size()))) {
      return absl::OutOfRangeError("read past the end of " + key);
    }
    copy = data.substr(offset, length < 0 ? std::string::npos : length);
  }
  // Deliver in pieces, as a network read would.
  constexpr size_t kPiece = 256 << 10;
  for (size_t at = 0; at < copy.size(); at += kPiece) {
    RETURN_IF_ERROR(sink(absl::string_view(copy).substr(at, kPiece)));
  }
  return absl::OkStatus();
}

absl::StatusOr<ObjectInfo> MemoryStore::Stat(const std::string& key) {
  RETURN_IF_ERROR(ValidateKey(key));
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(failure_);
  auto it = objects_.find(key);
  if (it == objects_.end()) return absl::NotFoundError("no object " + key);
  return ObjectInfo{key, static_cast<int64_t>(it->second.data.size()),
                    it->second.modified};
}

absl::StatusOr<ListResult> MemoryStore::List(const ListOptions& options) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(failure_);
  ListResult result;
  const int max_keys = std::clamp(options.max_keys, 1, 1000);
  int taken = 0;
  std::string last;
  for (auto it = objects_.lower_bound(options.prefix);
       it != objects_.end() && absl::StartsWith(it->first, options.prefix);
       ++it) {
    std::string entry = it->first;
    bool is_prefix = false;
    if (!options.delimiter.empty()) {
      size_t cut = entry.find(options.delimiter, options.prefix.size());
      if (cut != std::string::npos) {
        entry = entry.substr(0, cut + options.delimiter.size());
        is_prefix = true;
      }
    }
    if (!options.page_token.empty() && entry <= options.page_token) continue;
    if (is_prefix && entry == last) continue;
    if (taken == max_keys) {
      result.next_page_token = last;
      break;
    }
    if (is_prefix) {
      result.prefixes.push_back(entry);
    } else {
      result.objects.push_back(
          ObjectInfo{it->first, static_cast<int64_t>(it->second.data.size()),
                     it->second.modified});
    }
    last = entry;
    ++taken;
  }
  return result;
}

absl::Status MemoryStore::Delete(const std::string& key) {
  RETURN_IF_ERROR(ValidateKey(key));
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(failure_);
  objects_.erase(key);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> MemoryStore::CleanStaging(absl::Time before) {
  RETURN_IF_ERROR(Fail());
  return 0;
}

void MemoryStore::set_ignore_exclusive(bool ignore) {
  absl::MutexLock lock(&mu_);
  ignore_exclusive_ = ignore;
}

void MemoryStore::set_failure(absl::Status failure) {
  absl::MutexLock lock(&mu_);
  failure_ = std::move(failure);
}

void MemoryStore::Overwrite(const std::string& key, std::string data) {
  absl::MutexLock lock(&mu_);
  objects_[key].data = std::move(data);
}

void MemoryStore::SetModified(const std::string& key, absl::Time modified) {
  absl::MutexLock lock(&mu_);
  objects_[key].modified = modified;
}

int MemoryStore::open_writers() const {
  absl::MutexLock lock(&mu_);
  return open_writers_;
}

int64_t MemoryStore::object_count() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(objects_.size());
}

}  // namespace kennel::storage
