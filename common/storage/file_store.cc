#include "common/storage/file_store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kennel::storage {
namespace {

constexpr size_t kReadBytes = 1 << 20;
// A writer starts writeback of what it has written every this many bytes.
constexpr int64_t kWritebackBytes = int64_t{8} << 20;

absl::Status ErrnoStatus(int err, absl::string_view what,
                         absl::string_view path) {
  absl::StatusCode code = absl::StatusCode::kInternal;
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      code = absl::StatusCode::kNotFound;
      break;
    case EEXIST:
      code = absl::StatusCode::kAlreadyExists;
      break;
    case EACCES:
    case EPERM:
    case EROFS:
      code = absl::StatusCode::kPermissionDenied;
      break;
    case ENOSPC:
    case EDQUOT:
      code = absl::StatusCode::kResourceExhausted;
      break;
    case EIO:
      code = absl::StatusCode::kUnavailable;
      break;
  }
  return absl::Status(
      code, absl::StrCat("cannot ", what, " ", path, ": ", strerror(err)));
}

absl::Status Errno(absl::string_view what, absl::string_view path) {
  return ErrnoStatus(errno, what, path);
}

std::string Parent(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos || slash == 0 ? "/" : path.substr(0, slash);
}

// mkdir -p; `path` is absolute.
absl::Status MakeDirs(const std::string& path) {
  if (mkdir(path.c_str(), 0755) == 0 || errno == EEXIST)
    return absl::OkStatus();
  if (errno != ENOENT) return Errno("create folder", path);
  RETURN_IF_ERROR(MakeDirs(Parent(path)));
  if (mkdir(path.c_str(), 0755) == 0 || errno == EEXIST)
    return absl::OkStatus();
  return Errno("create folder", path);
}

void SyncDir(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  fsync(fd);
  close(fd);
}

absl::Time MTime(const struct stat& st) {
  return absl::FromUnixSeconds(st.st_mtim.tv_sec) +
         absl::Nanoseconds(st.st_mtim.tv_nsec);
}

class FileWriter : public ObjectWriter {
 public:
  FileWriter(int fd, std::string temp_path, std::string final_path,
             bool exclusive)
      : fd_(fd),
        temp_path_(std::move(temp_path)),
        final_path_(std::move(final_path)),
        exclusive_(exclusive) {}

  ~FileWriter() override {
    if (fd_ >= 0) close(fd_);
    if (!committed_) unlink(temp_path_.c_str());
  }

  absl::Status Write(absl::string_view data) override {
    if (fd_ < 0) return absl::FailedPreconditionError("writer is closed");
    const char* p = data.data();
    size_t left = data.size();
    while (left > 0) {
      ssize_t n = write(fd_, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Errno("write", temp_path_);
      p += n;
      left -= static_cast<size_t>(n);
    }
    written_ += static_cast<int64_t>(data.size());
    if (written_ - flushing_from_ >= kWritebackBytes) {
      // Start writing the bytes back now, in the background, so the
      // fdatasync in Commit() finds little left to do. Only a hint: a
      // failure here shows up in fdatasync.
      sync_file_range(fd_, flushing_from_, written_ - flushing_from_,
                      SYNC_FILE_RANGE_WRITE);
      flushing_from_ = written_;
    }
    return absl::OkStatus();
  }

  absl::Status Commit() override {
    if (fd_ < 0) return absl::FailedPreconditionError("writer is closed");
    // The bytes reach the disk before the name does, so a crash cannot
    // leave a published name with missing contents.
    if (fdatasync(fd_) != 0) return Errno("sync", temp_path_);
    int fd = fd_;
    fd_ = -1;
    if (close(fd) != 0) return Errno("close", temp_path_);
    const std::string dir = Parent(final_path_);
    // A concurrent Delete may remove an empty parent folder between mkdir
    // and link; then make it again.
    for (int attempt = 0;; ++attempt) {
      RETURN_IF_ERROR(MakeDirs(dir));
      int rc = exclusive_ ? link(temp_path_.c_str(), final_path_.c_str())
                          : rename(temp_path_.c_str(), final_path_.c_str());
      if (rc == 0) break;
      int err = errno;
      if (err == ENOENT && attempt < 5) continue;
      return ErrnoStatus(err, exclusive_ ? "create" : "write", final_path_);
    }
    if (exclusive_) unlink(temp_path_.c_str());
    committed_ = true;
    SyncDir(dir);
    return absl::OkStatus();
  }

  int64_t bytes_written() const override { return written_; }

 private:
  int fd_;
  const std::string temp_path_;
  const std::string final_path_;
  const bool exclusive_;
  int64_t written_ = 0;
  // Bytes before this have been handed to writeback.
  int64_t flushing_from_ = 0;
  bool committed_ = false;
};

struct Entry {
  std::string key;  // a prefix entry ends with '/'
  bool is_prefix = false;
  ObjectInfo info;
};

// Adds the files under `dir` (key prefix `key_dir`, empty or ending in '/')
// whose keys start with `prefix`, recursing when `recursive`, otherwise
// reporting subfolders as prefixes.
absl::Status Walk(const std::string& dir, const std::string& key_dir,
                  const std::string& prefix, bool recursive,
                  std::vector<Entry>* out) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT || errno == ENOTDIR) return absl::OkStatus();
    return Errno("list", dir);
  }
  std::vector<std::pair<std::string, bool>> children;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;  // ".", "..", staging, temp files
    children.emplace_back(e->d_name, false);
  }
  closedir(d);
  for (auto& [name, unused] : children) {
    const std::string path = dir + "/" + name;
    const std::string key = key_dir + name;
    struct stat st;
    if (stat(path.c_str(), &st) != 0) continue;  // removed meanwhile
    if (S_ISDIR(st.st_mode)) {
      const std::string sub = key + "/";
      // Descend only where keys with the prefix can be.
      if (!absl::StartsWith(sub, prefix) && !absl::StartsWith(prefix, sub)) {
        continue;
      }
      if (recursive || absl::StartsWith(prefix, sub)) {
        RETURN_IF_ERROR(Walk(path, sub, prefix, recursive, out));
      } else {
        Entry entry;
        entry.key = sub;
        entry.is_prefix = true;
        out->push_back(std::move(entry));
      }
    } else if (S_ISREG(st.st_mode) && absl::StartsWith(key, prefix)) {
      Entry entry;
      entry.key = key;
      entry.info.key = key;
      entry.info.size = st.st_size;
      entry.info.modified = MTime(st);
      out->push_back(std::move(entry));
    }
  }
  return absl::OkStatus();
}

}  // namespace

