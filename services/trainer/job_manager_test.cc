#include "services/trainer/job_manager.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>

#include "absl/synchronization/notification.h"

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;
using kennel::v1::Job;
using kennel::v1::JobEvent;
using ::testing::HasSubstr;

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kennel-jobs-test-XXXXXX";
    dir_ = mkdtemp(tmpl);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<JobManager> Make(int concurrent = 1) {
    JobManagerOptions options;
    options.jobs_dir = dir_;
    options.max_concurrent_jobs = concurrent;
    auto manager = JobManager::Create(options);
    EXPECT_TRUE(manager.ok()) << manager.status();
    return std::move(manager).value();
  }

  static Job TrainJob() {
    Job job;
    job.set_kind(kennel::v1::JOB_KIND_TRAIN);
    job.mutable_train()->mutable_hyperparameters()->set_epochs(3);
    return job;
  }

  static std::vector<JobEvent> WatchAll(JobManager& manager,
                                        const std::string& id,
                                        int64_t after = 0) {
    std::vector<JobEvent> events;
    absl::Status s = manager.Watch(
        id, after,
        [&](const JobEvent& e) {
          events.push_back(e);
          return true;
        },
        nullptr);
    EXPECT_TRUE(s.ok()) << s;
    return events;
  }

  std::string dir_;
};

JobFn Epochs(int n) {
  return [n](JobContext& ctx) -> absl::StatusOr<kennel::v1::JobCompleted> {
    for (int i = 1; i <= n; ++i) {
      if (ctx.cancelled()) return absl::CancelledError("cancelled by a client");
      JobEvent event;
      event.mutable_epoch()->set_epoch(i);
      ctx.Emit(event);
    }
    kennel::v1::JobCompleted done;
    done.set_model_ref("pets:1");
    done.mutable_metrics()->set_test_accuracy(0.9);
    return done;
  };
}

TEST_F(JobManagerTest, RunsJobAndWatchReplaysEverything) {
  auto manager = Make();
  auto id = manager->Submit(TrainJob(), Epochs(3));
  ASSERT_TRUE(id.ok());
  std::vector<JobEvent> events = WatchAll(*manager, *id);
  ASSERT_EQ(events.size(), 5u);
  EXPECT_EQ(events[0].log(), "job " + *id + " accepted");
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].sequence(), int64_t(i + 1));
    EXPECT_EQ(events[i].job_id(), *id);
  }
  EXPECT_TRUE(events.back().has_completed());
  auto job = manager->Get(*id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->state(), kennel::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job->model_ref(), "pets:1");
  EXPECT_EQ(job->event_count(), 5);
  EXPECT_DOUBLE_EQ(job->metrics().metrics().test_accuracy(), 0.9);

  // Re-attaching after sequence 3 replays only what followed.
  std::vector<JobEvent> rest = WatchAll(*manager, *id, 3);
  ASSERT_EQ(rest.size(), 2u);
  EXPECT_EQ(rest[0].sequence(), 4);
}

TEST_F(JobManagerTest, FailureIsRecordedWithCodeAndMessage) {
  auto manager = Make();
  auto id = manager->Submit(
      TrainJob(), [](JobContext&) -> absl::StatusOr<kennel::v1::JobCompleted> {
        return absl::FailedPreconditionError("too many bad images");
      });
  ASSERT_TRUE(id.ok());
  std::vector<JobEvent> events = WatchAll(*manager, *id);
  ASSERT_FALSE(events.empty());
  ASSERT_TRUE(events.back().has_failed());
  EXPECT_EQ(events.back().failed().code(),
            int(absl::StatusCode::kFailedPrecondition));
  auto job = manager->Get(*id);
  EXPECT_EQ(job->state(), kennel::v1::JOB_STATE_FAILED);
  EXPECT_EQ(job->message(), "too many bad images");
}

TEST_F(JobManagerTest, CancelStopsAtStepBoundary) {
  auto manager = Make();
  absl::Notification started;
  std::atomic<int> steps{0};
  auto id = manager->Submit(
      TrainJob(),
      [&](JobContext& ctx) -> absl::StatusOr<kennel::v1::JobCompleted> {
        started.Notify();
        while (!ctx.cancelled()) {
          ++steps;
          absl::SleepFor(absl::Milliseconds(5));
        }
        return absl::CancelledError("cancelled by a client");
      });
  ASSERT_TRUE(id.ok());
  started.WaitForNotification();
  auto job = manager->Cancel(*id);
  ASSERT_TRUE(job.ok());
  std::vector<JobEvent> events = WatchAll(*manager, *id);
  ASSERT_TRUE(events.back().has_cancelled());
  EXPECT_EQ(manager->Get(*id)->state(), kennel::v1::JOB_STATE_CANCELLED);
  EXPECT_GT(steps.load(), 0);
}

