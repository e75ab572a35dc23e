#include "services/trainer/leaderboard.h"

#include <gtest/gtest.h>

#include <cmath>

namespace kennel::trainer {
namespace {

kennel::v1::EpochEnd Epoch(int epoch, int epochs, double valid_loss,
                           double valid_accuracy = 0.5) {
  kennel::v1::EpochEnd e;
  e.set_epoch(epoch);
  e.set_epochs(epochs);
  e.set_train_loss(valid_loss * 0.9);
  e.set_valid_loss(valid_loss);
  e.set_valid_accuracy(valid_accuracy);
  return e;
}

kennel::v1::Hyperparameters Lr(double lr) {
  kennel::v1::Hyperparameters hp;
  hp.set_learning_rate(lr);
  hp.set_epochs(3);
  return hp;
}

// Trial `trial` runs `losses` (one per epoch) and ends in `state`.
void RunTrial(Leaderboard& board, int trial, std::vector<double> losses,
              TrialState state) {
  board.Started(trial, Lr(0.01 * trial), {0.01 * trial});
  for (size_t i = 0; i < losses.size(); ++i) {
    board.Epoch(trial, Epoch(i + 1, 3, losses[i]));
  }
  if (state != TrialState::kRunning) board.Ended(trial, state, "", {}, 1.0);
}

TEST(LeaderboardTest, RanksFinishedThenRunningThenStoppedThenFailed) {
  Leaderboard board(kennel::v1::OBJECTIVE_VALID_LOSS);
  RunTrial(board, 1, {0.9, 0.8, 0.7}, TrialState::kFinished);
  RunTrial(board, 2, {0.5}, TrialState::kStopped);
  RunTrial(board, 3, {0.6, 0.55, 0.5}, TrialState::kFinished);
  RunTrial(board, 4, {0.4, 0.3}, TrialState::kRunning);
  RunTrial(board, 5, {}, TrialState::kFailed);
  RunTrial(board, 6, {0.9, 0.85}, TrialState::kStopped);
  RunTrial(board, 7, {0.2}, TrialState::kCancelled);
  EXPECT_EQ(board.Ranking(), (std::vector<int>{3, 1, 4, 6, 2, 7, 5}));
  EXPECT_EQ(board.Best(), 3);
  kennel::v1::Leaderboard proto = board.ToProto(3);
  ASSERT_EQ(proto.entries_size(), 3);
  EXPECT_EQ(proto.entries(0).trial(), 3);
  EXPECT_EQ(proto.entries(0).state(), "finished");
  EXPECT_DOUBLE_EQ(proto.entries(0).objective(), 0.5);
  EXPECT_EQ(proto.entries(0).epochs_run(), 3);
  EXPECT_DOUBLE_EQ(proto.entries(0).hyperparameters().learning_rate(), 0.03);
  EXPECT_EQ(proto.entries(2).state(), "running");
  EXPECT_EQ(board.ToProto().entries_size(), 7);
}

TEST(LeaderboardTest, BestFallsBackToStoppedTrialsAndSkipsDiverged) {
  Leaderboard board(kennel::v1::OBJECTIVE_VALID_LOSS);
  EXPECT_FALSE(board.Best().has_value());
  RunTrial(board, 1, {NAN}, TrialState::kStopped);
  EXPECT_FALSE(board.Best().has_value());
  RunTrial(board, 2, {0.7}, TrialState::kStopped);
  RunTrial(board, 3, {0.6}, TrialState::kStopped);
  EXPECT_EQ(board.Best(), 3);
  RunTrial(board, 4, {NAN, NAN, NAN}, TrialState::kFinished);
  EXPECT_EQ(board.Best(), 3);
  RunTrial(board, 5, {0.9, 0.9, 0.95}, TrialState::kFinished);
  EXPECT_EQ(board.Best(), 5);
}

TEST(LeaderboardTest, AccuracyObjectiveRanksHighestFirst) {
  Leaderboard board(kennel::v1::OBJECTIVE_VALID_ACCURACY);
  board.Started(1, Lr(0.1), {0.1});
  board.Epoch(1, Epoch(1, 1, 0.3, 0.80));
  board.Ended(1, TrialState::kFinished, "", {}, 1);
  board.Started(2, Lr(0.2), {0.2});
  board.Epoch(2, Epoch(1, 1, 0.4, 0.85));
  board.Ended(2, TrialState::kFinished, "", {}, 1);
  EXPECT_EQ(board.Best(), 2);
  EXPECT_DOUBLE_EQ(board.Entry(2).objective(), 0.85);
}

TEST(LeaderboardTest, ObservationCarriesCostsAndOutcome) {
  Leaderboard board(kennel::v1::OBJECTIVE_VALID_LOSS);
  RunTrial(board, 2, {0.5, 0.4}, TrialState::kStopped);
  RunTrial(board, 3, {0.5}, TrialState::kFailed);
  TrialObservation o = board.Observation(2);
  EXPECT_EQ(o.index, 1);
  EXPECT_EQ(o.costs, (std::vector<double>{0.5, 0.4}));
  EXPECT_TRUE(o.stopped_early);
  EXPECT_FALSE(o.failed);
  EXPECT_TRUE(board.Observation(3).failed);
  EXPECT_TRUE(board.Observation(9).failed);
}

TEST(LeaderboardTest, EndKeepsTestFigures) {
  Leaderboard board(kennel::v1::OBJECTIVE_VALID_LOSS);
  RunTrial(board, 1, {0.5}, TrialState::kRunning);
  kennel::v1::ModelMetrics test;
  test.set_test_loss(0.45);
  test.set_test_accuracy(0.88);
  board.Ended(1, TrialState::kFinished, "", test, 2.5);
  const TrialRecord* r = board.Get(1);
  EXPECT_DOUBLE_EQ(r->metrics.valid_loss(), 0.5);
  EXPECT_DOUBLE_EQ(r->metrics.test_accuracy(), 0.88);
  EXPECT_DOUBLE_EQ(r->seconds, 2.5);
}

}  // namespace
}  // namespace kennel::trainer
