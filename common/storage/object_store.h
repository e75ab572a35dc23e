// One interface over the places Kennel keeps objects: a local folder
// (file_store.h) and an S3 bucket (s3_store.h). Keys are '/'-separated
// relative paths such as "blobs/sha256/<hex>"; callers keep them to
// [A-Za-z0-9._-/] with no empty, "." or ".." segments.
#ifndef KENNEL_COMMON_STORAGE_OBJECT_STORE_H_
#define KENNEL_COMMON_STORAGE_OBJECT_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kennel::storage {

struct ObjectInfo {
  std::string key;
  int64_t size = 0;
  absl::Time modified = absl::InfinitePast();
};

struct ListOptions {
  // Only keys that start with this.
  std::string prefix;
  // "/" groups keys below the next '/' after the prefix into `prefixes`
  // (one level, like a directory listing); empty lists every key.
  std::string delimiter;
  // Continue after a previous page (its next_page_token).
  std::string page_token;
  // At most this many keys and prefixes together (1..1000).
  int max_keys = 1000;
};

struct ListResult {
  // In ascending key order.
  std::vector<ObjectInfo> objects;
  // Each ends with the delimiter.
  std::vector<std::string> prefixes;
  // Empty on the last page.
  std::string next_page_token;
};

struct WriteOptions {
  // Create the object only if the key is free; ALREADY_EXISTS otherwise
  // (S3: If-None-Match: *; folder: link(2) from a staging file). Stores that
  // ignore the condition are detected by CheckExclusiveWrites().
  bool exclusive = false;
  // Expected size in bytes, or -1 when unknown. Lets S3 start a multipart
  // upload while the bytes are still arriving.
  int64_t size_hint = -1;
  // 64 hex digits of the content's SHA-256 when the caller knows it; S3 then
  // signs the payload hash and checks the upload itself.
  std::string sha256_hex;
};

// What a request asks of the storage calls made on its behalf: to end by its
// deadline and to stop once its caller has gone. A thread's calls follow the
// limits installed on it with ScopedCallLimits; a thread that works for a
// request (a part upload, a segment read) installs the request's limits,
// taken from CurrentCallLimits() where it was started. Calls made with none
// (start-up, background work) follow the store's own retry policy alone.
struct CallLimits {
  // Calls still failing at this time give up with UNAVAILABLE. A caller that
  // must answer by a deadline sets this a little before it.
  absl::Time deadline = absl::InfiniteFuture();
  // True once the caller has gone; calls then stop with CANCELLED. May be
  // empty; called from any thread that works for the request.
  std::function<bool()> cancelled;
};

// The limits installed on this thread; null when there are none.
std::shared_ptr<const CallLimits> CurrentCallLimits();

// Installs `limits` (null for none) on this thread for its lifetime, and
// restores the previous ones after.
class ScopedCallLimits {
 public:
  explicit ScopedCallLimits(std::shared_ptr<const CallLimits> limits);
  ~ScopedCallLimits();
  ScopedCallLimits(const ScopedCallLimits&) = delete;
  ScopedCallLimits& operator=(const ScopedCallLimits&) = delete;

 private:
  std::shared_ptr<const CallLimits> previous_;
};

// Starts a thread that works for the current request: `work` runs under the
// limits installed on the calling thread, so its storage calls end with the
// request's deadline and stop when its caller goes.
template <typename F>
std::thread ThreadForRequest(F work) {
  return std::thread(
      [limits = CurrentCallLimits(), work = std::move(work)]() mutable {
        ScopedCallLimits scope(limits);
        work();
      });
}

// Receives the bytes of a read in order; an error stops the read and is
// returned from it.
using ByteSink = std::function<absl::Status(absl::string_view)>;
// Receives the bytes of a read in order, in pieces it may keep: it may swap
// the string's contents out (and leave another string's in their place,
// whose buffer the read then reuses). An error stops the read.
using PieceSink = std::function<absl::Status(std::string* piece)>;

// An object being written. Bytes go to a staging area and nothing is visible
// under the key until Commit() succeeds; destroying an uncommitted writer
// discards them. Not thread-safe.
class ObjectWriter {
 public:
  virtual ~ObjectWriter() = default;
  virtual absl::Status Write(absl::string_view data) = 0;
  // Publishes the object. Call at most once.
  virtual absl::Status Commit() = 0;
  virtual int64_t bytes_written() const = 0;
};

