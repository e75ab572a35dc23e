#include "common/storage/s3_store.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <glog/logging.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <pugixml.hpp>
#include <random>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/sha256.h"
#include "common/status.h"

namespace kennel::storage {
namespace {

constexpr char kUnsignedPayload[] = "UNSIGNED-PAYLOAD";
// Error bodies and listings are small; a reply bigger than this is not S3.
constexpr size_t kMaxBufferedBody = 32 << 20;

// S3's URI encoding: everything but unreserved characters, and '/' too
// unless it separates key segments.
std::string UriEncode(absl::string_view in, bool keep_slash) {
  std::string out;
  for (unsigned char c : in) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' ||
        c == '~' || (keep_slash && c == '/')) {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "%%%02X", c);
    }
  }
  return out;
}

std::string XmlEscape(absl::string_view in) {
  std::string out;
  for (char c : in) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

std::string RandomHex(int bytes) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string out;
  for (int i = 0; i < bytes; ++i) {
    absl::StrAppendFormat(&out, "%02x", static_cast<unsigned>(rng() & 0xff));
  }
  return out;
}

bool RetryableCurlCode(CURLcode code) {
  switch (code) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
      return true;
    default:
      return false;
  }
}

// State one transfer's callbacks share.
struct Transfer {
  const S3Store::Request* request = nullptr;
  CURL* handle = nullptr;
  S3Store::Response* response = nullptr;
  // Upload position within the body.
  int64_t body_position = 0;
  // 2xx body bytes given to the sink in this attempt.
  int64_t delivered = 0;
  int code_checked = 0;  // 0 unknown, 1 to sink, 2 to body
  absl::Status sink_status;
  absl::Status read_status;
  // The caller's limits, when it can cancel; asked at most every
  // kCancelCheck (curl reports progress far more often while bytes move).
  const CallLimits* limits = nullptr;
  absl::Time next_cancel_check = absl::InfinitePast();
  bool cancelled = false;
};

constexpr absl::Duration kCancelCheck = absl::Milliseconds(100);

bool CallerCancelled(const CallLimits* limits) {
  return limits != nullptr && limits->cancelled && limits->cancelled();
}

// curl calls this about once a second while a transfer waits, and after
// each piece it moves; a non-zero return aborts the transfer.
int Progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  auto* t = static_cast<Transfer*>(user);
  const absl::Time now = absl::Now();
  if (now < t->next_cancel_check) return 0;
  t->next_cancel_check = now + kCancelCheck;
  t->cancelled = CallerCancelled(t->limits);
  return t->cancelled ? 1 : 0;
}

size_t ReadBody(char* buffer, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const S3Store::Request& r = *t->request;
  const int64_t total =
      r.fd >= 0 ? r.fd_length : static_cast<int64_t>(r.data.size());
  const size_t want = std::min<int64_t>(size * count, total - t->body_position);
  if (want == 0) return 0;
  if (r.fd < 0) {
    memcpy(buffer, r.data.data() + t->body_position, want);
    t->body_position += static_cast<int64_t>(want);
    return want;
  }
  while (true) {
    ssize_t n = pread(r.fd, buffer, want, r.fd_offset + t->body_position);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      t->read_status = absl::InternalError(
          absl::StrCat("cannot read the staged upload: ",
                       n == 0 ? "short file" : strerror(errno)));
      return CURL_READFUNC_ABORT;
    }
    t->body_position += n;
    return static_cast<size_t>(n);
  }
}

size_t WriteBody(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t bytes = size * count;
  if (t->code_checked == 0) {
    long code = 0;
    curl_easy_getinfo(t->handle, CURLINFO_RESPONSE_CODE, &code);
    t->code_checked =
        (t->request->sink != nullptr && code >= 200 && code < 300) ? 1 : 2;
  }
  if (t->code_checked == 1) {
    t->sink_status = (*t->request->sink)(absl::string_view(data, bytes));
    if (!t->sink_status.ok()) return 0;  // aborts the transfer
    t->delivered += static_cast<int64_t>(bytes);
    return bytes;
  }
  if (t->response->body.size() + bytes > kMaxBufferedBody) return 0;
  t->response->body.append(data, bytes);
  return bytes;
}

