// S3Store against a scripted HTTP server: which replies are retried, how S3
// errors become statuses, and how long an outage takes to report.
#include "common/storage/s3_store.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kennel::storage {
namespace {

using ::testing::HasSubstr;

// Answers each HTTP request with the next scripted reply (the last one
// repeats), one request per connection. A reply with status 0 never answers.
class ScriptedServer {
 public:
  struct Reply {
    int status;
    std::string body;
  };

  explicit ScriptedServer(std::deque<Reply> replies)
      : replies_(std::move(replies)) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    listen(fd_, 16);
    socklen_t len = sizeof(addr);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }

  ~ScriptedServer() {
    stopping_ = true;
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
    for (int fd : held_) close(fd);
  }

  int port() const { return port_; }
  int requests() const { return requests_.load(); }
  std::string last_request() {
    absl::MutexLock lock(&mu_);
    return last_request_;
  }

 private:
  void Serve() {
    while (!stopping_) {
      int client = accept(fd_, nullptr, nullptr);
      if (client < 0) return;
      std::string request;
      char buffer[65536];
      size_t header_end = std::string::npos;
      while (header_end == std::string::npos) {
        ssize_t n = read(client, buffer, sizeof(buffer));
        if (n <= 0) break;
        request.append(buffer, n);
        header_end = request.find("\r\n\r\n");
      }
      if (header_end == std::string::npos) {
        close(client);
        continue;
      }
      int64_t length = 0;
      for (absl::string_view line :
           absl::StrSplit(request.substr(0, header_end), "\r\n")) {
        if (absl::StartsWithIgnoreCase(line, "content-length:")) {
          (void)absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(15)),
                                 &length);
        }
      }
      if (absl::StrContains(
              absl::AsciiStrToLower(request.substr(0, header_end)),
              "expect: 100-continue")) {
        constexpr absl::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
        (void)!write(client, kContinue.data(), kContinue.size());
      }
      while (static_cast<int64_t>(request.size() - header_end - 4) < length) {
        ssize_t n = read(client, buffer, sizeof(buffer));
        if (n <= 0) break;
        request.append(buffer, n);
      }
      ++requests_;
      Reply reply;
      {
        absl::MutexLock lock(&mu_);
        last_request_ = request.substr(0, header_end);
        reply = replies_.front();
        if (replies_.size() > 1) replies_.pop_front();
      }
      if (reply.status == 0) {
        held_.push_back(client);  // never answer
        continue;
      }
      std::string response =
          absl::StrCat("HTTP/1.1 ", reply.status,
                       " X\r\nContent-Length: ", reply.body.size(),
                       "\r\nConnection: close\r\n\r\n", reply.body);
      (void)!write(client, response.data(), response.size());
      close(client);
    }
  }

  int fd_ = -1;
  int port_ = 0;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> requests_{0};
  std::vector<int> held_;
  absl::Mutex mu_;
  std::deque<Reply> replies_ ABSL_GUARDED_BY(mu_);
  std::string last_request_ ABSL_GUARDED_BY(mu_);
};

std::unique_ptr<S3Store> StoreFor(const ScriptedServer& server) {
  S3Settings settings;
  settings.endpoint = absl::StrCat("http://127.0.0.1:", server.port());
  settings.path_style = true;
  settings.access_key = "key";
  settings.secret_key = "secret";
  settings.stall_timeout = absl::Seconds(1);
  auto store = S3Store::Open("bucket", "pre", settings);
  EXPECT_TRUE(store.ok()) << store.status();
  return std::move(*store);
}

std::string Error(const std::string& code, const std::string& message) {
  return "<?xml version=\"1.0\"?><Error><Code>" + code + "</Code><Message>" +
         message + "</Message></Error>";
}

TEST(S3StoreRetryTest, ServerErrorsAreRetriedUntilSuccess) {
  ScriptedServer server({{503, Error("SlowDown", "")}, {500, ""}, {200, ""}});
  auto store = StoreFor(server);
  absl::Status s = store->Put("a/b", "data", {});
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(server.requests(), 3);
  EXPECT_THAT(server.last_request(), HasSubstr("PUT /bucket/pre/a/b HTTP/1.1"));
  EXPECT_THAT(server.last_request(), HasSubstr("AWS4-HMAC-SHA256"));
  EXPECT_THAT(server.last_request(), HasSubstr("x-amz-content-sha256: "));
  // A small body goes without waiting for "100 Continue".
  EXPECT_THAT(server.last_request(), ::testing::Not(HasSubstr("100-continue")));
}

