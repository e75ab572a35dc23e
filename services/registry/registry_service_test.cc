// The registry's gRPC edge in process, driven through the shared
// RegistryClient (so the client library is tested against the real
// service) and, for malformed streams, through the raw stub.
#include "services/registry/registry_service.h"

#include <arpa/inet.h>
#include <glog/logging.h>
#include <netinet/in.h>
#include <prometheus/registry.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/registry_client.h"
#include "common/server.h"
#include "common/sha256.h"
#include "common/storage/file_store.h"
#include "common/storage/s3_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kennel::registry {
namespace {

using ::testing::HasSubstr;

std::string Bytes(size_t n, char seed) {
  std::string out(n, '\0');
  for (size_t i = 0; i < n; ++i)
    out[i] = static_cast<char>(seed + i * 31 + (i >> 10));
  return out;
}

class RegistryServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(TokenAuth()); }

  void StartServer(TokenAuth auth) {
    server_.reset();
    service_.reset();
    hub_.reset();
    if (dir_.empty()) {
      char tmpl[] = "/tmp/kennel-registry-test-XXXXXX";
      ASSERT_NE(mkdtemp(tmpl), nullptr);
      dir_ = tmpl;
      auto files = storage::FileStore::Open(dir_ + "/store");
      ASSERT_TRUE(files.ok());
      files_ = std::move(*files);
      store_ = std::make_unique<ModelStore>(files_);
      ASSERT_TRUE(store_->Init().ok());
      metrics_ = std::make_unique<RegistryMetrics>(registry_);
    }
    auth_ = std::move(auth);
    hub_ = std::make_unique<WatchHub>(
        [this](const ModelRef& ref) { return store_->Resolve(ref); },
        absl::Seconds(30));
    store_->SetChangeListener(
        [this](const std::string& name) { hub_->ModelChanged(name); });
    service_ = std::make_unique<RegistryService>(store_.get(), hub_.get(),
                                                 &auth_, metrics_.get());
    ServerOptions options;
    options.name = "kennel-registry-test";
    server_ = std::make_unique<Server>(options);
    server_->AddService(service_.get(), "kennel.v1.ModelRegistry");
    server_->OnDrain([this] { hub_->Shutdown(); });
    ASSERT_TRUE(server_->Start().ok());
  }

  void TearDown() override {
    server_.reset();
    service_.reset();
    hub_.reset();
    std::filesystem::remove_all(dir_);
  }

  ClientOptions Options(const std::string& token = "") {
    ClientOptions options;
    options.address = absl::StrCat("127.0.0.1:", server_->port());
    options.token = token;
    options.timeout = absl::Seconds(20);
    return options;
  }

  std::string WriteFile(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  static v1::PushHeader Header(const std::string& name) {
    v1::PushHeader header;
    header.set_name(name);
    header.add_components()->set_role(v1::COMPONENT_ROLE_MODEL);
    header.add_labels("a");
    header.add_labels("b");
    return header;
  }

  int StoredBlobs() {
    return static_cast<int>(files_->ListAll("blobs/sha256/")->size());
  }

  std::string dir_;
  std::shared_ptr<storage::FileStore> files_;
  std::unique_ptr<ModelStore> store_;
  prometheus::Registry registry_;
  std::unique_ptr<RegistryMetrics> metrics_;
  std::unique_ptr<WatchHub> hub_;
  TokenAuth auth_;
  std::unique_ptr<RegistryService> service_;
  std::unique_ptr<Server> server_;
};

