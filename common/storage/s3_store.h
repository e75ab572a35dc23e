// An object store in an S3 bucket (AWS S3, Ceph radosgw, MinIO, ...), spoken
// to with libcurl, which signs each request itself (CURLOPT_AWS_SIGV4).
// Large uploads go in parts while the bytes still arrive; failed requests
// are retried with backoff on 5xx replies and connection errors only.
#ifndef KENNEL_COMMON_STORAGE_S3_STORE_H_
#define KENNEL_COMMON_STORAGE_S3_STORE_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/storage/object_store.h"

typedef void CURL;

namespace kennel::storage {

// Thread-safe. Keeps a small pool of curl handles, so connections are
// reused between requests.
class S3Store : public ObjectStore {
 public:
  // `prefix` may be empty; keys live under "<prefix>/". Reads credentials
  // from the environment when `settings` has none.
  static absl::StatusOr<std::unique_ptr<S3Store>> Open(
      const std::string& bucket, const std::string& prefix,
      S3Settings settings);
  ~S3Store() override;

  std::string Describe() const override;
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

  // One HTTP exchange, described independently of curl. Public for the
  // writer in s3_store.cc.
  struct Request {
    std::string method = "GET";
    // Object key below the store prefix; empty addresses the bucket.
    std::string key;
    // Already in S3's canonical form: sorted, each "name=value" encoded.
    std::vector<std::pair<std::string, std::string>> query;
    std::vector<std::string> headers;
    // The body: `data` in memory, or `fd` bytes [fd_offset, +fd_length).
    absl::string_view data;
    int fd = -1;
    int64_t fd_offset = 0;
    int64_t fd_length = 0;
    // x-amz-content-sha256: the body's hex digest, or UNSIGNED-PAYLOAD.
    std::string payload_hash;
    // For GET: receives a 2xx body; `range_offset`/`range_length` select the
    // bytes (a retry resumes after what the sink already has).
    const ByteSink* sink = nullptr;
    int64_t range_offset = 0;
    int64_t range_length = -1;
    // What the request does, for messages ("PUT", "GET", "LIST", ...).
    std::string op;
  };
  struct Response {
    long http_code = 0;
    std::string body;  // non-2xx, or 2xx without a sink
    std::map<std::string, std::string> headers;  // names lowercased
    int64_t filetime = -1;
  };
  // Sends `request`, retrying where that is safe; a non-2xx reply becomes
  // the matching status.
  absl::StatusOr<Response> Perform(Request request);

  const S3Settings& settings() const { return settings_; }

 private:
  S3Store(std::string bucket, std::string prefix, S3Settings settings);

  std::string FullKey(const std::string& key) const;
  std::string Url(const Request& request) const;
  CURL* AcquireHandle();
  void ReleaseHandle(CURL* handle);

  // Constant after construction.
  const std::string bucket_;
  const std::string prefix_;  // without a trailing '/'
  const S3Settings settings_;
  std::string scheme_;
  std::string host_;  // host[:port]
  std::string sigv4_;

  absl::Mutex mu_;
  std::vector<CURL*> idle_handles_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kennel::storage

#endif  // KENNEL_COMMON_STORAGE_S3_STORE_H_
