#include "services/inference/batcher.h"

#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "services/inference/fake_model.h"

namespace kennel::inference {
namespace {

using testing::FakeBehaviour;
using testing::FakeModel;

constexpr int kSize = 4;
constexpr size_t kFloats = 3 * kSize * kSize;

std::shared_ptr<const LoadedModel> MakeModel(std::shared_ptr<FakeBehaviour> b,
                                             int64_t version = 1) {
  auto m = std::make_shared<LoadedModel>();
  m->name = "fake";
  m->version = version;
  m->preprocessing.set_input_size(kSize);
  m->model = std::make_shared<FakeModel>(std::move(b), false);
  return m;
}

std::vector<float> Input(float value) {
  return std::vector<float>(kFloats, value);
}

// Collects results of asynchronous submissions.
struct Results {
  absl::Mutex mu;
  std::vector<absl::StatusOr<BatchOutput>> outputs ABSL_GUARDED_BY(mu);
  std::atomic<int> done{0};

  BatchItem Item(std::shared_ptr<const LoadedModel> model, float value,
                 absl::Time deadline = absl::InfiniteFuture()) {
    BatchItem item;
    item.model = std::move(model);
    item.input = Input(value);
    item.deadline = deadline;
    item.done = [this](absl::StatusOr<BatchOutput> out) {
      absl::MutexLock lock(&mu);
      outputs.push_back(std::move(out));
      ++done;
    };
    return item;
  }
  int want = 0;
  void WaitFor(int n) {
    absl::MutexLock lock(&mu);
    want = n;
    mu.Await(absl::Condition(
        +[](Results* r) { return r->done.load() >= r->want; }, this));
  }
};

TEST(BatcherTest, FormsBatchesUpToTheMaximumSize) {
  auto b = std::make_shared<FakeBehaviour>();
  auto model = MakeModel(b);
  Batcher::Options options;
  options.max_batch_size = 4;
  options.max_queue_delay = absl::Seconds(2);
  Batcher batcher(options, nullptr);
  Results results;
  // A ninth request is on its way, so the worker has reason to wait.
  Batcher::Arrival ninth(&batcher);
  const absl::Time start = absl::Now();
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(batcher.Submit(results.Item(model, i)).ok());
  }
  results.WaitFor(8);
  // Full batches leave at once; nobody waited for the 2 s delay.
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  absl::MutexLock lock(&b->mu);
  EXPECT_EQ(b->batch_sizes, (std::vector<int>{4, 4}));
}

TEST(BatcherTest, TheModelsOwnCapLimitsItsBatches) {
  auto b = std::make_shared<FakeBehaviour>();
  auto capped = std::make_shared<LoadedModel>(*MakeModel(b));
  capped->max_batch_size = 3;
  Batcher::Options options;
  options.max_batch_size = 8;
  options.max_queue_delay = absl::Seconds(2);
  Batcher batcher(options, nullptr);
  Results results;
  Batcher::Arrival more(&batcher);
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(batcher.Submit(results.Item(capped, i)).ok());
  }
  results.WaitFor(6);
  absl::MutexLock lock(&b->mu);
  EXPECT_EQ(b->batch_sizes, (std::vector<int>{3, 3}));
}

TEST(BatcherTest, WaitsAtMostTheQueueDelayForABatchToFill) {
  auto b = std::make_shared<FakeBehaviour>();
  Batcher::Options options;
  options.max_batch_size = 8;
  options.max_queue_delay = absl::Milliseconds(100);
  Batcher batcher(options, nullptr);
  // Another request is being decoded but never arrives.
  Batcher::Arrival straggler(&batcher);
  const absl::Time start = absl::Now();
  auto out = batcher.Run(MakeModel(b), Input(1), absl::InfiniteFuture());
  const absl::Duration took = absl::Now() - start;
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->batch_size, 1);
  EXPECT_GE(took, absl::Milliseconds(95));
  EXPECT_LT(took, absl::Seconds(2));
  EXPECT_GE(out->queue_time, absl::Milliseconds(95));
}

TEST(BatcherTest, LoneRequestDoesNotWaitForCompany) {
  auto b = std::make_shared<FakeBehaviour>();
  Batcher::Options options;
  options.max_batch_size = 8;
  options.max_queue_delay = absl::Seconds(5);
  Batcher batcher(options, nullptr);
  // Its own arrival ends as it joins the queue: nothing else is coming.
  Batcher::Arrival arrival(&batcher);
  const absl::Time start = absl::Now();
  auto out =
      batcher.Run(MakeModel(b), Input(1), absl::InfiniteFuture(), &arrival);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_LT(out->queue_time, absl::Seconds(2));
}

