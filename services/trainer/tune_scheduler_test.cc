#include "services/trainer/tune_scheduler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace kennel::trainer {
namespace {

using ::testing::HasSubstr;

kennel::v1::TuneRequest Request(kennel::v1::SearchStrategy strategy,
                                bool early_stopping, int trials = 16,
                                int parallel = 4) {
  kennel::v1::TuneRequest request;
  auto* lr = request.add_space();
  lr->set_name("learning_rate");
  lr->mutable_continuous()->set_min(0.001);
  lr->mutable_continuous()->set_max(0.1);
  lr->mutable_continuous()->set_scale(kennel::v1::SCALE_LOG);
  auto* wd = request.add_space();
  wd->set_name("weight_decay");
  wd->mutable_continuous()->set_min(0);
  wd->mutable_continuous()->set_max(1e-5);
  auto* bs = request.add_space();
  bs->set_name("batch_size");
  for (double v : {64, 128, 256}) bs->mutable_categorical()->add_values(v);
  request.mutable_base()->set_epochs(5);
  request.set_max_trials(trials);
  request.set_max_parallel_trials(parallel);
  request.set_strategy(strategy);
  request.set_seed(2024);
  request.set_early_stopping(early_stopping);
  return request;
}

TuneOptions Options(const kennel::v1::TuneRequest& request) {
  auto options = TuneOptionsFromRequest(request);
  EXPECT_TRUE(options.ok()) << options.status();
  return *options;
}

// Validation loss of a trial after `epoch`: a function of its
// hyperparameters only, as a deterministic trainer's would be.
double Loss(const kennel::v1::Hyperparameters& hp, int epoch) {
  const double a = std::log10(hp.learning_rate()) + 2.0;
  return a * a + hp.weight_decay() * 2e4 + (hp.batch_size() == 128 ? 0 : 0.1) +
         0.5 / epoch;
}

// Trains nothing: sleeps a random while per epoch (the jitter seed decides)
// and reports Loss().
class FakeRunner : public TrialRunner {
 public:
  explicit FakeRunner(uint64_t jitter_seed) : jitter_seed_(jitter_seed) {}

  std::function<bool(const kennel::v1::Hyperparameters&)> fail_if;
  std::function<bool(const kennel::v1::Hyperparameters&)> diverge_if;
  std::function<bool()> cancelled;
  int max_sleep_ms = 4;
  // Ends every trial after this epoch, as a STOP rule would (0: never).
  int stop_after_epoch = 0;

  absl::StatusOr<TrialOutcome> RunTrial(int trial,
                                        const kennel::v1::Hyperparameters& hp,
                                        const EpochFn& on_epoch) override {
    const int now = ++running_;
    int seen = max_running_.load();
    while (now > seen && !max_running_.compare_exchange_weak(seen, now)) {
    }
    Rng jitter = Rng::For(jitter_seed_, 99, trial);
    double loss = 0;
    int epoch = 1;
    for (; epoch <= hp.epochs(); ++epoch) {
      std::this_thread::sleep_for(
          std::chrono::milliseconds(jitter.Below(max_sleep_ms + 1)));
      if (cancelled && cancelled()) break;
      if (fail_if && fail_if(hp) && epoch == 2) break;
      loss = diverge_if && diverge_if(hp) ? NAN : Loss(hp, epoch);
      kennel::v1::EpochEnd e;
      e.set_epoch(epoch);
      e.set_epochs(hp.epochs());
      e.set_train_loss(loss * 0.9);
      e.set_valid_loss(loss);
      e.set_valid_accuracy(1 / (1 + loss));
      if (!on_epoch(e)) break;
      if (stop_after_epoch > 0 && epoch == stop_after_epoch) {
        ++epoch;
        break;
      }
    }
    --running_;
    if (cancelled && cancelled() && epoch <= hp.epochs()) {
      return absl::CancelledError("cancelled");
    }
    if (fail_if && fail_if(hp)) return absl::InternalError("out of memory");
    TrialOutcome outcome;
    outcome.metrics.set_test_loss(loss);
    outcome.metrics.set_test_accuracy(1 / (1 + loss));
    if (stop_after_epoch > 0 && epoch > stop_after_epoch) {
      outcome.stop_reason = "stopped by rule loss_not_decreasing";
    }
    return outcome;
  }

  void Discard(int trial) override {
    absl::MutexLock lock(&mu_);
    discarded_.insert(trial);
  }

  int max_running() const { return max_running_; }
  std::set<int> discarded() const {
    absl::MutexLock lock(&mu_);
    return discarded_;
  }