TEST_F(RegistryServiceTest, PushPullRoundTripSendsEachBlobOnce) {
  RegistryClient client(Options());
  const std::string bytes = Bytes(3 << 20, 1);
  const std::string path = WriteFile("model.pt", bytes);
  int64_t last_progress = -1;
  auto v1 = client.PushFiles(Header("dogs"), {path},
                             [&](int64_t done, int64_t total) {
                               EXPECT_EQ(total, 3 << 20);
                               last_progress = done;
                             });
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ(v1->version(), 1);
  EXPECT_EQ(v1->components(0).digest(), Sha256Digest(bytes));
  EXPECT_EQ(v1->components(0).size(), 3 << 20);
  EXPECT_EQ(last_progress, 3 << 20);
  EXPECT_EQ(metrics_->bytes_received.Value(), 3 << 20);

  auto v2 = client.PushFiles(Header("dogs"), {path});
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ(v2->version(), 2);
  EXPECT_EQ(metrics_->bytes_received.Value(), 3 << 20) << "blob sent twice";
  EXPECT_EQ(metrics_->versions_committed.Value(), 2);

  const std::string dest = dir_ + "/pulled.pt";
  absl::Status pulled =
      client.PullComponent("dogs:1", v1->components(0).digest(), dest);
  ASSERT_TRUE(pulled.ok()) << pulled;
  std::ifstream in(dest, std::ios::binary);
  std::string got((std::istreambuf_iterator<char>(in)),
                  std::istreambuf_iterator<char>());
  EXPECT_TRUE(got == bytes);
  EXPECT_EQ(metrics_->bytes_sent.Value(), 3 << 20);

  auto latest = client.GetModel("dogs");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->version(), 2);
  auto alias = client.SetAlias("dogs", "prod", 1);
  ASSERT_TRUE(alias.ok()) << alias.status();
  EXPECT_EQ(client.GetModel("dogs@prod")->version(), 1);
  EXPECT_TRUE(absl::IsNotFound(client.SetAlias("dogs", "prod", 7).status()));
  EXPECT_TRUE(absl::IsFailedPrecondition(client.DeleteVersion("dogs", 1)));
  EXPECT_TRUE(absl::IsNotFound(
      client.PullComponent("dogs:1", Sha256Digest("other"), dest + "2")));
  EXPECT_FALSE(std::filesystem::exists(dest + "2"));
}

TEST_F(RegistryServiceTest, MutationsNeedTheTokenAndStoreNothingWithout) {
  StartServer(TokenAuth("s3cret"));
  const std::string path = WriteFile("model.pt", Bytes(100000, 2));
  for (const std::string& token : {std::string(), std::string("wrong")}) {
    RegistryClient client(Options(token));
    auto pushed = client.PushFiles(Header("dogs"), {path});
    EXPECT_TRUE(absl::IsUnauthenticated(pushed.status())) << pushed.status();
    EXPECT_TRUE(
        absl::IsUnauthenticated(client.SetAlias("dogs", "p", 1).status()));
    EXPECT_TRUE(absl::IsUnauthenticated(client.DeleteVersion("dogs", 1)));
    EXPECT_TRUE(absl::IsUnauthenticated(client.DeleteAlias("dogs", "p")));
    EXPECT_TRUE(
        absl::IsUnauthenticated(client.GarbageCollect(1, true).status()));
    // Reads stay open.
    EXPECT_TRUE(absl::IsNotFound(client.GetModel("dogs").status()));
  }
  EXPECT_EQ(StoredBlobs(), 0);
  RegistryClient good(Options("s3cret"));
  auto pushed = good.PushFiles(Header("dogs"), {path});
  ASSERT_TRUE(pushed.ok()) << pushed.status();
  EXPECT_EQ(StoredBlobs(), 1);
}

