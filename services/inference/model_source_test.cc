// RegistrySource's start-up and its memory of the last version that served,
// with versions whose files are already in the cache (so no registry is
// needed) and a fake loader.
#include "services/inference/model_source.h"

#include <arpa/inet.h>
#include <glog/logging.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/registry.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/sha256.h"
#include "services/inference/fake_model.h"

namespace kennel::inference {
namespace {

using testing::FakeBehaviour;
using testing::FakeLoader;

// Nothing listens there: every watch fails at once.
const char kRegistry[] = "127.0.0.1:1";

class RegistrySourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kennel_model_source_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ASSERT_TRUE(BlobCache::Open(dir_).ok());
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  // A version whose model file is in the cache. `good`: the fake loader
  // opens it; otherwise it is not TorchScript.
  kennel::v1::ModelVersion Cached(int64_t n, bool good) {
    const std::string bytes = "model bytes of version " + std::to_string(n);
    const std::string digest = Sha256Digest(bytes);
    const std::string path = BlobCachePath(dir_, digest);
    std::ofstream(path) << bytes;
    if (good) loader_.Add(path, {std::make_shared<FakeBehaviour>(), {}, ""});
    kennel::v1::ModelVersion v;
    v.set_name("pets");
    v.set_version(n);
    for (const char* label : {"a", "b", "c"}) v.add_labels(label);
    v.add_aliases("production");
    auto* c = v.add_components();
    c->set_role(kennel::v1::COMPONENT_ROLE_MODEL);
    c->set_format("torchscript");
    c->set_digest(digest);
    c->set_size(static_cast<int64_t>(bytes.size()));
    return v;
  }

  RegistrySource::Options Options(const std::string& ref = "pets@production",
                                  const std::string& registry = kRegistry) {
    RegistrySource::Options o;
    o.client.address = registry;
    o.client.timeout = absl::Seconds(2);
    o.ref = ref;
    o.cache_dir = dir_;
    return o;
  }

  // A fresh manager, as a restarted process has.
  std::unique_ptr<ModelManager> Manager() {
    ManagerOptions o;
    o.precision = kennel::v1::PRECISION_FP32;
    o.synthetic_warmup_images = 2;
    o.warmup_batch_sizes = {1, 2};
    return std::make_unique<ModelManager>(&loader_, o, &metrics_);
  }

  static int64_t Serving(const ModelManager& manager) {
    auto current = manager.Current();
    return current == nullptr ? 0 : current->version;
  }