 private:
  const uint64_t jitter_seed_;
  std::atomic<int> running_{0};
  std::atomic<int> max_running_{0};
  mutable absl::Mutex mu_;
  std::set<int> discarded_ ABSL_GUARDED_BY(mu_);
};

struct Recorded {
  std::vector<kennel::v1::JobEvent> events;
  TuneResult result;

  // Per trial: its hyperparameters and how it ended, the "trial sequence"
  // that must not depend on timing.
  std::map<int, std::string> Sequence() const {
    std::map<int, std::string> out;
    for (const auto& e : events) {
      if (e.has_trial_started()) {
        out[e.trial()] +=
            e.trial_started().hyperparameters().ShortDebugString();
      }
      if (e.has_trial_finished()) {
        const auto& f = e.trial_finished();
        out[e.trial()] += absl::StrCat(" | epochs ", f.epochs_run(),
                                       " stopped ", f.stopped_early(),
                                       " failed ", f.failed(), " ", f.reason());
      }
    }
    return out;
  }
  int Count(kennel::v1::JobEvent::EventCase c) const {
    int n = 0;
    for (const auto& e : events) n += e.event_case() == c;
    return n;
  }
};

Recorded RunSearch(const kennel::v1::TuneRequest& request, FakeRunner& runner,
                   std::function<bool()> cancelled = nullptr, int workers = 0) {
  Recorded recorded;
  absl::Mutex mu;
  TuneScheduler scheduler(Options(request), [&](kennel::v1::JobEvent e) {
    absl::MutexLock lock(&mu);
    recorded.events.push_back(std::move(e));
  });
  if (workers > 0) scheduler.SetWorkers(workers);
  recorded.result = scheduler.Run(
      &runner, cancelled ? cancelled : [] { return false; });
  return recorded;
}

class DeterminismTest : public ::testing::TestWithParam<
                            std::tuple<kennel::v1::SearchStrategy, bool>> {};

TEST_P(DeterminismTest, SameSeedSameTrialsWhateverTheTiming) {
  const auto [strategy, early_stopping] = GetParam();
  const kennel::v1::TuneRequest request = Request(strategy, early_stopping);
  FakeRunner first(1), second(2), third(3);
  third.max_sleep_ms = 9;
  Recorded a = RunSearch(request, first);
  Recorded b = RunSearch(request, second);
  // Fewer trials at once (a smaller thread budget) changes nothing either.
  Recorded c = RunSearch(request, third, nullptr, /*workers=*/2);
  ASSERT_FALSE(a.Sequence().empty());
  EXPECT_EQ(a.Sequence(), b.Sequence());
  EXPECT_EQ(a.Sequence(), c.Sequence());
  EXPECT_EQ(a.result.best_trial, b.result.best_trial);
  EXPECT_EQ(a.result.best_trial, c.result.best_trial);
  EXPECT_GT(a.result.best_trial, 0);
  // A different seed is a different search.
  kennel::v1::TuneRequest other = request;
  other.set_seed(7);
  FakeRunner fourth(1);
  EXPECT_NE(RunSearch(other, fourth).Sequence(), a.Sequence());
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, DeterminismTest,
    ::testing::Combine(::testing::Values(kennel::v1::SEARCH_STRATEGY_RANDOM,
                                         kennel::v1::SEARCH_STRATEGY_GRID,
                                         kennel::v1::SEARCH_STRATEGY_TPE),
                       ::testing::Bool()));

TEST(TuneSchedulerTest, RunsUpToMaxParallelTrialsAtOnce) {
  FakeRunner runner(5);
  runner.max_sleep_ms = 6;
  Recorded r = RunSearch(
      Request(kennel::v1::SEARCH_STRATEGY_RANDOM, false, 12, 3), runner);
  EXPECT_EQ(runner.max_running(), 3);
  EXPECT_EQ(r.result.trials_run, 12);
  EXPECT_EQ(r.result.finished, 12);
  FakeRunner serial(5);
  RunSearch(Request(kennel::v1::SEARCH_STRATEGY_TPE, true, 6, 1), serial);
  EXPECT_EQ(serial.max_running(), 1);
}

TEST(TuneSchedulerTest, SuccessiveHalvingStopsPoorTrialsAndSaysWhy) {
  FakeRunner runner(1);
  Recorded r = RunSearch(
      Request(kennel::v1::SEARCH_STRATEGY_RANDOM, true, 16, 2), runner);
  EXPECT_GT(r.result.stopped, 0);
  EXPECT_EQ(r.result.stopped + r.result.finished, 16);
  int epochs = 0;
  for (const auto& e : r.events) {
    if (!e.has_trial_finished()) continue;
    const auto& f = e.trial_finished();
    epochs += f.epochs_run();
    if (f.stopped_early()) {
      EXPECT_THAT(f.reason(), HasSubstr("stopped by successive halving"));
      EXPECT_THAT(f.reason(), HasSubstr("valid_loss"));
      EXPECT_TRUE(f.epochs_run() == 1 || f.epochs_run() == 3) << f.epochs_run();
    }
  }
  EXPECT_LT(epochs, 16 * 5);
  EXPECT_EQ(epochs, r.Count(kennel::v1::JobEvent::kEpoch));
  // The winner ran all its epochs and is the best of those that did.
  const auto& best = r.result.leaderboard.entries(0);
  EXPECT_EQ(best.trial(), r.result.best_trial);
  EXPECT_EQ(best.state(), "finished");
  EXPECT_EQ(best.epochs_run(), 5);
}

TEST(TuneSchedulerTest, WithoutEarlyStoppingEveryTrialRunsAllEpochs) {
  FakeRunner runner(1);
  Recorded r = RunSearch(
      Request(kennel::v1::SEARCH_STRATEGY_RANDOM, false, 8, 4), runner);
  EXPECT_EQ(r.result.finished, 8);
  EXPECT_EQ(r.Count(kennel::v1::JobEvent::kEpoch), 8 * 5);
}

TEST(TuneSchedulerTest, DivergedTrialsStopAtOnce) {
  FakeRunner runner(1);
  runner.diverge_if = [](const kennel::v1::Hyperparameters& hp) {
    return hp.learning_rate() > 0.02;
  };
  Recorded r = RunSearch(
      Request(kennel::v1::SEARCH_STRATEGY_RANDOM, false, 12, 4), runner);
  int diverged = 0;
  for (const auto& e : r.events) {
    if (!e.has_trial_finished()) continue;
    const auto& f = e.trial_finished();
    if (f.hyperparameters().learning_rate() > 0.02) {
      ++diverged;
      EXPECT_TRUE(f.stopped_early());
      EXPECT_EQ(f.epochs_run(), 1);
      EXPECT_THAT(f.reason(), HasSubstr("diverged"));
    }
  }
  EXPECT_GT(diverged, 0);
  ASSERT_GT(r.result.best_trial, 0);
  EXPECT_LE(r.result.best_hyperparameters.learning_rate(), 0.02);
}

TEST(TuneSchedulerTest, AFailedTrialFailsOnlyItself) {
  FakeRunner runner(1);
  runner.fail_if = [](const kennel::v1::Hyperparameters& hp) {
    return hp.batch_size() == 256;
  };
  Recorded r =
      RunSearch(Request(kennel::v1::SEARCH_STRATEGY_TPE, true, 12, 3), runner);
  EXPECT_GT(r.result.failed, 0);
  EXPECT_GT(r.result.finished, 0);
  EXPECT_EQ(r.result.trials_run, 12);
  for (const auto& e : r.events) {
    if (e.has_trial_finished() && e.trial_finished().failed()) {
      EXPECT_EQ(e.trial_finished().reason(), "out of memory");
    }
  }
  EXPECT_NE(r.result.best_hyperparameters.batch_size(), 256);
}

TEST(TuneSchedulerTest, CancelKeepsTheBestFinishedTrialAndStartsNoMore) {
  FakeRunner runner(1);
  std::atomic<bool> cancelled{false};
  std::atomic<int> finished{0};
  runner.cancelled = [&] { return cancelled.load(); };
  Recorded recorded;
  absl::Mutex mu;
  TuneScheduler scheduler(
      Options(Request(kennel::v1::SEARCH_STRATEGY_RANDOM, false, 16, 2)),
      [&](kennel::v1::JobEvent e) {
        if (e.has_trial_finished() && ++finished == 5) cancelled = true;
        absl::MutexLock lock(&mu);
        recorded.events.push_back(std::move(e));
      });
  recorded.result = scheduler.Run(&runner, [&] { return cancelled.load(); });
  const TuneResult& result = recorded.result;
  EXPECT_TRUE(result.cancelled);
  EXPECT_LT(result.trials_run, 16);
  EXPECT_LE(result.trials_run, 5 + 2);
  EXPECT_GE(result.finished, 5);
  ASSERT_GT(result.best_trial, 0);
  bool best_is_finished = false;
  for (const auto& entry : result.leaderboard.entries()) {
    if (entry.trial() == result.best_trial)
      best_is_finished = entry.state() == "finished";
    EXPECT_NE(entry.state(), "running");
  }
  EXPECT_TRUE(best_is_finished);
}

TEST(TuneSchedulerTest, EventsComeInOrderForEachTrial) {
  FakeRunner runner(3);
  Recorded r =
      RunSearch(Request(kennel::v1::SEARCH_STRATEGY_TPE, true, 10, 3), runner);
  ASSERT_FALSE(r.events.empty());
  EXPECT_THAT(r.events[0].log(), HasSubstr("tree-structured Parzen estimator"));
  EXPECT_THAT(r.events[0].log(), HasSubstr("3 at a time"));
  std::map<int, int> phase;  // 1 started, 2 in epochs, 3 finished
  std::map<int, int> last_epoch;
  for (const auto& e : r.events) {
    const int t = e.trial();
    if (e.has_trial_started()) {
      EXPECT_EQ(phase[t], 0) << t;
      phase[t] = 1;
    } else if (e.has_epoch()) {
      EXPECT_GE(phase[t], 1) << t;
      EXPECT_LT(phase[t], 3) << t;
      EXPECT_EQ(e.epoch().epoch(), last_epoch[t] + 1);
      last_epoch[t] = e.epoch().epoch();
      phase[t] = 2;
    } else if (e.has_trial_finished()) {
      EXPECT_EQ(phase[t], 2) << t;
      EXPECT_EQ(e.trial_finished().epochs_run(), last_epoch[t]);
      phase[t] = 3;
    } else if (e.has_leaderboard()) {
      EXPECT_EQ(t, 0);
      EXPECT_GT(e.leaderboard().entries_size(), 0);
    }
  }
  EXPECT_EQ(phase.size(), 10u);
  for (const auto& [t, p] : phase) EXPECT_EQ(p, 3) << t;
  EXPECT_EQ(r.Count(kennel::v1::JobEvent::kLeaderboard), 10);
}

TEST(TuneSchedulerTest, KeepsOnlyTheBestTrialsModel) {
  FakeRunner runner(4);
  Recorded r = RunSearch(
      Request(kennel::v1::SEARCH_STRATEGY_RANDOM, true, 12, 4), runner);
  std::set<int> kept;
  for (int t = 1; t <= 12; ++t) {
    if (runner.discarded().count(t) == 0) kept.insert(t);
  }
  EXPECT_EQ(kept, std::set<int>{r.result.best_trial});
}

TEST(TuneSchedulerTest, WorkersLimitTrialsAtOnce) {
  FakeRunner runner(5);
  runner.max_sleep_ms = 6;
  Recorded r;
  absl::Mutex mu;
  TuneScheduler scheduler(
      Options(Request(kennel::v1::SEARCH_STRATEGY_RANDOM, false, 8, 4)),
      [&](kennel::v1::JobEvent e) {
        absl::MutexLock lock(&mu);
        r.events.push_back(std::move(e));
      });
  scheduler.SetWorkers(2);
  EXPECT_THAT(
      scheduler.Describe(),
      HasSubstr("4 at a time (2 training at once within the thread budget)"));
  r.result = scheduler.Run(&runner, [] { return false; });
  EXPECT_EQ(runner.max_running(), 2);
  EXPECT_EQ(r.result.finished, 8);
}

TEST(TuneSchedulerTest, ARunnerStopIsAStopWithItsReason) {
  FakeRunner runner(5);
  runner.stop_after_epoch = 2;
  Recorded r = RunSearch(
      Request(kennel::v1::SEARCH_STRATEGY_RANDOM, false, 4, 2), runner);
  EXPECT_EQ(r.result.stopped, 4);
  for (const auto& e : r.events) {
    if (!e.has_trial_finished()) continue;
    EXPECT_TRUE(e.trial_finished().stopped_early());
    EXPECT_EQ(e.trial_finished().epochs_run(), 2);
    EXPECT_EQ(e.trial_finished().reason(),
              "stopped by rule loss_not_decreasing");
  }
  // With no trial run to its end, the best stopped one is kept.
  EXPECT_GT(r.result.best_trial, 0);
}

TEST(TuneSchedulerTest, GridRunsItsPointsOnly) {
  FakeRunner runner(4);
  Recorded r = RunSearch(
      Request(kennel::v1::SEARCH_STRATEGY_GRID, false, 16, 4), runner);
  EXPECT_EQ(r.result.trials_run, 12);
  EXPECT_THAT(r.events[0].log(), HasSubstr("grid of 12 points"));
}

}  // namespace
}  // namespace kennel::trainer