TEST(S3StoreRetryTest, ClientErrorsAreNeverRetried) {
  struct Case {
    int status;
    std::string body;
    absl::StatusCode code;
    std::string text;
  };
  const std::vector<Case> cases = {
      {403,
       Error("SignatureDoesNotMatch",
             "The signature we calculated does not match"),
       absl::StatusCode::kPermissionDenied, "SignatureDoesNotMatch"},
      {403, Error("AccessDenied", "Access Denied"),
       absl::StatusCode::kPermissionDenied, "Access Denied"},
      {404, Error("NoSuchBucket", ""), absl::StatusCode::kFailedPrecondition,
       "does not exist"},
      {404, Error("NoSuchKey", ""), absl::StatusCode::kNotFound, "a/b"},
      {412, Error("PreconditionFailed", ""), absl::StatusCode::kAlreadyExists,
       "a/b"},
      {400, Error("InvalidArgument", "bad"), absl::StatusCode::kInternal,
       "InvalidArgument"},
  };
  for (const Case& c : cases) {
    ScriptedServer server({{c.status, c.body}});
    auto store = StoreFor(server);
    WriteOptions exclusive;
    exclusive.exclusive = true;
    absl::Status s = store->Put("a/b", "data", exclusive);
    EXPECT_EQ(s.code(), c.code) << c.status << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.text));
    EXPECT_EQ(server.requests(), 1) << c.status << " was retried";
  }
}

TEST(S3StoreRetryTest, PersistentServerErrorIsUnavailableAfterEveryAttempt) {
  ScriptedServer server(
      {{503, Error("ServiceUnavailable", "down for maintenance")}});
  auto store = StoreFor(server);
  absl::Status s = store->Stat("a/b").status();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_EQ(server.requests(), 5);
}

TEST(S3StoreRetryTest, ServerThatNeverAnswersIsUnavailableWithinTheBudget) {
  ScriptedServer server({{0, ""}});
  S3Settings settings;
  settings.endpoint = absl::StrCat("http://127.0.0.1:", server.port());
  settings.path_style = true;
  settings.stall_timeout = absl::Seconds(1);
  settings.retry_budget = absl::Seconds(2);
  auto store = S3Store::Open("bucket", "", settings);
  ASSERT_TRUE(store.ok());
  const absl::Time start = absl::Now();
  absl::Status s = (*store)->ReadAll("k").status();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(6));
  EXPECT_GE(server.requests(), 2);
}

// A server that accepts and never answers, with the store's default stall
// timeout and retry budget (10 s and 15 s): only the caller's limits can end
// a call early.
std::unique_ptr<S3Store> HungStore(const ScriptedServer& server) {
  S3Settings settings;
  settings.endpoint = absl::StrCat("http://127.0.0.1:", server.port());
  settings.path_style = true;
  auto store = S3Store::Open("bucket", "", settings);
  EXPECT_TRUE(store.ok()) << store.status();
  return std::move(*store);
}

std::shared_ptr<const CallLimits> Limits(
    absl::Duration left, std::function<bool()> cancelled = nullptr) {
  auto limits = std::make_shared<CallLimits>();
  limits->deadline = absl::Now() + left;
  limits->cancelled = std::move(cancelled);
  return limits;
}

TEST(S3StoreDeadlineTest, HungServerIsUnavailableByTheCallersDeadline) {
  ScriptedServer server({{0, ""}});
  auto store = HungStore(server);
  const ScopedCallLimits scope(Limits(absl::Milliseconds(1500)));
  const absl::Time start = absl::Now();
  absl::Status s = store->ReadAll("models/m/versions/00000001.json").status();
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("S3 did not answer within the deadline"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("GET models/m/versions"));
  EXPECT_GE(took, absl::Milliseconds(1400));
  EXPECT_LT(took, absl::Milliseconds(2500));
}

TEST(S3StoreDeadlineTest, EveryKindOfCallFollowsTheDeadline) {
  ScriptedServer server({{0, ""}});
  auto store = HungStore(server);
  const std::vector<std::pair<std::string, std::function<absl::Status()>>>
      calls = {
          {"put", [&] { return store->Put("a/b", "data", {}); }},
          {"stat", [&] { return store->Stat("a/b").status(); }},
          {"list", [&] { return store->List({}).status(); }},
          {"delete", [&] { return store->Delete("a/b"); }},
          {"writer",
           [&]() -> absl::Status {
             auto writer = store->NewWriter("a/b", {});
             if (!writer.ok()) return writer.status();
             absl::Status s = (*writer)->Write("data");
             return s.ok() ? (*writer)->Commit() : s;
           }},
      };
  for (const auto& [what, call] : calls) {
    const ScopedCallLimits scope(Limits(absl::Milliseconds(500)));
    const absl::Time start = absl::Now();
    absl::Status s = call();
    EXPECT_TRUE(absl::IsUnavailable(s)) << what << ": " << s;
    EXPECT_LT(absl::Now() - start, absl::Milliseconds(1500)) << what;
  }
}