size_t ReadHeader(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t bytes = size * count;
  absl::string_view line(data, bytes);
  if (absl::StartsWith(line, "HTTP/")) {
    // A new response (after "100 Continue" or a redirect) starts afresh.
    t->response->headers.clear();
    return bytes;
  }
  size_t colon = line.find(':');
  if (colon == absl::string_view::npos) return bytes;
  std::string name = absl::AsciiStrToLower(line.substr(0, colon));
  std::string value(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  t->response->headers[name] = value;
  return bytes;
}

// "<Error><Code>X</Code><Message>Y</Message></Error>" -> {X, Y}.
std::pair<std::string, std::string> ParseError(const std::string& body) {
  pugi::xml_document doc;
  if (body.empty() || !doc.load_buffer(body.data(), body.size())) return {};
  pugi::xml_node error = doc.child("Error");
  return {error.child_value("Code"), error.child_value("Message")};
}

absl::Time ParseIsoTime(const char* text) {
  absl::Time t;
  std::string err;
  if (absl::ParseTime(absl::RFC3339_full, text, &t, &err)) return t;
  return absl::InfinitePast();
}

}  // namespace

S3Store::S3Store(std::string bucket, std::string prefix, S3Settings settings)
    : bucket_(std::move(bucket)),
      prefix_(std::move(prefix)),
      settings_(std::move(settings)) {}

S3Store::~S3Store() {
  absl::MutexLock lock(&mu_);
  for (CURL* handle : idle_handles_) curl_easy_cleanup(handle);
}

absl::StatusOr<std::unique_ptr<S3Store>> S3Store::Open(
    const std::string& bucket, const std::string& prefix, S3Settings settings) {
  static std::once_flag curl_init;
  std::call_once(curl_init, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (bucket.size() < 3 || bucket.size() > 63) {
    return absl::InvalidArgumentError(
        "S3 bucket names have 3 to 63 characters: \"" + bucket + "\"");
  }
  for (char c : bucket) {
    if (!(absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '-' ||
          c == '.')) {
      return absl::InvalidArgumentError(
          "S3 bucket names use a-z 0-9 . - only: \"" + bucket + "\"");
    }
  }
  std::string clean_prefix = prefix;
  while (!clean_prefix.empty() && clean_prefix.back() == '/')
    clean_prefix.pop_back();
  while (!clean_prefix.empty() && clean_prefix.front() == '/')
    clean_prefix.erase(0, 1);
  if (!clean_prefix.empty()) RETURN_IF_ERROR(ValidateKey(clean_prefix));
  auto env = [](const char* name) {
    const char* value = std::getenv(name);
    return std::string(value ? value : "");
  };
  if (settings.access_key.empty() && settings.secret_key.empty()) {
    settings.access_key = env("AWS_ACCESS_KEY_ID");
    settings.secret_key = env("AWS_SECRET_ACCESS_KEY");
    if (settings.session_token.empty())
      settings.session_token = env("AWS_SESSION_TOKEN");
  }
  if (settings.access_key.empty() != settings.secret_key.empty()) {
    return absl::InvalidArgumentError(
        "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither");
  }
  if (settings.region.empty()) settings.region = "us-east-1";
  if (settings.endpoint.empty()) {
    settings.endpoint = "https://s3." + settings.region + ".amazonaws.com";
  }
  if (settings.part_size < (5 << 20)) {
    return absl::InvalidArgumentError("S3 parts must be at least 5 MiB");
  }
  if (settings.spool_dir.empty()) settings.spool_dir = env("TMPDIR");
  if (settings.spool_dir.empty()) settings.spool_dir = "/tmp";
  settings.max_attempts = std::max(1, settings.max_attempts);
  settings.part_parallelism = std::max(1, settings.part_parallelism);

  auto store = std::unique_ptr<S3Store>(
      new S3Store(bucket, clean_prefix, std::move(settings)));
  const std::string& endpoint = store->settings_.endpoint;
  size_t scheme_end = endpoint.find("://");
  if (scheme_end == std::string::npos) {
    return absl::InvalidArgumentError("S3 endpoint needs a scheme: http://" +
                                      endpoint + " or https://" + endpoint);
  }
  store->scheme_ = endpoint.substr(0, scheme_end);
  if (store->scheme_ != "http" && store->scheme_ != "https") {
    return absl::InvalidArgumentError(
        "S3 endpoint must be http:// or https://: " + endpoint);
  }
  store->host_ = endpoint.substr(scheme_end + 3);
  while (!store->host_.empty() && store->host_.back() == '/')
    store->host_.pop_back();
  if (store->host_.empty() || store->host_.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        "S3 endpoint is scheme://host[:port] with no path: " + endpoint);
  }
  store->sigv4_ = "aws:amz:" + store->settings_.region + ":s3";
  return store;
}

std::string S3Store::Describe() const {
  return absl::StrCat("s3://", bucket_, prefix_.empty() ? "" : "/", prefix_,
                      " at ", settings_.endpoint,
                      settings_.path_style ? " (path-style)" : "");
}

std::string S3Store::FullKey(const std::string& key) const {
  if (prefix_.empty()) return key;
  if (key.empty()) return prefix_ + "/";
  return prefix_ + "/" + key;
}