TEST_F(RegistryServiceTest, BadNamesAreInvalidArgument) {
  RegistryClient client(Options());
  const std::string path = WriteFile("model.pt", "abc");
  for (const char* name : {"Dogs", "../etc", "a b", "", "-x"}) {
    EXPECT_TRUE(absl::IsInvalidArgument(
        client.PushFiles(Header(name), {path}).status()))
        << name;
    EXPECT_TRUE(absl::IsInvalidArgument(client.GetModel(name).status()))
        << name;
  }
  EXPECT_TRUE(
      absl::IsInvalidArgument(client.SetAlias("dogs", "PROD", 1).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(client.ListVersions("x/y").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(client.HasBlobs({"md5:abc"}).status()));
  EXPECT_EQ(StoredBlobs(), 0);
}

TEST_F(RegistryServiceTest, MalformedPushStreamsStoreNothing) {
  auto channel = MakeChannel(Options());
  ASSERT_TRUE(channel.ok());
  auto stub = v1::ModelRegistry::NewStub(*channel);
  const std::string bytes = Bytes(1000, 3);
  auto push = [&](const std::vector<v1::PushModelRequest>& messages) {
    grpc::ClientContext context;
    v1::PushModelResponse response;
    auto writer = stub->PushModel(&context, &response);
    for (const auto& m : messages) {
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  };
  v1::PushModelRequest header;
  *header.mutable_header() = Header("dogs");
  header.mutable_header()->mutable_components(0)->set_digest(
      Sha256Digest(bytes));
  header.mutable_header()->mutable_components(0)->set_size(1000);
  auto chunk = [&](int64_t offset, int64_t size, int component = 0) {
    v1::PushModelRequest m;
    m.mutable_chunk()->set_component(component);
    m.mutable_chunk()->set_offset(offset);
    m.mutable_chunk()->set_data(bytes.substr(offset, size));
    return m;
  };
  struct Case {
    std::string what;
    std::vector<v1::PushModelRequest> messages;
    std::string message;
  };
  v1::PushModelRequest wrong_bytes = chunk(0, 1000);
  wrong_bytes.mutable_chunk()->mutable_data()->at(10) ^= 1;
  v1::PushModelRequest huge = header;
  for (int i = 0; i < 10000; ++i)
    huge.mutable_header()->add_labels(std::string(200, 'x'));
  const std::vector<Case> cases = {
      {"truncated", {header, chunk(0, 500)}, "truncated"},
      {"no bytes", {header}, "not stored"},
      {"gap", {header, chunk(0, 400), chunk(500, 500)}, "in order"},
      {"bad index", {header, chunk(0, 1000, 3)}, "component 3"},
      {"corrupt", {header, wrong_bytes}, "hash to"},
      {"chunk first", {chunk(0, 1000)}, "header"},
      {"two headers", {header, header}, "header"},
      {"oversized header", {huge}, "limit"},
  };
  for (const Case& c : cases) {
    grpc::Status status = push(c.messages);
    EXPECT_EQ(status.error_code(), c.what == "no bytes"
                                       ? grpc::StatusCode::FAILED_PRECONDITION
                                       : grpc::StatusCode::INVALID_ARGUMENT)
        << c.what << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.message)) << c.what;
  }
  EXPECT_EQ(StoredBlobs(), 0);
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs").status()));
  EXPECT_TRUE(push({header, chunk(0, 600), chunk(600, 400)}).ok());
  EXPECT_EQ(store_->Resolve("dogs")->version(), 1);
}

TEST_F(RegistryServiceTest, CancelledPushLeavesNoVersionOrStagedBytes) {
  auto channel = MakeChannel(Options());
  auto stub = v1::ModelRegistry::NewStub(*channel);
  const std::string bytes = Bytes(4 << 20, 4);
  grpc::ClientContext context;
  v1::PushModelResponse response;
  auto writer = stub->PushModel(&context, &response);
  v1::PushModelRequest m;
  *m.mutable_header() = Header("dogs");
  m.mutable_header()->mutable_components(0)->set_digest(Sha256Digest(bytes));
  m.mutable_header()->mutable_components(0)->set_size(bytes.size());
  ASSERT_TRUE(writer->Write(m));
  m.mutable_chunk()->set_component(0);
  m.mutable_chunk()->set_offset(0);
  m.mutable_chunk()->set_data(bytes.substr(0, 1 << 20));
  ASSERT_TRUE(writer->Write(m));
  context.TryCancel();
  EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const std::string staging = dir_ + "/store/.staging";
  for (int i = 0; i < 100 && !std::filesystem::is_empty(staging); ++i) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(std::filesystem::is_empty(staging));
  EXPECT_EQ(StoredBlobs(), 0);
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs").status()));
}

TEST_F(RegistryServiceTest, CorruptBlobIsRefusedOnPull) {
  RegistryClient client(Options());
  const std::string bytes = Bytes(2 << 20, 5);
  auto v = client.PushFiles(Header("dogs"), {WriteFile("m.pt", bytes)});
  ASSERT_TRUE(v.ok());
  const std::string blob =
      files_->PathOf(ModelStore::BlobKey(v->components(0).digest()));
  {
    std::fstream f(blob, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(12345);
    f.put('!');
  }
  const std::string dest = dir_ + "/out/model.pt";
  std::filesystem::create_directories(dir_ + "/out");
  absl::Status s =
      client.PullComponent("dogs", v->components(0).digest(), dest);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("corrupt"));
  EXPECT_TRUE(std::filesystem::is_empty(dir_ + "/out"));
}

TEST_F(RegistryServiceTest, LargeArtifactRoundTrip) {
  // Past every size at which a transfer step moves to a thread of its own:
  // the client's digest read-ahead, the registry's blob writer, parallel
  // segment reads, the client's pull hashing.
  RegistryClient client(Options());
  const std::string bytes = Bytes((20 << 20) + 3, 7);
  auto v = client.PushFiles(Header("big"), {WriteFile("big.pt", bytes)});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->components(0).digest(), Sha256Digest(bytes));
  const std::string dest = dir_ + "/big-pulled.pt";
  int64_t last_progress = -1;
  absl::Status pulled = client.PullComponent(
      "big", v->components(0).digest(), dest,
      [&](int64_t done, int64_t total) { last_progress = done; });
  ASSERT_TRUE(pulled.ok()) << pulled;
  EXPECT_EQ(last_progress, static_cast<int64_t>(bytes.size()));
  std::ifstream in(dest, std::ios::binary);
  std::string got((std::istreambuf_iterator<char>(in)),
                  std::istreambuf_iterator<char>());
  EXPECT_TRUE(got == bytes);
  EXPECT_EQ(metrics_->bytes_sent.Value(), static_cast<double>(bytes.size()));
}

