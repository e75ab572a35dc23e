#include "services/trainer/search.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

namespace kennel::trainer {
namespace {

using ::testing::HasSubstr;

kennel::v1::TuneRequest OriginalSearch(kennel::v1::SearchStrategy strategy,
                                       uint64_t seed, int trials = 16) {
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
  request.set_max_trials(trials);
  request.set_strategy(strategy);
  request.set_seed(seed);
  return request;
}

TuneOptions Options(const kennel::v1::TuneRequest& request) {
  auto options = TuneOptionsFromRequest(request);
  EXPECT_TRUE(options.ok()) << options.status();
  return *options;
}

std::vector<Point> ProposeAll(Searcher& searcher) {
  std::vector<Point> points;
  for (int i = 0; i < searcher.NumTrials(); ++i) {
    points.push_back(searcher.Propose(i, {}));
  }
  return points;
}

TEST(RngTest, SameSeedSameStreamDifferentIndexDiffers) {
  Rng a = Rng::For(7, 1, 0), b = Rng::For(7, 1, 0), c = Rng::For(7, 1, 1);
  const uint64_t a0 = a.Next();
  EXPECT_EQ(a0, b.Next());
  EXPECT_NE(a0, c.Next());
  Rng u(3);
  double sum = 0;
  for (int i = 0; i < 10000; ++i) {
    const double x = u.Uniform();
    ASSERT_GE(x, 0);
    ASSERT_LT(x, 1);
    sum += x;
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.02);
  for (int i = 0; i < 1000; ++i) ASSERT_LT(u.Below(3), 3u);
}

TEST(RandomSearchTest, SameSeedGivesSameTrialsInAnyOrder) {
  auto a = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_RANDOM, 11)));
  auto b = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_RANDOM, 11)));
  auto c = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_RANDOM, 12)));
  std::vector<Point> forward = ProposeAll(*a);
  // Proposing in reverse order changes nothing.
  for (int i = b->NumTrials() - 1; i >= 0; --i) {
    EXPECT_EQ(b->Propose(i, {}), forward[i]) << i;
  }
  EXPECT_NE(ProposeAll(*c), forward);
  EXPECT_FALSE(a->UsesHistory());
}

TEST(RandomSearchTest, StaysInBoundsAndIsLogUniformOnALogScale) {
  auto searcher = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_RANDOM, 5, 1000)));
  int below_centre = 0;
  std::map<double, int> batch_sizes;
  for (int i = 0; i < 1000; ++i) {
    Point p = searcher->Propose(i, {});
    ASSERT_GE(p[0], 0.001);
    ASSERT_LE(p[0], 0.1);
    ASSERT_GE(p[1], 0);
    ASSERT_LE(p[1], 1e-5);
    below_centre += p[0] < 0.01;
    ++batch_sizes[p[2]];
  }
  // 0.01 is the geometric centre of [0.001, 0.1].
  EXPECT_NEAR(below_centre / 1000.0, 0.5, 0.06);
  ASSERT_EQ(batch_sizes.size(), 3u);
  for (const auto& [size, count] : batch_sizes)
    EXPECT_NEAR(count, 333, 60) << size;
}

TEST(GridSearchTest, OriginalSearchIsATwelvePointGrid) {
  auto searcher = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_GRID, 1)));
  ASSERT_EQ(searcher->NumTrials(), 12);
  EXPECT_THAT(searcher->Describe(), HasSubstr("grid of 12 points (2 x 2 x 3)"));
  std::vector<Point> points = ProposeAll(*searcher);
  std::set<Point> distinct(points.begin(), points.end());
  EXPECT_EQ(distinct.size(), 12u);
  std::map<double, int> lr, wd, bs;
  for (const Point& p : points) {
    ++lr[p[0]];
    ++wd[p[1]];
    ++bs[p[2]];
  }
  EXPECT_EQ(bs, (std::map<double, int>{{64, 4}, {128, 4}, {256, 4}}));
  ASSERT_EQ(lr.size(), 2u);
  // Cell centres of the log range: 10^-2.5 and 10^-1.5.
  EXPECT_NEAR(lr.begin()->first, std::pow(10, -2.5), 1e-9);
  EXPECT_NEAR(lr.rbegin()->first, std::pow(10, -1.5), 1e-9);
  EXPECT_NEAR(wd.begin()->first, 2.5e-6, 1e-15);
  EXPECT_NEAR(wd.rbegin()->first, 7.5e-6, 1e-15);
}