std::string S3Store::Url(const Request& request) const {
  std::string path = "/";
  if (!request.key.empty()) path += UriEncode(FullKey(request.key), true);
  std::string url =
      settings_.path_style
          ? absl::StrCat(scheme_, "://", host_, "/", bucket_, path)
          : absl::StrCat(scheme_, "://", bucket_, ".", host_, path);
  for (size_t i = 0; i < request.query.size(); ++i) {
    absl::StrAppend(&url, i == 0 ? "?" : "&", request.query[i].first, "=",
                    request.query[i].second);
  }
  return url;
}

CURL* S3Store::AcquireHandle() {
  {
    absl::MutexLock lock(&mu_);
    if (!idle_handles_.empty()) {
      CURL* handle = idle_handles_.back();
      idle_handles_.pop_back();
      return handle;
    }
  }
  return curl_easy_init();
}

void S3Store::ReleaseHandle(CURL* handle) {
  absl::MutexLock lock(&mu_);
  if (idle_handles_.size() < 16) {
    idle_handles_.push_back(handle);
  } else {
    curl_easy_cleanup(handle);
  }
}

absl::StatusOr<S3Store::Response> S3Store::Perform(Request request) {
  // A caller's deadline ends each attempt (curl's timeout) and the retries;
  // without one, a hung server is left by the stall timeout and retried
  // within the budget.
  const std::shared_ptr<const CallLimits> limits = CurrentCallLimits();
  const absl::Time call_deadline =
      limits != nullptr ? limits->deadline : absl::InfiniteFuture();
  const bool has_deadline = call_deadline != absl::InfiniteFuture();
  const absl::Time deadline =
      std::min(absl::Now() + settings_.retry_budget, call_deadline);
  absl::Duration backoff = absl::Milliseconds(100);
  const std::string what =
      request.key.empty() ? absl::StrCat(request.op, " on bucket ", bucket_)
                          : absl::StrCat(request.op, " ", request.key);
  const auto cancelled_error = [&] {
    return absl::CancelledError(
        absl::StrCat("the caller went away; S3 ", what, " was stopped"));
  };
  const auto out_of_time = [&](int attempts, const std::string& last_error) {
    if (attempts == 0) {
      // Earlier steps of the call used its time; S3 itself may be fine.
      return absl::DeadlineExceededError(absl::StrCat(
          "no time was left for S3 ", what, " at ", settings_.endpoint,
          ": the call's deadline passed before it could be sent (give the "
          "call a longer deadline)"));
    }
    return absl::UnavailableError(absl::StrCat(
        "S3 did not answer within the deadline of the call: ", what, " at ",
        settings_.endpoint, ": ", last_error, " (", attempts,
        attempts == 1 ? " attempt)" : " attempts)"));
  };
  Response response;
  std::string transport_error;
  int attempt = 0;
  const std::string url = Url(request);
  if (request.payload_hash.empty()) {
    request.payload_hash = kUnsignedPayload;
    if (request.fd < 0) request.payload_hash = Sha256Hex(request.data);
  }
  while (true) {
    if (CallerCancelled(limits.get())) return cancelled_error();
    const absl::Time attempt_start = absl::Now();
    if (attempt_start >= call_deadline) {
      return out_of_time(attempt,
                         transport_error.empty()
                             ? absl::StrCat("HTTP ", response.http_code)
                             : transport_error);
    }
    ++attempt;
    response = Response();
    transport_error.clear();
    CURL* handle = AcquireHandle();
    if (handle == nullptr) return absl::InternalError("curl_easy_init failed");
    curl_easy_reset(handle);
    Transfer t;
    t.request = &request;
    t.handle = handle;
    t.response = &response;
    t.limits = limits.get();
    char error_buffer[CURL_ERROR_SIZE] = {0};
    curl_slist* headers = nullptr;
    headers = curl_slist_append(
        headers, ("x-amz-content-sha256: " + request.payload_hash).c_str());
    if (!settings_.session_token.empty()) {
      headers = curl_slist_append(
          headers,
          ("x-amz-security-token: " + settings_.session_token).c_str());
    }
    for (const std::string& h : request.headers) {
      headers = curl_slist_append(headers, h.c_str());
    }
    if (request.sink != nullptr &&
        (request.range_offset > 0 || request.range_length >= 0)) {
      std::string range =
          absl::StrCat("Range: bytes=", request.range_offset, "-");
      if (request.range_length >= 0) {
        absl::StrAppend(&range,
                        request.range_offset + request.range_length - 1);
      }
      headers = curl_slist_append(headers, range.c_str());
    }
    curl_easy_setopt(handle, CURLOPT_URL, url.c_str());
    curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, error_buffer);
    if (!settings_.access_key.empty()) {
      curl_easy_setopt(handle, CURLOPT_AWS_SIGV4, sigv4_.c_str());
      curl_easy_setopt(handle, CURLOPT_USERNAME, settings_.access_key.c_str());
      curl_easy_setopt(handle, CURLOPT_PASSWORD, settings_.secret_key.c_str());
    }
    absl::Duration connect_timeout = settings_.connect_timeout;
    if (has_deadline) {
      const absl::Duration left = call_deadline - attempt_start;
      connect_timeout = std::min(connect_timeout, left);
      curl_easy_setopt(handle, CURLOPT_TIMEOUT_MS,
                       std::max<long>(1, absl::ToInt64Milliseconds(left)));
    }
    curl_easy_setopt(
        handle, CURLOPT_CONNECTTIMEOUT_MS,
        std::max<long>(1, absl::ToInt64Milliseconds(connect_timeout)));
    if (limits != nullptr && limits->cancelled) {
      curl_easy_setopt(handle, CURLOPT_NOPROGRESS, 0L);
      curl_easy_setopt(handle, CURLOPT_XFERINFOFUNCTION, &Progress);
      curl_easy_setopt(handle, CURLOPT_XFERINFODATA, &t);
    }
    curl_easy_setopt(handle, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(
        handle, CURLOPT_LOW_SPEED_TIME,
        std::max<long>(1, absl::ToInt64Seconds(settings_.stall_timeout)));
    curl_easy_setopt(handle, CURLOPT_BUFFERSIZE, 512L * 1024);
    curl_easy_setopt(handle, CURLOPT_UPLOAD_BUFFERSIZE, 1024L * 1024);
    curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, &WriteBody);
    curl_easy_setopt(handle, CURLOPT_WRITEDATA, &t);
    curl_easy_setopt(handle, CURLOPT_HEADERFUNCTION, &ReadHeader);
    curl_easy_setopt(handle, CURLOPT_HEADERDATA, &t);
    const int64_t body_size = request.fd >= 0
                                  ? request.fd_length
                                  : static_cast<int64_t>(request.data.size());
    if (request.method == "HEAD") {
      curl_easy_setopt(handle, CURLOPT_NOBODY, 1L);
      curl_easy_setopt(handle, CURLOPT_FILETIME, 1L);
    } else if ((request.method == "PUT" || request.method == "POST") &&
               request.fd < 0) {
      // A body in memory goes as "post fields", for which curl skips the
      // "Expect: 100-continue" round trip below 1 MiB. (Removing that header
      // by hand would break the signature: curl signs it even when removed.)
      curl_easy_setopt(handle, CURLOPT_CUSTOMREQUEST, request.method.c_str());
      curl_easy_setopt(handle, CURLOPT_POSTFIELDSIZE_LARGE,
                       static_cast<curl_off_t>(body_size));
      curl_easy_setopt(handle, CURLOPT_POSTFIELDS,
                       request.data.empty() ? "" : request.data.data());
      headers = curl_slist_append(
          headers, request.method == "POST"
                       ? "Content-Type: application/xml"
                       : "Content-Type: application/octet-stream");
    } else if (request.method == "PUT") {
      curl_easy_setopt(handle, CURLOPT_UPLOAD, 1L);
      curl_easy_setopt(handle, CURLOPT_INFILESIZE_LARGE,
                       static_cast<curl_off_t>(body_size));
      curl_easy_setopt(handle, CURLOPT_READFUNCTION, &ReadBody);
      curl_easy_setopt(handle, CURLOPT_READDATA, &t);
    } else if (request.method == "POST") {
      curl_easy_setopt(handle, CURLOPT_POST, 1L);
      curl_easy_setopt(handle, CURLOPT_POSTFIELDSIZE_LARGE,
                       static_cast<curl_off_t>(body_size));
      curl_easy_setopt(handle, CURLOPT_READFUNCTION, &ReadBody);
      curl_easy_setopt(handle, CURLOPT_READDATA, &t);
      headers = curl_slist_append(headers, "Content-Type: application/xml");
    } else if (request.method != "GET") {
      curl_easy_setopt(handle, CURLOPT_CUSTOMREQUEST, request.method.c_str());
    }
    curl_easy_setopt(handle, CURLOPT_HTTPHEADER, headers);
    CURLcode code = curl_easy_perform(handle);
    curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &response.http_code);
    if (request.method == "HEAD") {
      curl_off_t filetime = -1;
      curl_easy_getinfo(handle, CURLINFO_FILETIME_T, &filetime);
      response.filetime = filetime;
    }
    curl_easy_setopt(handle, CURLOPT_HTTPHEADER, nullptr);
    curl_slist_free_all(headers);
    ReleaseHandle(handle);

    if (!t.sink_status.ok()) return t.sink_status;
    if (!t.read_status.ok()) return t.read_status;
    if (t.cancelled) return cancelled_error();
    bool retry = false;
    if (code != CURLE_OK) {
      transport_error =
          error_buffer[0] ? error_buffer : curl_easy_strerror(code);
      retry = RetryableCurlCode(code);
      if (!retry) {
        return absl::InternalError(absl::StrCat(
            "S3 ", what, " at ", settings_.endpoint, ": ", transport_error));
      }
    } else if (response.http_code >= 500) {
      retry = true;
    } else {
      break;
    }
    // A read resumes after the bytes its sink already took.
    if (request.sink != nullptr && t.delivered > 0) {
      request.range_offset += t.delivered;
      if (request.range_length >= 0) request.range_length -= t.delivered;
    }
    const absl::Duration jittered =
        backoff * (0.5 + (std::random_device{}() % 1000) / 1000.0);
    if (!retry || attempt >= settings_.max_attempts) break;
    if (absl::Now() + jittered > deadline) {
      // Said as such when the caller's deadline, not the budget, ended it.
      if (has_deadline && absl::Now() + jittered > call_deadline &&
          !transport_error.empty()) {
        return out_of_time(attempt, transport_error);
      }
      break;
    }
    VLOG(1) << "S3 " << what << ": attempt " << attempt << " failed ("
            << (transport_error.empty()
                    ? absl::StrCat("HTTP ", response.http_code)
                    : transport_error)
            << "); retrying in " << jittered;
    // In slices, so a caller that goes away is not kept waiting.
    for (absl::Time wake = absl::Now() + jittered; absl::Now() < wake;) {
      if (CallerCancelled(limits.get())) return cancelled_error();
      absl::SleepFor(std::min(kCancelCheck, wake - absl::Now()));
    }
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }

  if (!transport_error.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot reach S3 at ", settings_.endpoint, " for ", what,
                     ": ", transport_error, " (", attempt,
                     attempt == 1 ? " attempt)" : " attempts)"));
  }
  const long http = response.http_code;
  if (http >= 200 && http < 300) return response;
  auto [code, message] = ParseError(response.body);
  std::string detail = code.empty() ? absl::StrCat("HTTP ", http)
                                    : absl::StrCat(code, " (HTTP ", http, ")");
  if (!message.empty()) absl::StrAppend(&detail, ": ", message);
  if (http >= 500) {
    return absl::UnavailableError(absl::StrCat(
        "S3 at ", settings_.endpoint, " failed ", what, ": ", detail, " (",
        attempt, attempt == 1 ? " attempt)" : " attempts)"));
  }
  switch (http) {
    case 403:
      return absl::PermissionDeniedError(absl::StrCat(
          "S3 refused ", what, " in bucket ", bucket_, ": ", detail,
          code == "SignatureDoesNotMatch" || code == "InvalidAccessKeyId" ||
                  code.empty()
              ? " (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
              : ""));
    case 404:
      if (code == "NoSuchBucket") {
        return absl::FailedPreconditionError(
            absl::StrCat("S3 bucket ", bucket_, " does not exist at ",
                         settings_.endpoint, "; create it first"));
      }
      return absl::NotFoundError(absl::StrCat("no object ", request.key));
    case 409:
      return absl::AbortedError(absl::StrCat(
          "S3 reported a conflicting write for ", what, ": ", detail));
    case 412:
      return absl::AlreadyExistsError(
          absl::StrCat(request.key, " already exists"));
    case 416:
      return absl::OutOfRangeError(absl::StrCat("S3 ", what, ": ", detail));
    default:
      return absl::InternalError(
          absl::StrCat("S3 ", what, " failed: ", detail));
  }
}