TEST_F(RegistryServiceTest, CorruptChunkIsNeverSentAndThePullFails) {
  RegistryClient client(Options());
  // Large enough for parallel segment reads and the client's hashing thread.
  const std::string bytes = Bytes((12 << 20) + 5, 6);
  auto v = client.PushFiles(Header("dogs"), {WriteFile("m.pt", bytes)});
  ASSERT_TRUE(v.ok()) << v.status();
  {
    std::fstream f(
        files_->PathOf(ModelStore::BlobKey(v->components(0).digest())),
        std::ios::binary | std::ios::in | std::ios::out);
    f.seekp((9 << 20) + 100);
    f.put(static_cast<char>(bytes[(9 << 20) + 100] ^ 1));
  }
  // On the wire: the nine chunks before the bad one, intact, then the error.
  auto channel = MakeChannel(Options());
  ASSERT_TRUE(channel.ok());
  auto stub = v1::ModelRegistry::NewStub(*channel);
  grpc::ClientContext context;
  v1::PullModelRequest request;
  request.set_ref("dogs:1");
  auto reader = stub->PullModel(&context, request);
  v1::PullModelResponse response;
  std::string received;
  int chunks = 0;
  while (reader->Read(&response)) {
    if (!response.has_chunk()) continue;
    EXPECT_EQ(response.chunk().offset(), static_cast<int64_t>(received.size()));
    received += response.chunk().data();
    ++chunks;
  }
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS)
      << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("chunk 9"));
  EXPECT_EQ(chunks, 9);
  EXPECT_TRUE(received == bytes.substr(0, 9 << 20));

  // The client library keeps nothing of a failed pull.
  std::filesystem::create_directories(dir_ + "/out");
  absl::Status s = client.PullComponent("dogs", v->components(0).digest(),
                                        dir_ + "/out/model.pt");
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(std::filesystem::is_empty(dir_ + "/out"));
}