TEST(GridSearchTest, OneRangeUsesEveryTrial) {
  kennel::v1::TuneRequest request =
      OriginalSearch(kennel::v1::SEARCH_STRATEGY_GRID, 1);
  request.mutable_space()->DeleteSubrange(1, 2);
  auto searcher = MakeSearcher(Options(request));
  ASSERT_EQ(searcher->NumTrials(), 16);
  std::vector<Point> points = ProposeAll(*searcher);
  std::vector<double> lrs;
  for (const Point& p : points) lrs.push_back(p[0]);
  std::sort(lrs.begin(), lrs.end());
  // Evenly spaced on the log scale.
  for (size_t i = 1; i < lrs.size(); ++i) {
    EXPECT_NEAR(std::log10(lrs[i]) - std::log10(lrs[i - 1]), 2.0 / 16, 1e-9);
  }
}

TEST(GridSearchTest, LargeCategoricalProductIsCutToMaxTrials) {
  kennel::v1::TuneRequest request;
  for (const char* name : {"batch_size", "epochs", "learning_rate"}) {
    auto* r = request.add_space();
    r->set_name(name);
    for (double v : {1, 2, 3, 4}) r->mutable_categorical()->add_values(v);
  }
  request.set_max_trials(10);
  request.set_strategy(kennel::v1::SEARCH_STRATEGY_GRID);
  auto searcher = MakeSearcher(Options(request));
  ASSERT_EQ(searcher->NumTrials(), 10);
  std::vector<Point> points = ProposeAll(*searcher);
  EXPECT_EQ(std::set<Point>(points.begin(), points.end()).size(), 10u);
}

TEST(GridSearchTest, IntegerRangeLevelsNeverRepeat) {
  kennel::v1::TuneRequest request;
  auto* r = request.add_space();
  r->set_name("epochs");
  r->mutable_integer()->set_min(1);
  r->mutable_integer()->set_max(3);
  request.set_max_trials(10);
  request.set_strategy(kennel::v1::SEARCH_STRATEGY_GRID);
  auto searcher = MakeSearcher(Options(request));
  ASSERT_EQ(searcher->NumTrials(), 3);
  std::vector<Point> points = ProposeAll(*searcher);
  EXPECT_EQ(std::set<Point>(points.begin(), points.end()),
            (std::set<Point>{{1}, {2}, {3}}));
}

TEST(GridSearchTest, SeedShufflesTheOrderNotThePoints) {
  auto a = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_GRID, 1)));
  auto b = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_GRID, 2)));
  std::vector<Point> pa = ProposeAll(*a), pb = ProposeAll(*b);
  EXPECT_NE(pa, pb);
  EXPECT_EQ(std::set<Point>(pa.begin(), pa.end()),
            std::set<Point>(pb.begin(), pb.end()));
}

// A smooth synthetic objective over the original space: best near
// lr = 10^-2.2, wd = 3e-6, batch size 128.
double Synthetic(const Point& p) {
  const double a = std::log10(p[0]) + 2.2;
  const double b = p[1] / 1e-5 - 0.3;
  return a * a + 0.5 * b * b + (p[2] == 128 ? 0 : 0.15);
}

TrialObservation Observe(int index, const Point& p) {
  TrialObservation o;
  o.index = index;
  o.point = p;
  o.costs = {Synthetic(p)};
  return o;
}

// Best cost after `trials` sequential trials.
double BestAfter(kennel::v1::SearchStrategy strategy, uint64_t seed,
                 int trials) {
  auto searcher = MakeSearcher(Options(OriginalSearch(strategy, seed, trials)));
  std::vector<TrialObservation> history;
  double best = INFINITY;
  for (int i = 0; i < trials; ++i) {
    Point p = searcher->Propose(i, history);
    history.push_back(Observe(i, p));
    best = std::min(best, history.back().final_cost());
  }
  return best;
}

TEST(TpeSearchTest, StartsWithTheRandomTrialsOfTheSameSeed) {
  auto tpe =
      MakeSearcher(Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_TPE, 9)));
  auto random = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_RANDOM, 9)));
  EXPECT_TRUE(tpe->UsesHistory());
  EXPECT_THAT(tpe->Describe(), HasSubstr("5 random start-up trials"));
  std::vector<TrialObservation> history;
  for (int i = 0; i < 5; ++i) {
    Point p = tpe->Propose(i, history);
    EXPECT_EQ(p, random->Propose(i, {})) << i;
    history.push_back(Observe(i, p));
  }
  // With five results (16 trials / 3) the model takes over.
  EXPECT_NE(tpe->Propose(5, history), random->Propose(5, {}));
}