absl::StatusOr<bool> S3Store::CheckExclusiveWrites() {
  const std::string key = ".kennel-probe/" + RandomHex(16);
  WriteOptions exclusive;
  exclusive.exclusive = true;
  RETURN_IF_ERROR(Put(key, "probe", exclusive));
  absl::Status second = Put(key, "probe", exclusive);
  (void)Delete(key);
  if (second.ok()) return false;
  if (absl::IsAlreadyExists(second)) return true;
  return second;
}

absl::Status S3Store::Put(const std::string& key, absl::string_view data,
                          const WriteOptions& options) {
  RETURN_IF_ERROR(ValidateKey(key));
  Request request;
  request.method = "PUT";
  request.op = "PUT";
  request.key = key;
  request.data = data;
  request.payload_hash = options.sha256_hex;
  if (options.exclusive) request.headers.push_back("If-None-Match: *");
  return Perform(std::move(request)).status();
}

absl::Status S3Store::Read(const std::string& key, int64_t offset,
                           int64_t length, const ByteSink& sink) {
  RETURN_IF_ERROR(ValidateKey(key));
  if (length == 0) return absl::OkStatus();
  int64_t got = 0;
  ByteSink counting = [&](absl::string_view data) {
    got += static_cast<int64_t>(data.size());
    return sink(data);
  };
  Request request;
  request.op = "GET";
  request.key = key;
  request.sink = &counting;
  request.range_offset = offset;
  request.range_length = length;
  RETURN_IF_ERROR(Perform(std::move(request)).status());
  if (length > 0 && got != length) {
    return absl::OutOfRangeError(
        absl::StrCat("S3 returned ", got, " of ", length, " bytes of ", key));
  }
  return absl::OkStatus();
}

