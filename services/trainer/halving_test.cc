#include "services/trainer/halving.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace kennel::trainer {
namespace {

using ::testing::HasSubstr;

TrialObservation Peer(int index, std::vector<double> costs,
                      bool failed = false) {
  TrialObservation o;
  o.index = index;
  o.costs = std::move(costs);
  o.failed = failed;
  return o;
}

TEST(SuccessiveHalvingTest, RungsArePowersOfEtaBelowTheLastEpoch) {
  SuccessiveHalving h(3);
  EXPECT_EQ(h.Rungs(5), (std::vector<int>{1, 3}));
  EXPECT_EQ(h.Rungs(27), (std::vector<int>{1, 3, 9}));
  EXPECT_EQ(h.Rungs(1), (std::vector<int>{}));
  EXPECT_EQ(SuccessiveHalving(2).Rungs(9), (std::vector<int>{1, 2, 4, 8}));
  EXPECT_TRUE(h.IsRung(1, 5));
  EXPECT_TRUE(h.IsRung(3, 5));
  EXPECT_FALSE(h.IsRung(2, 5));
  EXPECT_FALSE(h.IsRung(5, 5));  // the last epoch is never a rung
  EXPECT_FALSE(h.IsRung(9, 9));
}

TEST(SuccessiveHalvingTest, KeepsTheBestThirdAtARung) {
  SuccessiveHalving h(3);
  // Five peers reached epoch 1 with costs 0.5 .. 0.9.
  std::vector<TrialObservation> peers;
  for (int i = 0; i < 5; ++i) peers.push_back(Peer(i, {0.5 + 0.1 * i, 0.4}));
  // 6 trials at the rung, so the best 2 continue.
  HalvingDecision best = h.Decide(1, 5, 0.45, peers, "valid_loss");
  EXPECT_FALSE(best.stop);
  EXPECT_EQ(best.rank, 1);
  EXPECT_EQ(best.of, 6);
  EXPECT_EQ(best.keep, 2);
  HalvingDecision second = h.Decide(1, 5, 0.55, peers, "valid_loss");
  EXPECT_FALSE(second.stop);
  EXPECT_EQ(second.rank, 2);
  HalvingDecision third = h.Decide(1, 5, 0.65, peers, "valid_loss");
  EXPECT_TRUE(third.stop);
  EXPECT_EQ(third.rank, 3);
  EXPECT_THAT(third.reason,
              HasSubstr("valid_loss 0.65 after epoch 1 ranks 3 of 6"));
  EXPECT_THAT(third.reason, HasSubstr("the best 2 continue (eta 3)"));
}

TEST(SuccessiveHalvingTest, TiesFavourTheTrialBeingDecided) {
  SuccessiveHalving h(2);
  std::vector<TrialObservation> peers = {Peer(0, {0.5, 0.4})};
  EXPECT_FALSE(h.Decide(1, 4, 0.5, peers, "valid_loss").stop);
  EXPECT_TRUE(h.Decide(1, 4, 0.5000001, peers, "valid_loss").stop);
}

TEST(SuccessiveHalvingTest, OnlyPeersThatReachedTheRungCount) {
  SuccessiveHalving h(3);
  // Peers stopped after epoch 1 have no value at epoch 3; a failed peer never
  // counts.
  std::vector<TrialObservation> peers = {
      Peer(0, {0.9}), Peer(1, {0.8}), Peer(2, {0.5, 0.4, 0.3, 0.2, 0.1}),
      Peer(3, {0.6, 0.5, 0.35, 0.3, 0.25}), Peer(4, {0.1, 0.1, 0.01}, true)};
  HalvingDecision d = h.Decide(3, 5, 0.32, peers, "valid_loss");
  EXPECT_EQ(d.of, 3);
  EXPECT_EQ(d.rank, 2);
  EXPECT_TRUE(d.stop);
}

TEST(SuccessiveHalvingTest, ContinuesWithTooFewPeersAndBetweenRungs) {
  SuccessiveHalving h(3);
  std::vector<TrialObservation> one = {Peer(0, {0.1, 0.1, 0.1})};
  HalvingDecision d = h.Decide(1, 5, 5.0, one, "valid_loss");
  EXPECT_FALSE(d.stop);
  EXPECT_THAT(d.reason, HasSubstr("only 1 earlier trials"));
  std::vector<TrialObservation> many(6, Peer(0, {0.1, 0.1, 0.1, 0.1}));
  HalvingDecision between = h.Decide(2, 5, 5.0, many, "valid_loss");
  EXPECT_FALSE(between.stop);
  EXPECT_TRUE(between.reason.empty());
  EXPECT_FALSE(h.Decide(5, 5, 5.0, many, "valid_loss").stop);
}

TEST(SuccessiveHalvingTest, AccuracyCostsReadAsAccuracies) {
  SuccessiveHalving h(3);
  std::vector<TrialObservation> peers = {Peer(0, {-0.9}), Peer(1, {-0.8})};
  HalvingDecision d = h.Decide(1, 5, -0.7, peers, "valid_accuracy");
  EXPECT_TRUE(d.stop);
  EXPECT_THAT(d.reason,
              HasSubstr("valid_accuracy 0.7 after epoch 1 ranks 3 of 3"));
}

}  // namespace
}  // namespace kennel::trainer