// Implementations are thread-safe. Errors: NOT_FOUND for a missing key,
// ALREADY_EXISTS for a refused exclusive write, PERMISSION_DENIED when the
// store refuses the credentials, UNAVAILABLE when it cannot be reached
// (after retries), FAILED_PRECONDITION when it is misconfigured (a missing
// bucket), DATA_LOSS for a reply that makes no sense.
class ObjectStore {
 public:
  virtual ~ObjectStore() = default;

  // "file:///var/lib/kennel" or "s3://bucket/prefix at http://host:port";
  // never a secret.
  virtual std::string Describe() const = 0;
  // True when reads are local and cheap enough to read an object twice.
  virtual bool is_local() const = 0;

  // Whether the store refuses an exclusive write to an existing key, found
  // by trying it on a scratch key. Errors when the store cannot be reached.
  virtual absl::StatusOr<bool> CheckExclusiveWrites() = 0;

  virtual absl::Status Put(const std::string& key, absl::string_view data,
                           const WriteOptions& options) = 0;
  virtual absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(
      const std::string& key, const WriteOptions& options) = 0;

  // Sends bytes [offset, offset + length) of the object to `sink`; a
  // negative length reads to the end.
  virtual absl::Status Read(const std::string& key, int64_t offset,
                            int64_t length, const ByteSink& sink) = 0;
  // Like Read(), but hands the bytes over in pieces of exactly
  // `piece_bytes` (the last may be shorter), so a caller that forwards
  // whole chunks need not copy them. The default assembles the pieces from
  // Read(); a local store reads straight into them.
  virtual absl::Status ReadPieces(const std::string& key, int64_t offset,
                                  int64_t length, int64_t piece_bytes,
                                  const PieceSink& sink);
  virtual absl::StatusOr<ObjectInfo> Stat(const std::string& key) = 0;
  virtual absl::StatusOr<ListResult> List(const ListOptions& options) = 0;
  // Succeeds when the key is already absent.
  virtual absl::Status Delete(const std::string& key) = 0;

  // Removes staged bytes of writes that never committed and began before
  // `before` (files left by a crash; S3 multipart uploads never completed).
  // Returns how many it removed.
  virtual absl::StatusOr<int64_t> CleanStaging(absl::Time before) = 0;

  // The whole object as a string; for small objects (manifests).
  absl::StatusOr<std::string> ReadAll(const std::string& key);
  // Every key under `prefix`, following pages.
  absl::StatusOr<std::vector<ObjectInfo>> ListAll(const std::string& prefix);
};

// INVALID_ARGUMENT unless `key` is a relative path of [A-Za-z0-9._-]
// segments, none empty, "." or "..".
absl::Status ValidateKey(absl::string_view key);

struct S3Settings {
  // http(s)://host[:port]; empty means https://s3.<region>.amazonaws.com.
  std::string endpoint;
  std::string region = "us-east-1";
  // http://host/bucket/key instead of http://bucket.host/key.
  bool path_style = false;
  // Uploads larger than this go in parts.
  int64_t multipart_threshold = int64_t{64} << 20;
  int64_t part_size = int64_t{16} << 20;
  // Part uploads in flight at once per object.
  int part_parallelism = 4;
  // One request is tried this many times in all (5xx and connection
  // errors only), backing off from 100 ms, within `retry_budget` and the
  // CallLimits deadline, whichever ends first.
  int max_attempts = 5;
  absl::Duration retry_budget = absl::Seconds(15);
  absl::Duration connect_timeout = absl::Seconds(3);
  // A transfer that moves no byte for this long fails (and is retried).
  absl::Duration stall_timeout = absl::Seconds(10);
  // Where uploads are staged on local disk; empty means $TMPDIR or /tmp.
  std::string spool_dir;
  // From AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN when
  // empty.
  std::string access_key;
  std::string secret_key;
  std::string session_token;
};

// Opens "file:///abs/path" (created when missing) or "s3://bucket/prefix".
absl::StatusOr<std::unique_ptr<ObjectStore>> OpenObjectStore(
    const std::string& url, const S3Settings& s3);

}  // namespace kennel::storage

#endif  // KENNEL_COMMON_STORAGE_OBJECT_STORE_H_