TEST_F(RegistryServiceTest, WatchSeesCurrentStateThenEveryChange) {
  RegistryClient client(Options());
  auto watch = client.Watch("dogs@prod");
  v1::WatchModelResponse state;
  ASSERT_TRUE(watch->Next(&state));
  EXPECT_FALSE(state.has_model());  // nothing there yet

  ASSERT_TRUE(client.PushFiles(Header("dogs"), {WriteFile("a", "aaa")}).ok());
  ASSERT_TRUE(client.PushFiles(Header("dogs"), {WriteFile("b", "bbb")}).ok());
  ASSERT_TRUE(client.SetAlias("dogs", "prod", 1).ok());
  ASSERT_TRUE(watch->Next(&state));
  EXPECT_EQ(state.model().version(), 1);
  ASSERT_TRUE(client.SetAlias("dogs", "prod", 2).ok());
  ASSERT_TRUE(watch->Next(&state));
  EXPECT_EQ(state.model().version(), 2);
  ASSERT_TRUE(client.DeleteAlias("dogs", "prod").ok());
  ASSERT_TRUE(watch->Next(&state));
  EXPECT_FALSE(state.has_model());
  watch->Cancel();
  EXPECT_FALSE(watch->Next(&state));
  EXPECT_TRUE(absl::IsCancelled(watch->status())) << watch->status();

  auto bad = client.Watch("Not A Ref");
  EXPECT_FALSE(bad->Next(&state));
  EXPECT_TRUE(absl::IsInvalidArgument(bad->status()));
}

TEST_F(RegistryServiceTest, ManyWatchersAllSeeTheNewVersion) {
  RegistryClient client(Options());
  constexpr int kWatchers = 64;
  std::vector<std::unique_ptr<ModelWatch>> watches;
  v1::WatchModelResponse state;
  for (int i = 0; i < kWatchers; ++i) {
    watches.push_back(client.Watch("dogs"));
    ASSERT_TRUE(watches.back()->Next(&state));
    EXPECT_FALSE(state.has_model());
  }
  EXPECT_EQ(hub_->watcher_count(), kWatchers);
  ASSERT_TRUE(client.PushFiles(Header("dogs"), {WriteFile("a", "aaa")}).ok());
  std::atomic<int> saw{0};
  std::vector<std::thread> readers;
  for (auto& watch : watches) {
    readers.emplace_back([&saw, w = watch.get()] {
      v1::WatchModelResponse s;
      if (w->Next(&s) && s.model().version() == 1) ++saw;
    });
  }
  for (auto& t : readers) t.join();
  EXPECT_EQ(saw.load(), kWatchers);
  watches.clear();
  for (int i = 0; i < 100 && hub_->watcher_count() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(hub_->watcher_count(), 0) << "cancelled watches were not released";
}

TEST_F(RegistryServiceTest, SlowWatcherGetsTheNewestStateNotABacklog) {
  RegistryClient client(Options());
  // Big manifests, so unread states fill the transport's buffers quickly.
  v1::PushHeader header = Header("big");
  for (int i = 0; i < 4000; ++i)
    header.add_labels(absl::StrCat(i, std::string(216, 'a' + i % 26)));
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(
        client.PushFiles(header, {WriteFile("m", absl::StrCat(i))}).ok());
  }
  ASSERT_TRUE(client.SetAlias("big", "prod", 1).ok());
  auto watch = client.Watch("big@prod");
  v1::WatchModelResponse state;
  ASSERT_TRUE(watch->Next(&state));
  ASSERT_EQ(state.model().version(), 1);
  constexpr int kMoves = 40;
  for (int i = 0; i < kMoves; ++i) {
    ASSERT_TRUE(client.SetAlias("big", "prod", 2 + i % 2).ok());
  }
  // Only the last move reaches version 4.
  ASSERT_TRUE(client.SetAlias("big", "prod", 4).ok());
  const int64_t final_version = 4;
  int received = 0;
  while (watch->Next(&state)) {
    ++received;
    if (state.model().version() == final_version) break;
  }
  EXPECT_EQ(state.model().version(), final_version);
  EXPECT_LT(received, kMoves) << "every intermediate state was queued";
  LOG(INFO) << "slow watcher received " << received << " states for "
            << kMoves + 1 << " moves";
}