TEST(TpeSearchTest, SameHistoryAndSeedGiveTheSamePoint) {
  auto a =
      MakeSearcher(Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_TPE, 3)));
  auto b =
      MakeSearcher(Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_TPE, 3)));
  std::vector<TrialObservation> history;
  for (int i = 0; i < 10; ++i) {
    Point p = a->Propose(i, history);
    history.push_back(Observe(i, p));
  }
  EXPECT_EQ(a->Propose(10, history), b->Propose(10, history));
  // A different history (one result changed) moves the proposal.
  history[0].costs = {-100};
  EXPECT_NE(a->Propose(10, history),
            b->Propose(10, std::vector<TrialObservation>(history.begin() + 1,
                                                         history.end())));
}

TEST(TpeSearchTest, ProposalsStayInTheSpace) {
  auto searcher = MakeSearcher(
      Options(OriginalSearch(kennel::v1::SEARCH_STRATEGY_TPE, 4, 60)));
  std::vector<TrialObservation> history;
  for (int i = 0; i < 60; ++i) {
    Point p = searcher->Propose(i, history);
    ASSERT_GE(p[0], 0.001);
    ASSERT_LE(p[0], 0.1);
    ASSERT_GE(p[1], 0);
    ASSERT_LE(p[1], 1e-5);
    ASSERT_TRUE(p[2] == 64 || p[2] == 128 || p[2] == 256);
    history.push_back(Observe(i, p));
  }
}

// Mean over seeds of the best cost found; the same seeds for both
// strategies, so TPE's start-up trials are random search's first trials.
double MeanBest(kennel::v1::SearchStrategy strategy, int seeds, int trials) {
  double sum = 0;
  for (int seed = 1; seed <= seeds; ++seed)
    sum += BestAfter(strategy, seed, trials);
  return sum / seeds;
}

TEST(TpeSearchTest, BeatsRandomOnASmoothObjectiveOnAverage) {
  // Measured: TPE 0.0275, random 0.0437 (100 seeds, 30 trials).
  const double tpe = MeanBest(kennel::v1::SEARCH_STRATEGY_TPE, 100, 30);
  const double random = MeanBest(kennel::v1::SEARCH_STRATEGY_RANDOM, 100, 30);
  EXPECT_LT(tpe, random * 0.85) << "tpe " << tpe << " random " << random;
}

TEST(TpeSearchTest, FarBetterThanRandomOnContinuousRanges) {
  // Without the categorical batch size the model cannot lock onto a wrong
  // choice, and it homes in on the optimum.
  double tpe = 0, random = 0;
  for (int seed = 1; seed <= 50; ++seed) {
    for (auto strategy : {kennel::v1::SEARCH_STRATEGY_TPE,
                          kennel::v1::SEARCH_STRATEGY_RANDOM}) {
      kennel::v1::TuneRequest request = OriginalSearch(strategy, seed, 24);
      request.mutable_space()->RemoveLast();
      auto searcher = MakeSearcher(Options(request));
      std::vector<TrialObservation> history;
      double best = INFINITY;
      for (int i = 0; i < 24; ++i) {
        Point p = searcher->Propose(i, history);
        p.push_back(128);  // Synthetic() reads a batch size
        history.push_back(Observe(i, p));
        best = std::min(best, history.back().final_cost());
      }
      (strategy == kennel::v1::SEARCH_STRATEGY_TPE ? tpe : random) += best / 50;
    }
  }
  EXPECT_LT(tpe, random * 0.5) << "tpe " << tpe << " random " << random;
}

TEST(BetterTrialTest, FinishedBeforeStoppedBeforeFailed) {
  TrialObservation finished{0, {}, false, false, {0.9, 0.8}};
  TrialObservation stopped_late{1, {}, false, true, {0.5, 0.4}};
  TrialObservation stopped_early{2, {}, false, true, {0.1}};
  TrialObservation failed{3, {}, true, false, {0.01}};
  EXPECT_TRUE(BetterTrial(finished, stopped_late));
  EXPECT_TRUE(BetterTrial(stopped_late, stopped_early));
  EXPECT_TRUE(BetterTrial(stopped_early, failed));
  EXPECT_FALSE(BetterTrial(failed, finished));
  TrialObservation finished_better{4, {}, false, false, {0.7}};
  EXPECT_TRUE(BetterTrial(finished_better, finished));
}

}  // namespace
}  // namespace kennel::trainer