FileStore::FileStore(std::string root)
    : root_(std::move(root)), staging_(root_ + "/.staging") {}

absl::StatusOr<std::unique_ptr<FileStore>> FileStore::Open(
    const std::string& root) {
  if (root.empty() || root[0] != '/') {
    return absl::InvalidArgumentError(
        "a file store needs an absolute path (file:///var/lib/kennel), got \"" +
        root + "\"");
  }
  std::string clean = root;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  auto store = std::unique_ptr<FileStore>(new FileStore(clean));
  RETURN_IF_ERROR(MakeDirs(store->staging_));
  if (access(store->staging_.c_str(), W_OK) != 0) {
    return Errno("write to", store->staging_);
  }
  return store;
}

absl::Status FileStore::Put(const std::string& key, absl::string_view data,
                            const WriteOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<ObjectWriter> writer,
                   NewWriter(key, options));
  RETURN_IF_ERROR(writer->Write(data));
  return writer->Commit();
}

absl::StatusOr<std::unique_ptr<ObjectWriter>> FileStore::NewWriter(
    const std::string& key, const WriteOptions& options) {
  RETURN_IF_ERROR(ValidateKey(key));
  std::string temp = staging_ + "/.write-XXXXXX";
  int fd = mkostemp(temp.data(), O_CLOEXEC);
  if (fd < 0) {
    // The staging folder may have been removed under a running process.
    if (errno == ENOENT && MakeDirs(staging_).ok()) {
      fd = mkostemp(temp.data(), O_CLOEXEC);
    }
    if (fd < 0) return Errno("create a staging file in", staging_);
  }
  fchmod(fd, 0644);
  return std::unique_ptr<ObjectWriter>(
      new FileWriter(fd, std::move(temp), PathOf(key), options.exclusive));
}

absl::Status FileStore::Read(const std::string& key, int64_t offset,
                             int64_t length, const ByteSink& sink) {
  RETURN_IF_ERROR(ValidateKey(key));
  const std::string path = PathOf(key);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError("no object " + key);
    return Errno("open", path);
  }
  std::string buffer(kReadBytes, '\0');
  absl::Status status;
  int64_t position = offset;
  while (length < 0 || position < offset + length) {
    size_t want = kReadBytes;
    if (length >= 0) {
      want = std::min<int64_t>(want, offset + length - position);
    }
    ssize_t n = pread(fd, buffer.data(), want, position);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = Errno("read", path);
      break;
    }
    if (n == 0) {
      if (length >= 0) {
        status = absl::OutOfRangeError(absl::StrCat(
            key, " ends at ", position, ", before byte ", offset + length));
      }
      break;
    }
    position += n;
    status = sink(absl::string_view(buffer.data(), static_cast<size_t>(n)));
    if (!status.ok()) break;
  }
  close(fd);
  return status;
}