absl::StatusOr<ObjectInfo> S3Store::Stat(const std::string& key) {
  RETURN_IF_ERROR(ValidateKey(key));
  Request request;
  request.method = "HEAD";
  request.op = "HEAD";
  request.key = key;
  ASSIGN_OR_RETURN(Response response, Perform(std::move(request)));
  ObjectInfo info;
  info.key = key;
  auto it = response.headers.find("content-length");
  if (it == response.headers.end() ||
      !absl::SimpleAtoi(it->second, &info.size)) {
    return absl::DataLossError("S3 HEAD " + key + " gave no Content-Length");
  }
  if (response.filetime >= 0)
    info.modified = absl::FromUnixSeconds(response.filetime);
  return info;
}

absl::StatusOr<ListResult> S3Store::List(const ListOptions& options) {
  Request request;
  request.op = "LIST";
  const std::string full_prefix = FullKey(options.prefix);
  // Sorted by name, as SigV4's canonical query string needs.
  if (!options.page_token.empty()) {
    request.query.emplace_back("continuation-token",
                               UriEncode(options.page_token, false));
  }
  if (!options.delimiter.empty()) {
    request.query.emplace_back("delimiter",
                               UriEncode(options.delimiter, false));
  }
  request.query.emplace_back("list-type", "2");
  request.query.emplace_back(
      "max-keys", absl::StrCat(std::clamp(options.max_keys, 1, 1000)));
  if (!full_prefix.empty()) {
    request.query.emplace_back("prefix", UriEncode(full_prefix, false));
  }
  ASSIGN_OR_RETURN(Response response, Perform(std::move(request)));
  pugi::xml_document doc;
  pugi::xml_parse_result parsed =
      doc.load_buffer(response.body.data(), response.body.size());
  pugi::xml_node root = doc.child("ListBucketResult");
  if (!parsed || !root) {
    return absl::DataLossError(
        "S3 LIST returned something that is not a "
        "ListBucketResult");
  }
  const size_t strip = prefix_.empty() ? 0 : prefix_.size() + 1;
  ListResult result;
  for (pugi::xml_node item : root.children("Contents")) {
    std::string key = item.child_value("Key");
    if (key.size() < strip) continue;
    ObjectInfo info;
    info.key = key.substr(strip);
    if (!absl::SimpleAtoi(item.child_value("Size"), &info.size)) info.size = -1;
    info.modified = ParseIsoTime(item.child_value("LastModified"));
    result.objects.push_back(std::move(info));
  }
  for (pugi::xml_node item : root.children("CommonPrefixes")) {
    std::string key = item.child_value("Prefix");
    if (key.size() < strip) continue;
    result.prefixes.push_back(key.substr(strip));
  }
  if (absl::AsciiStrToLower(root.child_value("IsTruncated")) == "true") {
    result.next_page_token = root.child_value("NextContinuationToken");
  }
  return result;
}