TEST(BatcherTest, EachRequestGetsItsOwnRow) {
  auto b = std::make_shared<FakeBehaviour>();
  b->winner = 2;
  auto model = MakeModel(b);
  Batcher::Options options;
  options.max_batch_size = 16;
  options.max_queue_delay = absl::Milliseconds(50);
  Batcher batcher(options, nullptr);
  std::vector<std::thread> threads;
  std::vector<float> winner_logit(10);
  for (int i = 0; i < 10; ++i) {
    threads.emplace_back([&, i] {
      auto out = batcher.Run(model, Input(i), absl::InfiniteFuture());
      ASSERT_TRUE(out.ok());
      ASSERT_EQ(out->logits.size(), 3u);
      winner_logit[i] = out->logits[2];
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 10; ++i) EXPECT_FLOAT_EQ(winner_logit[i], i + 10.0f);
}

TEST(BatcherTest, FullQueueAnswersResourceExhausted) {
  auto b = std::make_shared<FakeBehaviour>();
  absl::Notification gate, entered;
  b->gate = &gate;
  b->entered = &entered;
  auto model = MakeModel(b);
  prometheus::Registry registry;
  InferenceMetrics metrics(registry);
  Batcher::Options options;
  options.max_batch_size = 1;
  options.max_queue = 2;
  Batcher batcher(options, &metrics);
  Results results;
  ASSERT_TRUE(batcher.Submit(results.Item(model, 0)).ok());
  entered.WaitForNotification();  // the worker holds the first request
  ASSERT_TRUE(batcher.Submit(results.Item(model, 1)).ok());
  ASSERT_TRUE(batcher.Submit(results.Item(model, 2)).ok());
  const absl::Status full = batcher.Submit(results.Item(model, 3));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_EQ(metrics.rejected_queue_full.Value(), 1);
  EXPECT_EQ(batcher.queue_depth(), 2);
  gate.Notify();
  results.WaitFor(3);
  absl::MutexLock lock(&results.mu);
  for (const auto& out : results.outputs) EXPECT_TRUE(out.ok());
}

TEST(BatcherTest, ExpiredDeadlineIsDroppedBeforeTheModel) {
  auto b = std::make_shared<FakeBehaviour>();
  absl::Notification gate, entered;
  b->gate = &gate;
  b->entered = &entered;
  auto model = MakeModel(b);
  prometheus::Registry registry;
  InferenceMetrics metrics(registry);
  Batcher::Options options;
  options.max_batch_size = 4;
  options.max_queue_delay = absl::Milliseconds(1);
  Batcher batcher(options, &metrics);
  Results results;
  ASSERT_TRUE(batcher.Submit(results.Item(model, 0)).ok());
  entered.WaitForNotification();
  ASSERT_TRUE(
      batcher
          .Submit(results.Item(model, 1, absl::Now() + absl::Milliseconds(20)))
          .ok());
  ASSERT_TRUE(batcher.Submit(results.Item(model, 2)).ok());
  absl::SleepFor(absl::Milliseconds(60));
  gate.Notify();
  results.WaitFor(3);
  int deadline_exceeded = 0;
  {
    absl::MutexLock lock(&results.mu);
    for (const auto& out : results.outputs) {
      if (!out.ok()) {
        EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded);
        ++deadline_exceeded;
      }
    }
  }
  EXPECT_EQ(deadline_exceeded, 1);
  EXPECT_EQ(b->images.load(), 2) << "the expired request reached the model";
  EXPECT_EQ(metrics.rejected_deadline.Value(), 1);
}

TEST(BatcherTest, ShutdownRunsWhatIsQueuedAndRefusesNewWork) {
  auto b = std::make_shared<FakeBehaviour>();
  absl::Notification gate, entered;
  b->gate = &gate;
  b->entered = &entered;
  auto model = MakeModel(b);
  Batcher::Options options;
  options.max_batch_size = 2;
  options.max_queue_delay = absl::Seconds(5);
  auto batcher = std::make_unique<Batcher>(options, nullptr);
  Results results;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(batcher->Submit(results.Item(model, i)).ok());
  }
  entered.WaitForNotification();
  std::thread stopper([&] { batcher->Shutdown(); });
  // Shutdown has begun (the stopper only has to take a lock): new work is
  // refused.
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(batcher->Submit(results.Item(model, 9)).code(),
            absl::StatusCode::kUnavailable);
  gate.Notify();
  stopper.join();
  EXPECT_EQ(results.done.load(), 5);
  absl::MutexLock lock(&results.mu);
  for (const auto& out : results.outputs) EXPECT_TRUE(out.ok()) << out.status();
}

TEST(BatcherTest, VersionsNeverShareABatch) {
  auto b1 = std::make_shared<FakeBehaviour>();
  auto b2 = std::make_shared<FakeBehaviour>();
  absl::Notification gate, entered;
  b1->gate = &gate;
  b1->entered = &entered;
  auto v1 = MakeModel(b1, 1);
  auto v2 = MakeModel(b2, 2);
  Batcher::Options options;
  options.max_batch_size = 8;
  options.max_queue_delay = absl::Milliseconds(1);
  Batcher batcher(options, nullptr);
  Results results;
  ASSERT_TRUE(batcher.Submit(results.Item(v1, 0)).ok());
  entered.WaitForNotification();
  for (auto* m : {&v1, &v1, &v2, &v2, &v1}) {
    ASSERT_TRUE(batcher.Submit(results.Item(*m, 1)).ok());
  }
  gate.Notify();
  results.WaitFor(6);
  absl::MutexLock l1(&b1->mu);
  absl::MutexLock l2(&b2->mu);
  EXPECT_EQ(b1->batch_sizes, (std::vector<int>{1, 2, 1}));
  EXPECT_EQ(b2->batch_sizes, (std::vector<int>{2}));
}

TEST(BatcherTest, ForwardErrorFailsTheBatchAndTheWorkerGoesOn) {
  auto b = std::make_shared<FakeBehaviour>();
  b->forward_error = absl::InternalError("boom");
  Batcher::Options options;
  Batcher batcher(options, nullptr);
  auto model = MakeModel(b);
  auto out = batcher.Run(model, Input(0), absl::InfiniteFuture());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInternal);
  b->forward_error = absl::OkStatus();
  EXPECT_TRUE(batcher.Run(model, Input(0), absl::InfiniteFuture()).ok());
}

TEST(BatcherTest, WrongInputSizeIsAnErrorNotACrash) {
  auto b = std::make_shared<FakeBehaviour>();
  Batcher batcher(Batcher::Options{}, nullptr);
  auto out = batcher.Run(MakeModel(b), std::vector<float>(5, 0.f),
                         absl::InfiniteFuture());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(b->images.load(), 0);
}

}  // namespace
}  // namespace kennel::inference
