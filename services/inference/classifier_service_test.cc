#include "services/inference/classifier_service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <fstream>
#include <opencv2/imgcodecs.hpp>
#include <thread>

#include "common/image/image.h"
#include "common/server.h"
#include "common/sha256.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/inference/fake_model.h"

namespace kennel::inference {
namespace {

using testing::FakeBehaviour;
using testing::FakeLoader;

std::string Jpeg(int width, int height, uint64_t seed = 1) {
  cv::Mat rgb = image::SyntheticImage(width, height, seed);
  std::vector<uchar> buf;
  cv::imencode(".jpg", rgb, buf);
  return std::string(buf.begin(), buf.end());
}

TEST(TopKTest, SoftmaxScoresBestFirst) {
  const auto top = TopK({1.0f, 3.0f, 2.0f, -5.0f}, {"a", "b", "c", "d"}, 3);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].label(), "b");
  EXPECT_EQ(top[0].index(), 1);
  EXPECT_EQ(top[1].label(), "c");
  EXPECT_EQ(top[2].label(), "a");
  const double e1 = std::exp(1.0), e2 = std::exp(2.0), e3 = std::exp(3.0),
               e5 = std::exp(-5.0);
  EXPECT_NEAR(top[0].score(), e3 / (e1 + e2 + e3 + e5), 1e-6);
  EXPECT_GT(top[0].score(), top[1].score());
  EXPECT_EQ(TopK({1, 2}, {"a", "b"}, 10).size(), 2u);
  // Huge logits do not overflow.
  const auto big = TopK({1e30f, 0.0f}, {"a", "b"}, 1);
  EXPECT_NEAR(big[0].score(), 1.0, 1e-6);
}

// A real gRPC server on loopback with the service over fake models.
class ClassifierServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kennel_service_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ManagerOptions mo;
    mo.precision = kennel::v1::PRECISION_FP32;
    mo.synthetic_warmup_images = 2;
    mo.warmup_batch_sizes = {1};
    manager_ = std::make_unique<ModelManager>(&loader_, mo, metrics_.get());
    Batcher::Options bo;
    bo.max_batch_size = 4;
    bo.max_queue_delay = absl::Milliseconds(2);
    batcher_ = std::make_unique<Batcher>(bo, metrics_.get());
    ServiceOptions so;
    so.source = "fake@prod";
    so.max_image_bytes = 1 << 20;
    so.max_pixels = 4'000'000;
    service_ = std::make_unique<ClassifierService>(
        manager_.get(), batcher_.get(), metrics_.get(), so);
    ServerOptions options;
    options.name = "inference-test";
    server_ = std::make_unique<Server>(options);
    server_->set_initially_serving(false);
    server_->AddService(service_.get(), "kennel.v1.Classifier");
    manager_->SetOnPublished(
        [this](const LoadedModel&) { server_->SetServing(true); });
    ASSERT_TRUE(server_->Start().ok());
    channel_ =
        grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                            grpc::InsecureChannelCredentials());
    stub_ = kennel::v1::Classifier::NewStub(channel_);
  }

  void TearDown() override {
    server_->grpc_server()->Shutdown();
    batcher_->Shutdown();
    std::system(("rm -rf " + dir_).c_str());
  }

  ModelCandidate Candidate(int64_t version, std::shared_ptr<FakeBehaviour> b) {
    const std::string path = dir_ + "/v" + std::to_string(version);
    std::ofstream(path) << "version " << version;
    loader_.Add(path, {b, {}, ""});
    ModelCandidate c;
    c.source = "fake@prod";
    c.name = "fake";
    c.version = version;
    c.path = path;
    c.labels = {"cat", "dog", "fox"};
    c.aliases = {"prod"};
    kennel::v1::Preprocessing spec = image::ImageNetPreprocessing();
    spec.set_input_size(32);
    spec.set_resize(36);
    c.preprocessing = spec;
    return c;
  }

  grpc::Status Classify(const kennel::v1::ClassifyRequest& request,
                        kennel::v1::ClassifyResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(10));
    return stub_->Classify(&context, request, response);
  }

  grpc::health::v1::HealthCheckResponse::ServingStatus Health() {
    auto health = grpc::health::v1::Health::NewStub(channel_);
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service("kennel.v1.Classifier");
    grpc::health::v1::HealthCheckResponse response;
    EXPECT_TRUE(health->Check(&context, request, &response).ok());
    return response.status();
  }

  kennel::v1::ClassifyRequest Request(std::string bytes) {
    kennel::v1::ClassifyRequest r;
    r.set_image(std::move(bytes));
    return r;
  }

  std::string dir_;
  FakeLoader loader_;
  prometheus::Registry registry_;
  std::unique_ptr<InferenceMetrics> metrics_ =
      std::make_unique<InferenceMetrics>(registry_);
  std::unique_ptr<ModelManager> manager_;
  std::unique_ptr<Batcher> batcher_;
  std::unique_ptr<ClassifierService> service_;
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kennel::v1::Classifier::Stub> stub_;
};