TEST(S3StoreDeadlineTest, PartUploadsFollowTheDeadlineOfTheCallThatWrites) {
  // The upload starts, then every part hangs: the part workers run on their
  // own threads and must still stop at the writing call's deadline, not
  // after the store's own stall timeout (10 s).
  ScriptedServer server(
      {{200,
        "<InitiateMultipartUploadResult><UploadId>u1</UploadId>"
        "</InitiateMultipartUploadResult>"},
       {0, ""}});
  S3Settings settings;
  settings.endpoint = absl::StrCat("http://127.0.0.1:", server.port());
  settings.path_style = true;
  settings.multipart_threshold = 5 << 20;
  settings.part_size = 5 << 20;
  auto store = S3Store::Open("bucket", "", settings);
  ASSERT_TRUE(store.ok()) << store.status();
  const ScopedCallLimits scope(Limits(absl::Milliseconds(1500)));
  const absl::Time start = absl::Now();
  auto writer = (*store)->NewWriter("big", {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  const std::string part(6 << 20, 'x');
  absl::Status s = (*writer)->Write(part);
  if (s.ok()) s = (*writer)->Commit();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("did not answer"));
  EXPECT_GE(server.requests(), 2) << "no part was sent";
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
}

TEST(S3StoreDeadlineTest, DeadlineEndsTheRetriesOfServerErrors) {
  // Five attempts with backoff take over a second; the deadline ends them.
  ScriptedServer server({{503, Error("SlowDown", "")}});
  auto store = StoreFor(server);
  const ScopedCallLimits scope(Limits(absl::Milliseconds(250)));
  const absl::Time start = absl::Now();
  absl::Status s = store->Stat("a/b").status();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(1000));
  EXPECT_LT(server.requests(), 5);
}

TEST(S3StoreDeadlineTest, PassedDeadlineSendsNothing) {
  ScriptedServer server({{200, ""}});
  auto store = StoreFor(server);
  const ScopedCallLimits scope(Limits(-absl::Seconds(1)));
  absl::Status s = store->Put("a/b", "data", {});
  // Not UNAVAILABLE: nothing says S3 is down, the call ran out of time.
  EXPECT_TRUE(absl::IsDeadlineExceeded(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("no time was left"));
  EXPECT_EQ(server.requests(), 0);
}

TEST(S3StoreDeadlineTest, CallerThatGoesAwayStopsTheCall) {
  ScriptedServer server({{0, ""}});
  auto store = HungStore(server);
  std::atomic<bool> gone{false};
  std::thread leave([&] {
    absl::SleepFor(absl::Milliseconds(300));
    gone = true;
  });
  const ScopedCallLimits scope(
      Limits(absl::InfiniteDuration(), [&] { return gone.load(); }));
  const absl::Time start = absl::Now();
  absl::Status s = store->ReadAll("k").status();
  leave.join();
  EXPECT_TRUE(absl::IsCancelled(s)) << s;
  // Without the check the 10 s stall timeout would end it.
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST(S3StoreDeadlineTest, LimitsAreRestoredWhenTheScopeEnds) {
  EXPECT_EQ(CurrentCallLimits(), nullptr);
  auto outer = Limits(absl::Seconds(5));
  {
    const ScopedCallLimits a(outer);
    {
      const ScopedCallLimits b(Limits(absl::Seconds(1)));
      EXPECT_NE(CurrentCallLimits(), outer);
    }
    EXPECT_EQ(CurrentCallLimits(), outer);
  }
  EXPECT_EQ(CurrentCallLimits(), nullptr);
  // Without limits a call keeps the retry policy: a server error is tried
  // five times.
  ScriptedServer server({{503, Error("SlowDown", "")}});
  auto store = StoreFor(server);
  EXPECT_TRUE(absl::IsUnavailable(store->Stat("a/b").status()));
  EXPECT_EQ(server.requests(), 5);
}

TEST(S3StoreRetryTest, ReadsParseListingsAndStripThePrefix) {
  ScriptedServer server(
      {{200,
        "<ListBucketResult><IsTruncated>true</IsTruncated>"
        "<NextContinuationToken>tok/en</NextContinuationToken>"
        "<Contents><Key>pre/models/a/versions/00000001.json</Key>"
        "<Size>42</Size><LastModified>2026-01-02T03:04:05.000Z"
        "</LastModified></Contents>"
        "<CommonPrefixes><Prefix>pre/models/b/</Prefix></CommonPrefixes>"
        "</ListBucketResult>"}});
  auto store = StoreFor(server);
  ListOptions options;
  options.prefix = "models/";
  options.page_token = "a b";
  auto page = store->List(options);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->objects.size(), 1u);
  EXPECT_EQ(page->objects[0].key, "models/a/versions/00000001.json");
  EXPECT_EQ(page->objects[0].size, 42);
  EXPECT_EQ(page->objects[0].modified, absl::FromUnixSeconds(1767323045));
  EXPECT_EQ(page->prefixes, std::vector<std::string>{"models/b/"});
  EXPECT_EQ(page->next_page_token, "tok/en");
  EXPECT_THAT(
      server.last_request(),
      HasSubstr(
          "GET /bucket/?continuation-token=a%20b&list-type=2&max-keys=1000"
          "&prefix=pre%2Fmodels%2F HTTP/1.1"));
}

}  // namespace
}  // namespace kennel::storage