  std::string dir_;
  FakeLoader loader_;
  prometheus::Registry registry_;
  InferenceMetrics metrics_{registry_};
};

TEST_F(RegistrySourceTest, ARestartServesTheLastGoodVersionFirst) {
  const auto v1 = Cached(1, true);
  const auto v2 = Cached(2, false);  // not TorchScript
  const auto v3 = Cached(3, true);
  {
    auto manager = Manager();
    RegistrySource source(Options(), manager.get());
    // Nothing has served this ref here yet.
    EXPECT_EQ(source.ServeLastGood().code(), absl::StatusCode::kNotFound);
    source.Handle(v1);
    EXPECT_EQ(Serving(*manager), 1);
  }
  // Restart while the ref points at the broken v2.
  auto manager = Manager();
  RegistrySource source(Options(), manager.get());
  ASSERT_TRUE(source.OpenCache().ok());
  ASSERT_TRUE(source.ServeLastGood().ok());
  EXPECT_EQ(Serving(*manager), 1);
  EXPECT_EQ(manager->Current()->source, "pets@production");
  // The remembered manifest's aliases are not reported: they may have moved.
  EXPECT_TRUE(manager->Current()->aliases.empty());
  source.Handle(v2);
  EXPECT_EQ(Serving(*manager), 1);
  ManagerStatus status = manager->Status();
  EXPECT_EQ(status.last_failed_version, 2);
  EXPECT_NE(status.last_error.find("pets:2: "), std::string::npos)
      << status.last_error;
  EXPECT_NE(status.last_error.find("not a TorchScript"), std::string::npos)
      << status.last_error;
  // A good version swaps in as usual, and becomes the one remembered.
  source.Handle(v3);
  EXPECT_EQ(Serving(*manager), 3);
  EXPECT_EQ(manager->Status().last_failed_version, 0);
  auto restarted = Manager();
  RegistrySource again(Options(), restarted.get());
  ASSERT_TRUE(again.ServeLastGood().ok());
  EXPECT_EQ(Serving(*restarted), 3);
}

TEST_F(RegistrySourceTest, ABrokenVersionIsNeverRemembered) {
  {
    auto manager = Manager();
    RegistrySource source(Options(), manager.get());
    source.Handle(Cached(1, true));
    source.Handle(Cached(2, false));
    EXPECT_EQ(Serving(*manager), 1);
  }
  auto manager = Manager();
  RegistrySource source(Options(), manager.get());
  ASSERT_TRUE(source.ServeLastGood().ok());
  EXPECT_EQ(Serving(*manager), 1);
}

TEST_F(RegistrySourceTest, AnotherRefsVersionIsNotServed) {
  {
    auto manager = Manager();
    RegistrySource source(Options("pets@production"), manager.get());
    source.Handle(Cached(1, true));
    ASSERT_EQ(Serving(*manager), 1);
  }
  for (const std::string ref : {"pets@staging", "pets", "pets:1"}) {
    auto manager = Manager();
    RegistrySource source(Options(ref), manager.get());
    EXPECT_EQ(source.ServeLastGood().code(), absl::StatusCode::kNotFound)
        << ref;
    EXPECT_EQ(manager->Current(), nullptr) << ref;
  }
}

TEST_F(RegistrySourceTest, AnotherRegistrysVersionIsNotServed) {
  {
    auto manager = Manager();
    RegistrySource source(Options(), manager.get());
    source.Handle(Cached(1, true));
  }
  auto manager = Manager();
  RegistrySource source(Options("pets@production", "127.0.0.1:2"),
                        manager.get());
  EXPECT_EQ(source.ServeLastGood().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(manager->Current(), nullptr);
}

TEST_F(RegistrySourceTest, ADamagedCachedFileIsDroppedNotServed) {
  const auto v1 = Cached(1, true);
  {
    auto manager = Manager();
    RegistrySource source(Options(), manager.get());
    source.Handle(v1);
  }
  const std::string path = BlobCachePath(dir_, v1.components(0).digest());
  std::ofstream(path) << "flipped bits";
  auto manager = Manager();
  RegistrySource source(Options(), manager.get());
  EXPECT_EQ(source.ServeLastGood().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(manager->Current(), nullptr);
  struct stat st;
  EXPECT_NE(stat(path.c_str(), &st), 0) << "the damaged file is still there";
  // Gone from the cache altogether: nothing to serve, not an error to retry.
  EXPECT_EQ(source.ServeLastGood().code(), absl::StatusCode::kNotFound);
}

TEST_F(RegistrySourceTest, AnUnreachableRegistryAtStartUpServesTheLastGood) {
  {
    auto manager = Manager();
    RegistrySource source(Options(), manager.get());
    source.Handle(Cached(4, true));
  }
  auto manager = Manager();
  RegistrySource source(Options(), manager.get());
  source.Start();
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (manager->Current() == nullptr && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  source.Stop();
  EXPECT_EQ(Serving(*manager), 4);
}

// Collects what is logged while it lives.
class LogCapture : public google::LogSink {
 public:
  LogCapture() { google::AddLogSink(this); }
  ~LogCapture() override { google::RemoveLogSink(this); }
  void send(google::LogSeverity, const char*, const char*, int,
            const google::LogMessageTime&, const char* message,
            size_t length) override {
    absl::MutexLock lock(&mu_);
    text_.append(message, length).append("\n");
  }
  std::string text() {
    absl::MutexLock lock(&mu_);
    return text_;
  }

 private:
  absl::Mutex mu_;
  std::string text_ ABSL_GUARDED_BY(mu_);
};

// A TCP port whose accept queue is full, so a connection attempt is never
// answered (SYNs are dropped) and a gRPC channel stays CONNECTING for its
// whole connect timeout (20 s).
class UnansweredPort {
 public:
  UnansweredPort() {
    listener_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (bind(listener_, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        listen(listener_, 0) != 0 ||
        getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      return;
    }
    port_ = ntohs(addr.sin_port);
    // Fill the queue (a backlog of 0 still queues one connection).
    for (int i = 0; i < 2; ++i) {
      const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
      connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
      fillers_.push_back(fd);
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  ~UnansweredPort() {
    for (int fd : fillers_) close(fd);
    close(listener_);
  }
  int port() const { return port_; }
  // Whether a new connection to the port is left unanswered (rather than
  // refused, as on hosts with net.ipv4.tcp_abort_on_overflow set).
  bool Hangs() const {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port_);
    connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    pollfd p{fd, POLLOUT, 0};
    const bool pending = poll(&p, 1, 200) == 0;
    close(fd);
    return pending;
  }

 private:
  int listener_ = -1;
  int port_ = 0;
  std::vector<int> fillers_;
};

TEST_F(RegistrySourceTest, StopIsPromptWhileTheWatchIsStillConnecting) {
  UnansweredPort unanswered;
  ASSERT_NE(unanswered.port(), 0);
  if (!unanswered.Hangs()) {
    GTEST_SKIP() << "this host refuses connections to a full accept queue";
  }
  LogCapture log;
  auto manager = Manager();
  RegistrySource source(
      Options("pets@production",
              "127.0.0.1:" + std::to_string(unanswered.port())),
      manager.get());
  source.Start();
  // The thread logs this just before it opens the watch, which cannot
  // connect; give it a moment to be inside the connection attempt.
  const absl::Time logged_by = absl::Now() + absl::Seconds(10);
  while (log.text().find("waiting for the registry") == std::string::npos) {
    ASSERT_LT(absl::Now(), logged_by) << log.text();
    absl::SleepFor(absl::Milliseconds(10));
  }
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time start = absl::Now();
  source.Stop();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST_F(RegistrySourceTest, TheLogSaysWhatServesAfterAFailure) {
  const auto v1 = Cached(1, true);
  {
    auto manager = Manager();
    RegistrySource source(Options(), manager.get());
    source.Handle(v1);
  }
  {
    // Nothing serves: the log must not claim that anything does.
    LogCapture log;
    auto manager = Manager();
    RegistrySource source(Options("pets@staging"), manager.get());
    source.Handle(Cached(2, false));
    EXPECT_EQ(manager->Current(), nullptr);
    EXPECT_NE(log.text().find("pets:2 was not loaded; no version is serving"),
              std::string::npos)
        << log.text();
    EXPECT_EQ(log.text().find("keeps serving"), std::string::npos)
        << log.text();
    EXPECT_EQ(metrics_.loads_failure.Value(), 1);
  }
  LogCapture log;
  auto manager = Manager();
  RegistrySource source(Options(), manager.get());
  ASSERT_TRUE(source.ServeLastGood().ok());
  source.Handle(Cached(3, false));
  const std::string text = log.text();
  EXPECT_NE(text.find("loading pets:1, the last version of pets@production "
                      "that served, from the cache"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("pets:3 was not loaded; pets:1 keeps serving"),
            std::string::npos)
      << text;
}

}  // namespace
}  // namespace kennel::inference