TEST_F(JobManagerTest, JobsBeyondTheLimitQueue) {
  auto manager = Make(1);
  absl::Notification release;
  auto first = manager->Submit(
      TrainJob(), [&](JobContext&) -> absl::StatusOr<kennel::v1::JobCompleted> {
        release.WaitForNotification();
        return kennel::v1::JobCompleted();
      });
  auto second = manager->Submit(TrainJob(), Epochs(1));
  auto third = manager->Submit(TrainJob(), Epochs(1));
  ASSERT_TRUE(first.ok() && second.ok() && third.ok());
  // The second waits while the first runs.
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(manager->Get(*second)->state(), kennel::v1::JOB_STATE_QUEUED);
  release.Notify();
  WatchAll(*manager, *third);
  EXPECT_EQ(manager->Get(*second)->state(), kennel::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(manager->Get(*third)->state(), kennel::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(manager->Get(*first)->state(), kennel::v1::JOB_STATE_SUCCEEDED);
}

TEST_F(JobManagerTest, CancelQueuedJob) {
  auto manager = Make(1);
  absl::Notification release;
  auto first = manager->Submit(
      TrainJob(), [&](JobContext&) -> absl::StatusOr<kennel::v1::JobCompleted> {
        release.WaitForNotification();
        return kennel::v1::JobCompleted();
      });
  auto second = manager->Submit(TrainJob(), Epochs(1));
  ASSERT_TRUE(first.ok() && second.ok());
  auto cancelled = manager->Cancel(*second);
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->state(), kennel::v1::JOB_STATE_CANCELLED);
  std::vector<JobEvent> events = WatchAll(*manager, *second);
  ASSERT_FALSE(events.empty());
  EXPECT_THAT(events.front().log(), HasSubstr("queued behind 1 job"));
  EXPECT_TRUE(events.back().has_cancelled());
  release.Notify();
}

TEST_F(JobManagerTest, HistorySurvivesRestartAndRunningJobBecomesFailed) {
  std::string done_id, running_id;
  {
    auto manager = Make();
    auto done = manager->Submit(TrainJob(), Epochs(2));
    ASSERT_TRUE(done.ok());
    WatchAll(*manager, *done);
    done_id = *done;
  }
  // Simulate a crash during a job: the record says RUNNING and the process
  // never wrote an end.
  {
    auto manager = Make();
    absl::Notification started;
    absl::Notification release;
    auto running = manager->Submit(
        TrainJob(),
        [&](JobContext& ctx) -> absl::StatusOr<kennel::v1::JobCompleted> {
          JobEvent e;
          e.mutable_epoch()->set_epoch(1);
          ctx.Emit(e);
          started.Notify();
          release.WaitForNotification();
          return kennel::v1::JobCompleted();
        });
    ASSERT_TRUE(running.ok());
    running_id = *running;
    started.WaitForNotification();
    // Copy the on-disk state as it is mid-run, as a crash would leave it.
    fs::copy(dir_ + "/" + running_id, dir_ + "/crash-copy",
             fs::copy_options::recursive);
    release.Notify();
  }
  fs::remove_all(dir_ + "/" + running_id);
  fs::rename(dir_ + "/crash-copy", dir_ + "/" + running_id);

  auto manager = Make();
  auto jobs = manager->List(10);
  ASSERT_EQ(jobs.size(), 2u);
  auto done = manager->Get(done_id);
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->state(), kennel::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(done->model_ref(), "pets:1");
  EXPECT_EQ(WatchAll(*manager, done_id).size(), 4u);

  auto crashed = manager->Get(running_id);
  ASSERT_TRUE(crashed.ok());
  EXPECT_EQ(crashed->state(), kennel::v1::JOB_STATE_FAILED);
  EXPECT_THAT(crashed->message(),
              HasSubstr("stopped while this job was running"));
  std::vector<JobEvent> events = WatchAll(*manager, running_id);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_TRUE(events[1].has_epoch());
  EXPECT_TRUE(events[2].has_failed());
  EXPECT_EQ(events[2].sequence(), 3);
}

TEST_F(JobManagerTest, UnknownJobIsNotFound) {
  auto manager = Make();
  EXPECT_EQ(manager->Get("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(manager->Cancel("nope").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(manager
                ->Watch(
                    "nope", 0, [](const JobEvent&) { return true; }, nullptr)
                .code(),
            absl::StatusCode::kNotFound);
}

TEST_F(JobManagerTest, ShutdownFailsRunningJobWithClearMessage) {
  auto manager = Make();
  absl::Notification started;
  auto id = manager->Submit(
      TrainJob(),
      [&](JobContext& ctx) -> absl::StatusOr<kennel::v1::JobCompleted> {
        started.Notify();
        while (!ctx.cancelled()) absl::SleepFor(absl::Milliseconds(5));
        return absl::CancelledError("stopped");
      });
  ASSERT_TRUE(id.ok());
  started.WaitForNotification();
  manager->Shutdown();
  auto job = manager->Get(*id);
  EXPECT_EQ(job->state(), kennel::v1::JOB_STATE_FAILED);
  EXPECT_THAT(job->message(), HasSubstr("shut down while the job was running"));
}

}  // namespace
}  // namespace kennel::trainer