TEST_F(RegistryServiceTest, HungStorageIsUnavailableBeforeTheCallersDeadline) {
  // A socket that listens but never accepts: connections open and requests
  // go unanswered, as with a frozen S3 gateway.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(fd, 64), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  storage::S3Settings settings;  // 10 s stall timeout, 15 s retry budget
  settings.endpoint = absl::StrCat("http://127.0.0.1:", ntohs(addr.sin_port));
  settings.path_style = true;
  settings.access_key = "key";
  settings.secret_key = "secret";
  auto s3 = storage::S3Store::Open("bucket", "", settings);
  ASSERT_TRUE(s3.ok()) << s3.status();
  store_ = std::make_unique<ModelStore>(
      std::shared_ptr<storage::ObjectStore>(std::move(*s3)));
  StartServer(TokenAuth());

  ClientOptions options = Options();
  options.timeout = absl::Seconds(2);
  RegistryClient client(options);
  const std::string path = WriteFile("model.pt", "weights");
  const std::vector<std::pair<std::string, std::function<absl::Status()>>>
      calls = {
          {"get", [&] { return client.GetModel("dogs").status(); }},
          {"push",
           [&] { return client.PushFiles(Header("dogs"), {path}).status(); }},
          {"alias",
           [&] { return client.SetAlias("dogs", "prod", 1).status(); }},
      };
  for (const auto& [what, call] : calls) {
    const absl::Time start = absl::Now();
    absl::Status s = call();
    const absl::Duration took = absl::Now() - start;
    EXPECT_TRUE(absl::IsUnavailable(s)) << what << ": " << s;
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("S3 did not answer within the deadline"))
        << what;
    EXPECT_LT(took, absl::Seconds(2)) << what;
    EXPECT_GT(took, absl::Seconds(1)) << what;
  }
  server_.reset();
  close(fd);
}

TEST_F(RegistryServiceTest, ClientReportsAChannelItCannotMake) {
  ClientOptions options = Options();
  options.tls_ca = dir_ + "/no-such-ca.pem";
  RegistryClient client(options);
  EXPECT_TRUE(absl::IsInvalidArgument(client.GetModel("dogs").status()));
  auto watch = client.Watch("dogs");
  v1::WatchModelResponse state;
  EXPECT_FALSE(watch->Next(&state));
  EXPECT_TRUE(absl::IsInvalidArgument(watch->status())) << watch->status();
}

TEST_F(RegistryServiceTest, DrainEndsWatchesSoTheServerCanStop) {
  RegistryClient client(Options());
  auto watch = client.Watch("dogs");
  v1::WatchModelResponse state;
  ASSERT_TRUE(watch->Next(&state));
  absl::Time start = absl::Now();
  server_->Shutdown();
  std::thread stopper([this] { server_->Wait(); });
  EXPECT_FALSE(watch->Next(&state));
  EXPECT_TRUE(absl::IsUnavailable(watch->status())) << watch->status();
  stopper.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

}  // namespace
}  // namespace kennel::registry