absl::Status S3Store::Delete(const std::string& key) {
  RETURN_IF_ERROR(ValidateKey(key));
  Request request;
  request.method = "DELETE";
  request.op = "DELETE";
  request.key = key;
  absl::Status status = Perform(std::move(request)).status();
  if (absl::IsNotFound(status)) return absl::OkStatus();
  return status;
}

absl::StatusOr<int64_t> S3Store::CleanStaging(absl::Time before) {
  Request request;
  request.op = "LIST-UPLOADS";
  if (!prefix_.empty()) {
    request.query.emplace_back("prefix", UriEncode(prefix_ + "/", false));
  }
  request.query.emplace_back("uploads", "");
  ASSIGN_OR_RETURN(Response response, Perform(std::move(request)));
  pugi::xml_document doc;
  if (!doc.load_buffer(response.body.data(), response.body.size())) {
    return absl::DataLossError("S3 returned an unreadable upload list");
  }
  const size_t strip = prefix_.empty() ? 0 : prefix_.size() + 1;
  int64_t removed = 0;
  for (pugi::xml_node upload :
       doc.child("ListMultipartUploadsResult").children("Upload")) {
    std::string key = upload.child_value("Key");
    if (key.size() <= strip) continue;
    if (ParseIsoTime(upload.child_value("Initiated")) >= before) continue;
    Request abort;
    abort.method = "DELETE";
    abort.op = "ABORT-UPLOAD";
    abort.key = key.substr(strip);
    abort.query.emplace_back("uploadId",
                             UriEncode(upload.child_value("UploadId"), false));
    if (Perform(std::move(abort)).ok()) ++removed;
  }
  return removed;
}