TEST_F(ClassifierServiceTest, UnavailableAndNotServingUntilTheFirstModel) {
  kennel::v1::ClassifyResponse response;
  const grpc::Status before = Classify(Request(Jpeg(64, 48)), &response);
  EXPECT_EQ(before.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Health(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  grpc::ClientContext context;
  kennel::v1::ModelStatus status;
  ASSERT_TRUE(stub_->GetModelStatus(&context, {}, &status).ok());
  EXPECT_FALSE(status.ready());
  EXPECT_EQ(status.source(), "fake@prod");

  auto b = std::make_shared<FakeBehaviour>();
  b->winner = 1;
  ASSERT_TRUE(manager_->Load(Candidate(1, b)).ok());
  EXPECT_EQ(Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  kennel::v1::ClassifyRequest request = Request(Jpeg(64, 48));
  request.set_top_k(2);
  request.set_request_id("r1");
  const grpc::Status after = Classify(request, &response);
  ASSERT_TRUE(after.ok()) << after.error_message();
  ASSERT_EQ(response.predictions_size(), 2);
  EXPECT_EQ(response.predictions(0).label(), "dog");
  EXPECT_EQ(response.model_name(), "fake");
  EXPECT_EQ(response.model_version(), 1);
  EXPECT_EQ(response.model_digest(), *Sha256File(dir_ + "/v1"));
  EXPECT_EQ(response.request_id(), "r1");
  EXPECT_EQ(response.precision(), kennel::v1::PRECISION_FP32);
  EXPECT_EQ(response.timings().batch_size(), 1);
  EXPECT_GT(response.timings().total_us(), 0);
  EXPECT_GE(response.timings().total_us(), response.timings().decode_us());
}

TEST_F(ClassifierServiceTest, BadInputIsInvalidArgumentAndCounted) {
  ASSERT_TRUE(
      manager_->Load(Candidate(1, std::make_shared<FakeBehaviour>())).ok());
  const std::string good = Jpeg(64, 48);
  struct Case {
    std::string name;
    kennel::v1::ClassifyRequest request;
  };
  std::vector<Case> cases;
  cases.push_back({"empty", Request("")});
  cases.push_back({"text", Request("not an image at all")});
  cases.push_back({"truncated", Request(good.substr(0, good.size() / 2))});
  cases.push_back({"gif", Request("GIF89a\x01\x00\x01\x00")});
  auto typed = Request(good);
  typed.set_content_type("image/png");
  cases.push_back({"content type", typed});
  auto unknown_type = Request(good);
  unknown_type.set_content_type("application/pdf");
  cases.push_back({"unknown content type", unknown_type});
  auto negative = Request(good);
  negative.set_top_k(-1);
  cases.push_back({"negative top_k", negative});
  for (const Case& c : cases) {
    kennel::v1::ClassifyResponse response;
    const grpc::Status s = Classify(c.request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << c.name << ": " << s.error_message();
    EXPECT_FALSE(s.error_message().empty()) << c.name;
  }
  EXPECT_EQ(metrics_->rejected_bad_image.Value(), 6);

  // Limits: more bytes than --max-image-bytes, more pixels than
  // --max-pixels (refused from the header, before decoding).
  kennel::v1::ClassifyResponse response;
  std::string huge = good + std::string(2 << 20, '\0');
  grpc::Status s = Classify(Request(huge), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("--max-image-bytes"), std::string::npos);
  std::vector<uchar> flat;
  cv::imencode(".jpg", cv::Mat(2000, 2100, CV_8UC3, cv::Scalar(90, 120, 30)),
               flat);
  ASSERT_LT(flat.size(), 1u << 20);
  s = Classify(Request(std::string(flat.begin(), flat.end())), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("--max-pixels"), std::string::npos)
      << s.error_message();
  EXPECT_EQ(metrics_->rejected_too_large.Value(), 2);
}

TEST_F(ClassifierServiceTest, ModelRefMustNameTheServedVersion) {
  ASSERT_TRUE(
      manager_->Load(Candidate(4, std::make_shared<FakeBehaviour>())).ok());
  for (const char* ok : {"fake", "fake:4", "fake@prod"}) {
    auto request = Request(Jpeg(40, 40));
    request.set_model_ref(ok);
    kennel::v1::ClassifyResponse response;
    EXPECT_TRUE(Classify(request, &response).ok()) << ok;
  }
  for (const char* other : {"dogbreed", "fake:3", "fake@staging"}) {
    auto request = Request(Jpeg(40, 40));
    request.set_model_ref(other);
    kennel::v1::ClassifyResponse response;
    EXPECT_EQ(Classify(request, &response).error_code(),
              grpc::StatusCode::NOT_FOUND)
        << other;
  }
  auto request = Request(Jpeg(40, 40));
  request.set_model_ref("Not A Ref!");
  kennel::v1::ClassifyResponse response;
  EXPECT_EQ(Classify(request, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ClassifierServiceTest, TensorIsTheTrainersTensor) {
  ASSERT_TRUE(
      manager_->Load(Candidate(1, std::make_shared<FakeBehaviour>())).ok());
  const kennel::v1::Preprocessing spec = *Candidate(1, nullptr).preprocessing;
  for (const auto& [w, h] :
       {std::pair{640, 480}, std::pair{300, 500}, std::pair{1600, 1200}}) {
    const std::string bytes = Jpeg(w, h, w);
    auto prepared = service_->Prepare(Request(bytes), absl::Now());
    ASSERT_TRUE(prepared.ok()) << prepared.status();
    // The trainer's feature extraction and evaluation call
    // DecodeAndPreprocess; its fine-tune evaluation decodes with DecodeRgb
    // at MinDecodeSide and calls Preprocess. Both give these floats.
    std::vector<float> trainer(image::TensorSize(spec));
    ASSERT_TRUE(image::DecodeAndPreprocess(bytes, spec, image::DecodeLimits{},
                                           trainer.data())
                    .ok());
    EXPECT_EQ(prepared->input, trainer) << w << "x" << h;
    auto rgb = image::DecodeRgb(bytes, image::DecodeLimits{},
                                image::MinDecodeSide(spec));
    ASSERT_TRUE(rgb.ok());
    ASSERT_TRUE(image::Preprocess(*rgb, spec, trainer.data()).ok());
    EXPECT_EQ(prepared->input, trainer) << w << "x" << h;
  }
}

TEST_F(ClassifierServiceTest,
       StreamAnswersEveryRequestByIdAndGoesOnAfterErrors) {
  auto behaviour = std::make_shared<FakeBehaviour>();
  ASSERT_TRUE(manager_->Load(Candidate(1, behaviour)).ok());
  // The first forward waits until more requests have queued behind it,
  // which they can only do if the stream's reader goes on while it runs.
  absl::Notification entered, gate;
  behaviour->entered = &entered;
  behaviour->gate = &gate;
  std::thread opener([&] {
    entered.WaitForNotification();
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (batcher_->queue_depth() < 2 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    gate.Notify();
  });
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(30));
  auto stream = stub_->ClassifyStream(&context);
  const std::string good = Jpeg(80, 60);
  constexpr int kRequests = 40;
  std::thread writer([&] {
    for (int i = 0; i < kRequests; ++i) {
      auto r = Request(i % 10 == 3 ? std::string("garbage") : good);
      r.set_request_id(std::to_string(i));
      ASSERT_TRUE(stream->Write(r));
    }
    stream->WritesDone();
  });
  std::map<int, kennel::v1::ClassifyResponse> answers;
  kennel::v1::ClassifyResponse response;
  while (stream->Read(&response)) {
    answers[std::stoi(response.request_id())] = response;
  }
  writer.join();
  opener.join();
  ASSERT_TRUE(stream->Finish().ok());
  ASSERT_EQ(answers.size(), static_cast<size_t>(kRequests));
  int batched = 0;
  for (const auto& [id, a] : answers) {
    if (id % 10 == 3) {
      EXPECT_EQ(a.error_code(),
                static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT))
          << id;
      EXPECT_FALSE(a.error_message().empty());
    } else {
      EXPECT_EQ(a.error_code(), 0) << id << " " << a.error_message();
      EXPECT_EQ(a.predictions_size(), 3);
      if (a.timings().batch_size() > 1) ++batched;
    }
  }
  // One stream fills batches: the reader keeps going while answers compute.
  EXPECT_GT(batched, 0);
}

TEST_F(ClassifierServiceTest, DrainEndsOpenStreamsAfterTheirAnswers) {
  ASSERT_TRUE(
      manager_->Load(Candidate(1, std::make_shared<FakeBehaviour>())).ok());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(30));
  auto stream = stub_->ClassifyStream(&context);
  auto request = Request(Jpeg(64, 48));
  request.set_request_id("before");
  ASSERT_TRUE(stream->Write(request));
  kennel::v1::ClassifyResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "before");
  EXPECT_EQ(response.error_code(), 0);
  // The client keeps the stream open; the drain must end it anyway.
  service_->BeginDrain();
  const absl::Time start = absl::Now();
  while (stream->Read(&response)) {
  }
  stream->Finish();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  // New streams are refused while draining.
  grpc::ClientContext again;
  auto refused = stub_->ClassifyStream(&again);
  refused->WritesDone();
  while (refused->Read(&response)) {
  }
  EXPECT_EQ(refused->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(ClassifierServiceTest, SwapUnderLoadDropsNothing) {
  auto b1 = std::make_shared<FakeBehaviour>();
  b1->winner = 0;
  auto b2 = std::make_shared<FakeBehaviour>();
  b2->winner = 2;
  ASSERT_TRUE(manager_->Load(Candidate(1, b1)).ok());
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, answered{0}, saw_v2{0}, wrong_label{0};
  std::vector<std::thread> clients;
  const std::string bytes = Jpeg(120, 90);
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&] {
      while (!stop.load()) {
        kennel::v1::ClassifyResponse response;
        const grpc::Status s = Classify(Request(bytes), &response);
        if (!s.ok()) {
          ++failures;
          continue;
        }
        ++answered;
        // An answer always comes from one version, whole.
        const std::string expect =
            response.model_version() == 1 ? "cat" : "fox";
        if (response.predictions(0).label() != expect) ++wrong_label;
        if (response.model_version() == 2) ++saw_v2;
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(200));
  ASSERT_TRUE(manager_->Load(Candidate(2, b2)).ok());
  const int after_swap = answered.load();
  while (answered.load() < after_swap + 50)
    absl::SleepFor(absl::Milliseconds(5));
  stop = true;
  for (auto& c : clients) c.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(wrong_label.load(), 0);
  EXPECT_GT(saw_v2.load(), 0);
  grpc::ClientContext context;
  kennel::v1::ModelStatus status;
  ASSERT_TRUE(stub_->GetModelStatus(&context, {}, &status).ok());
  EXPECT_TRUE(status.ready());
  EXPECT_EQ(status.model_version(), 2);
  EXPECT_EQ(status.labels_size(), 3);
  EXPECT_EQ(status.preprocessing().input_size(), 32);
  EXPECT_EQ(status.precision(), kennel::v1::PRECISION_FP32);
  EXPECT_GT(status.load_seconds(), 0);
  EXPECT_GT(status.loaded_at().seconds(), 0);
}

}  // namespace
}  // namespace kennel::inference