absl::Status FileStore::ReadPieces(const std::string& key, int64_t offset,
                                   int64_t length, int64_t piece_bytes,
                                   const PieceSink& sink) {
  RETURN_IF_ERROR(ValidateKey(key));
  if (piece_bytes <= 0) {
    return absl::InvalidArgumentError("pieces must have at least one byte");
  }
  const std::string path = PathOf(key);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError("no object " + key);
    return Errno("open", path);
  }
  posix_fadvise(fd, offset, length < 0 ? 0 : length, POSIX_FADV_SEQUENTIAL);
  // Reused between pieces: after the sink swaps a piece out, this holds the
  // buffer it gave back, which is usually already the right size (so
  // resize() writes nothing).
  std::string piece;
  absl::Status status;
  int64_t position = offset;
  bool at_end = false;
  while (!at_end && (length < 0 || position < offset + length)) {
    int64_t want = piece_bytes;
    if (length >= 0) want = std::min(want, offset + length - position);
    piece.resize(static_cast<size_t>(want));
    size_t filled = 0;
    while (filled < piece.size()) {
      ssize_t n = pread(fd, piece.data() + filled, piece.size() - filled,
                        position + static_cast<int64_t>(filled));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        status = Errno("read", path);
        break;
      }
      if (n == 0) {
        at_end = true;
        break;
      }
      filled += static_cast<size_t>(n);
    }
    if (!status.ok()) break;
    if (at_end && length >= 0) {
      status = absl::OutOfRangeError(
          absl::StrCat(key, " ends at ", position + filled, ", before byte ",
                       offset + length));
      break;
    }
    if (filled == 0) break;
    piece.resize(filled);
    position += static_cast<int64_t>(filled);
    status = sink(&piece);
    if (!status.ok()) break;
  }
  close(fd);
  return status;
}

absl::StatusOr<ObjectInfo> FileStore::Stat(const std::string& key) {
  RETURN_IF_ERROR(ValidateKey(key));
  struct stat st;
  if (stat(PathOf(key).c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) {
      return absl::NotFoundError("no object " + key);
    }
    return Errno("stat", PathOf(key));
  }
  if (!S_ISREG(st.st_mode)) return absl::NotFoundError("no object " + key);
  ObjectInfo info;
  info.key = key;
  info.size = st.st_size;
  info.modified = MTime(st);
  return info;
}

absl::StatusOr<ListResult> FileStore::List(const ListOptions& options) {
  if (!options.delimiter.empty() && options.delimiter != "/") {
    return absl::InvalidArgumentError("a file store lists with \"/\" only");
  }
  // Start at the folder that holds the prefix's last complete segment.
  size_t slash = options.prefix.rfind('/');
  std::string key_dir =
      slash == std::string::npos ? "" : options.prefix.substr(0, slash + 1);
  if (!key_dir.empty()) RETURN_IF_ERROR(ValidateKey(key_dir.substr(0, slash)));
  std::string dir = key_dir.empty() ? root_ : PathOf(key_dir.substr(0, slash));
  std::vector<Entry> entries;
  RETURN_IF_ERROR(Walk(dir, key_dir, options.prefix,
                       /*recursive=*/options.delimiter.empty(), &entries));
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.key < b.key; });
  ListResult result;
  const int max_keys = std::clamp(options.max_keys, 1, 1000);
  int taken = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    Entry& entry = entries[i];
    if (!options.page_token.empty() && entry.key <= options.page_token)
      continue;
    if (taken == max_keys) {
      result.next_page_token = entries[i - 1].key;
      break;
    }
    if (entry.is_prefix) {
      result.prefixes.push_back(entry.key);
    } else {
      result.objects.push_back(std::move(entry.info));
    }
    ++taken;
  }
  return result;
}

absl::Status FileStore::Delete(const std::string& key) {
  RETURN_IF_ERROR(ValidateKey(key));
  const std::string path = PathOf(key);
  if (unlink(path.c_str()) != 0 && errno != ENOENT)
    return Errno("delete", path);
  // Empty folders would list as prefixes, unlike S3; remove them up to the
  // root. rmdir fails harmlessly on a folder that is not empty.
  for (std::string dir = Parent(path); dir.size() > root_.size();
       dir = Parent(dir)) {
    if (rmdir(dir.c_str()) != 0) break;
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> FileStore::CleanStaging(absl::Time before) {
  DIR* d = opendir(staging_.c_str());
  if (d == nullptr) return Errno("list", staging_);
  int64_t removed = 0;
  while (dirent* e = readdir(d)) {
    if (!absl::StartsWith(e->d_name, ".write-")) continue;
    const std::string path = staging_ + "/" + e->d_name;
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && MTime(st) < before &&
        unlink(path.c_str()) == 0) {
      ++removed;
    }
  }
  closedir(d);
  return removed;
}

}  // namespace kennel::storage