namespace {

// Stages bytes in an unnamed local file. Small objects go up in one PUT at
// Commit; larger ones in parts, uploaded by a few threads while later bytes
// still arrive, and completed (made visible) at Commit.
class S3Writer : public ObjectWriter {
 public:
  S3Writer(S3Store* store, std::string key, WriteOptions options, int fd)
      : store_(store),
        key_(std::move(key)),
        options_(std::move(options)),
        fd_(fd),
        part_size_(store->settings().part_size),
        threshold_(store->settings().multipart_threshold) {}

  ~S3Writer() override {
    StopWorkers(/*discard_queue=*/true);
    if (!upload_id_.empty() && !committed_) {
      // Tried by the caller's deadline, so a failed push still answers in
      // time, but also after the caller has gone; an upload this leaves
      // behind is removed by gc (CleanStaging).
      std::shared_ptr<CallLimits> limits;
      if (auto caller = CurrentCallLimits(); caller != nullptr) {
        limits = std::make_shared<CallLimits>();
        limits->deadline = caller->deadline;
      }
      const ScopedCallLimits scope(std::move(limits));
      S3Store::Request abort;
      abort.method = "DELETE";
      abort.op = "ABORT-UPLOAD";
      abort.key = key_;
      abort.query.emplace_back("uploadId", UriEncode(upload_id_, false));
      absl::Status s = store_->Perform(std::move(abort)).status();
      if (!s.ok())
        LOG(WARNING) << "abandoned S3 upload of " << key_ << ": " << s;
    }
    close(fd_);
  }

