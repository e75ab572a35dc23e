#include "common/metrics.h"

#include <google/protobuf/descriptor.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <thread>

#include "common/server.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kennel/v1/registry.grpc.pb.h"
#include "kennel/v1/trainer.grpc.pb.h"

namespace kennel {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

class ServerMetricsTest : public testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.name = "kennel-test";
    options.listen = "127.0.0.1:0";
    options.drain_grace = absl::Seconds(2);
    server_ = std::make_unique<Server>(options);
    ASSERT_TRUE(server_->Start().ok());
    channel_ =
        grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                            grpc::InsecureChannelCredentials());
    stub_ = Health::NewStub(channel_);
  }

  grpc::Status Check(const std::string& service,
                     HealthCheckResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(5));
    HealthCheckRequest request;
    request.set_service(service);
    return stub_->Check(&context, request, response);
  }

  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<Health::Stub> stub_;
};

TEST_F(ServerMetricsTest, InterceptorCountsEveryRpcByMethodAndCode) {
  HealthCheckResponse response;
  ASSERT_TRUE(Check("", &response).ok());
  ASSERT_TRUE(Check("", &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
  grpc::Status unknown = Check("no.such.Service", &response);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND);

  std::string text = server_->metrics().Scrape();
  EXPECT_NE(text.find("kennel_grpc_server_handled_total{grpc_code=\"OK\","
                      "grpc_method=\"Check\",grpc_service=\"grpc.health.v1."
                      "Health\"} 2"),
            std::string::npos)
      << text;
  EXPECT_NE(
      text.find("kennel_grpc_server_handled_total{grpc_code=\"NOT_FOUND\","
                "grpc_method=\"Check\",grpc_service=\"grpc.health.v1."
                "Health\"} 1"),
      std::string::npos)
      << text;
  EXPECT_NE(text.find("kennel_grpc_server_handling_seconds_count{grpc_method="
                      "\"Check\",grpc_service=\"grpc.health.v1.Health\"} 3"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("kennel_grpc_server_started_total{grpc_method=\"Check\","
                      "grpc_service=\"grpc.health.v1.Health\"} 3"),
            std::string::npos)
      << text;
}

// Sends an empty unary call to `method` and returns its status.
grpc::Status CallGeneric(const std::shared_ptr<grpc::Channel>& channel,
                         const std::string& method) {
  grpc::GenericStub generic(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(5));
  grpc::Slice empty("");
  grpc::ByteBuffer request(&empty, 1), response;
  grpc::Status status;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  generic.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) {
                      std::lock_guard<std::mutex> lock(mu);
                      status = s;
                      done = true;
                      cv.notify_one();
                    });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  return status;
}

TEST_F(ServerMetricsTest, UnknownMethodsShareOneLabelSoSeriesStayBounded) {
  // Names under our own and gRPC's prefixes too: a client may send any
  // string as a method, and each new label pair would be a series kept
  // forever.
  for (const char* method :
       {"/evil.Service/A", "/evil.Service/B", "/kennel.v1.evilService/A",
        "/kennel.v1.evilService/B", "/grpc.health.v1.Health/evilMethod",
        "/grpc.evil/C"}) {
    EXPECT_EQ(CallGeneric(channel_, method).error_code(),
              grpc::StatusCode::UNIMPLEMENTED);
  }
  std::string text = server_->metrics().Scrape();
  EXPECT_EQ(text.find("evil"), std::string::npos) << text;
}

TEST(ServedServiceMetricsTest, OnlyTheServicesAServerServesGetLabels) {
  // Both services are compiled into this binary (using a trainer message
  // links its descriptors in); only one is served.
  ASSERT_NE(v1::TrainRequest::descriptor(), nullptr);
  ASSERT_NE(
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
          v1::Trainer::service_full_name()),
      nullptr);
  v1::ModelRegistry::Service registry;  // every method UNIMPLEMENTED
  ServerOptions options;
  options.name = "kennel-test";
  options.listen = "127.0.0.1:0";
  options.drain_grace = absl::Seconds(2);
  Server server(options);
  server.AddService(&registry, "kennel.v1.ModelRegistry");
  ASSERT_TRUE(server.Start().ok());
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(server.port()),
                          grpc::InsecureChannelCredentials());
  EXPECT_EQ(
      CallGeneric(channel, "/kennel.v1.ModelRegistry/GetModel").error_code(),
      grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(CallGeneric(channel, "/kennel.v1.Trainer/GetJob").error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  const std::string text = server.metrics().Scrape();
  EXPECT_NE(text.find("kennel_grpc_server_handled_total{grpc_code="
                      "\"UNIMPLEMENTED\",grpc_method=\"GetModel\","
                      "grpc_service=\"kennel.v1.ModelRegistry\"} 1"),
            std::string::npos)
      << text;
  EXPECT_EQ(text.find("kennel.v1.Trainer"), std::string::npos) << text;
  EXPECT_NE(text.find("kennel_grpc_server_handled_total{grpc_code="
                      "\"UNIMPLEMENTED\",grpc_method=\"unknown\","
                      "grpc_service=\"unknown\"} 1"),
            std::string::npos)
      << text;
}

TEST_F(ServerMetricsTest, ScrapeHasProcessMetrics) {
  std::string text = server_->metrics().Scrape();
  for (const char* name :
       {"process_cpu_seconds_total ", "process_resident_memory_bytes ",
        "process_open_fds ", "process_start_time_seconds ",
        "kennel_build_info{"}) {
    EXPECT_NE(text.find(name), std::string::npos) << name << "\n" << text;
  }
  // The start time is a plausible Unix time, not seconds since boot.
  const std::string sample = "\nprocess_start_time_seconds ";
  size_t at = text.find(sample);
  ASSERT_NE(at, std::string::npos);
  double start = std::stod(text.substr(at + sample.size()));
  EXPECT_GT(start, 1.6e9);
}

TEST_F(ServerMetricsTest, LivenessStaysServingWhileNotReady) {
  server_->SetServing(false);
  HealthCheckResponse response;
  ASSERT_TRUE(Check("", &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
  ASSERT_TRUE(Check(kLivenessService, &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
  server_->SetServing(true);
  ASSERT_TRUE(Check("", &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
}

TEST_F(ServerMetricsTest, ShutdownReportsNotServingAndEndsWait) {
  std::thread waiter([&] { server_->Wait(); });
  server_->Shutdown();
  waiter.join();
  HealthCheckResponse response;
  grpc::Status status = Check("", &response);
  EXPECT_FALSE(status.ok() &&
               response.status() == HealthCheckResponse::SERVING);
}

TEST(ServerTest, BusyPortIsAClearError) {
  ServerOptions first_options;
  first_options.listen = "127.0.0.1:0";
  Server first(first_options);
  ASSERT_TRUE(first.Start().ok());
  ServerOptions second_options;
  second_options.listen = "127.0.0.1:" + std::to_string(first.port());
  Server second(second_options);
  absl::Status status = second.Start();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(status.message()).find("cannot listen"),
            std::string::npos);
}

TEST(ServerTest, TlsNeedsBothCertAndKey) {
  ServerOptions options;
  options.tls_cert = "cert.pem";
  Server server(options);
  EXPECT_EQ(server.Start().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kennel