  absl::Status Write(absl::string_view data) override {
    const char* p = data.data();
    size_t left = data.size();
    while (left > 0) {
      ssize_t n = write(fd_, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        return absl::ResourceExhaustedError(
            absl::StrCat("cannot stage an upload in ",
                         store_->settings().spool_dir, ": ", strerror(errno)));
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
    written_ += static_cast<int64_t>(data.size());
    if (upload_id_.empty() &&
        (options_.size_hint > threshold_ || written_ > threshold_) &&
        written_ >= part_size_) {
      RETURN_IF_ERROR(StartMultipart());
    }
    if (!upload_id_.empty()) {
      while (written_ - queued_until_ >= part_size_) QueuePart(part_size_);
      absl::MutexLock lock(&mu_);
      return error_;
    }
    return absl::OkStatus();
  }

  absl::Status Commit() override {
    if (committed_) return absl::FailedPreconditionError("already committed");
    if (upload_id_.empty() && written_ > threshold_)
      RETURN_IF_ERROR(StartMultipart());
    if (upload_id_.empty()) {
      S3Store::Request put;
      put.method = "PUT";
      put.op = "PUT";
      put.key = key_;
      put.fd = fd_;
      put.fd_length = written_;
      put.payload_hash =
          options_.sha256_hex.empty() ? kUnsignedPayload : options_.sha256_hex;
      if (options_.exclusive) put.headers.push_back("If-None-Match: *");
      RETURN_IF_ERROR(store_->Perform(std::move(put)).status());
      committed_ = true;
      return absl::OkStatus();
    }
    while (written_ - queued_until_ >= part_size_) QueuePart(part_size_);
    bool no_parts;
    {
      absl::MutexLock lock(&mu_);
      no_parts = next_part_ == 1;
    }
    if (written_ > queued_until_ || no_parts)
      QueuePart(written_ - queued_until_);
    StopWorkers(/*discard_queue=*/false);
    std::string xml = "<CompleteMultipartUpload>";
    {
      absl::MutexLock lock(&mu_);
      RETURN_IF_ERROR(error_);
      for (const auto& [number, etag] : etags_) {
        absl::StrAppend(&xml, "<Part><PartNumber>", number,
                        "</PartNumber><ETag>", XmlEscape(etag),
                        "</ETag></Part>");
      }
    }
    xml += "</CompleteMultipartUpload>";
    S3Store::Request complete;
    complete.method = "POST";
    complete.op = "COMPLETE-UPLOAD";
    complete.key = key_;
    complete.query.emplace_back("uploadId", UriEncode(upload_id_, false));
    complete.data = xml;
    if (options_.exclusive) complete.headers.push_back("If-None-Match: *");
    ASSIGN_OR_RETURN(S3Store::Response response,
                     store_->Perform(std::move(complete)));
    // S3 may answer 200 and put the error in the body.
    auto [code, message] = ParseError(response.body);
    if (!code.empty()) {
      return absl::UnavailableError(
          absl::StrCat("S3 could not complete the upload of ", key_, ": ", code,
                       " ", message));
    }
    committed_ = true;
    return absl::OkStatus();
  }

  int64_t bytes_written() const override { return written_; }

 private:
  struct Part {
    int number;
    int64_t offset;
    int64_t length;
  };

  absl::Status StartMultipart() {
    S3Store::Request initiate;
    initiate.method = "POST";
    initiate.op = "START-UPLOAD";
    initiate.key = key_;
    initiate.query.emplace_back("uploads", "");
    ASSIGN_OR_RETURN(S3Store::Response response,
                     store_->Perform(std::move(initiate)));
    pugi::xml_document doc;
    doc.load_buffer(response.body.data(), response.body.size());
    upload_id_ =
        doc.child("InitiateMultipartUploadResult").child_value("UploadId");
    if (upload_id_.empty()) {
      return absl::DataLossError("S3 did not return an upload id for " + key_);
    }
    // The parts go up within the limits of the request that writes them.
    for (int i = 0; i < store_->settings().part_parallelism; ++i) {
      workers_.push_back(ThreadForRequest([this] { Work(); }));
    }
    return absl::OkStatus();
  }

  void QueuePart(int64_t length) {
    absl::MutexLock lock(&mu_);
    queue_.push_back(Part{next_part_++, queued_until_, length});
    queued_until_ += length;
  }

  void StopWorkers(bool discard_queue) {
    {
      absl::MutexLock lock(&mu_);
      if (discard_queue) queue_.clear();
      stopping_ = true;
    }
    for (std::thread& worker : workers_) worker.join();
    workers_.clear();
  }

  void Work() {
    while (true) {
      Part part;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](S3Writer* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) {
              return !w->queue_.empty() || w->stopping_;
            },
            this));
        if (queue_.empty()) return;
        part = queue_.front();
        queue_.pop_front();
        if (!error_.ok()) continue;  // the upload is lost anyway
      }
      S3Store::Request put;
      put.method = "PUT";
      put.op = absl::StrCat("PUT part ", part.number, " of");
      put.key = key_;
      put.query.emplace_back("partNumber", absl::StrCat(part.number));
      put.query.emplace_back("uploadId", UriEncode(upload_id_, false));
      put.fd = fd_;
      put.fd_offset = part.offset;
      put.fd_length = part.length;
      put.payload_hash = kUnsignedPayload;
      auto response = store_->Perform(std::move(put));
      absl::MutexLock lock(&mu_);
      if (!response.ok()) {
        if (error_.ok()) error_ = response.status();
        continue;
      }
      auto it = response->headers.find("etag");
      if (it == response->headers.end()) {
        if (error_.ok()) {
          error_ = absl::DataLossError(absl::StrCat(
              "S3 returned no ETag for part ", part.number, " of ", key_));
        }
        continue;
      }
      etags_[part.number] = it->second;
    }
  }

  S3Store* const store_;
  const std::string key_;
  const WriteOptions options_;
  const int fd_;
  const int64_t part_size_;
  const int64_t threshold_;

  // Used only by the writing thread.
  int64_t written_ = 0;
  int64_t queued_until_ = 0;
  std::string upload_id_;
  std::vector<std::thread> workers_;
  bool committed_ = false;

  absl::Mutex mu_;
  std::deque<Part> queue_ ABSL_GUARDED_BY(mu_);
  int next_part_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  std::map<int, std::string> etags_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<ObjectWriter>> S3Store::NewWriter(
    const std::string& key, const WriteOptions& options) {
  RETURN_IF_ERROR(ValidateKey(key));
  const std::string& dir = settings_.spool_dir;
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::string path = dir + "/kennel-upload-XXXXXX";
    fd = mkostemp(path.data(), O_CLOEXEC);
    if (fd < 0) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cannot stage an upload in ", dir, ": ", strerror(errno)));
    }
    unlink(path.c_str());
  }
  return std::unique_ptr<ObjectWriter>(new S3Writer(this, key, options, fd));
}

}  // namespace kennel::storage
