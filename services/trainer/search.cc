#include "services/trainer/search.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kennel::trainer {
namespace {

// Separate streams keep the strategies' random numbers independent of each
// other while a trial's random proposal stays the same in every strategy.
constexpr uint64_t kRandomStream = 1;
constexpr uint64_t kGridStream = 2;
constexpr uint64_t kTpeStream = 3;

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t Mix(uint64_t x) { return SplitMix64(&x); }

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

constexpr double kPi = 3.14159265358979323846;

// The random point of trial `index`: the same in random search and in the
// start-up phase of TPE, so the two can be compared trial for trial.
Point RandomPoint(const SearchSpace& space, uint64_t seed, int index) {
  Rng rng = Rng::For(seed, kRandomStream, index);
  Point point;
  for (const ParamDef& p : space.params())
    point.push_back(p.FromUnit(rng.Uniform()));
  return point;
}

class RandomSearcher : public Searcher {
 public:
  explicit RandomSearcher(const TuneOptions& options) : options_(options) {}
  int NumTrials() const override { return options_.max_trials; }
  bool UsesHistory() const override { return false; }
  Point Propose(int index, absl::Span<const TrialObservation>) override {
    return RandomPoint(options_.space, options_.seed, index);
  }
  std::string Describe() const override { return "random search"; }

 private:
  const TuneOptions options_;
};

// A product grid with as many levels per parameter as fit in max_trials.
// Categorical sets are enumerated in full; continuous and integer ranges get
// the centres of equal cells of their (log) unit interval. The points are
// visited in an order shuffled by the seed, so that any prefix of the grid
// (the trials that run before a cancel, or that halving compares against)
// spreads over the space instead of varying only the last parameter.
class GridSearcher : public Searcher {
 public:
  explicit GridSearcher(const TuneOptions& options) : options_(options) {
    const auto& params = options.space.params();
    levels_.assign(params.size(), 1);
    double product = 1;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].kind == ParamKind::kCategorical) {
        levels_[i] = params[i].NumChoices();
        product *= levels_[i];
      }
    }
    // Grow the ranges one level at a time, the one with fewest levels first,
    // while the grid still fits.
    for (bool grew = true; grew;) {
      grew = false;
      std::vector<size_t> order(params.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        return levels_[a] < levels_[b];
      });
      for (size_t i : order) {
        const ParamDef& p = params[i];
        if (p.kind == ParamKind::kCategorical) continue;
        if (p.kind == ParamKind::kInteger && levels_[i] >= p.NumIntegers()) {
          continue;
        }
        const double grown = product / levels_[i] * (levels_[i] + 1);
        if (grown <= options.max_trials) {
          product = grown;
          ++levels_[i];
          grew = true;
          break;
        }
      }
    }
    int64_t total = 1;
    for (int64_t l : levels_) total *= l;
    // Large categorical products cannot all run; the shuffled order below
    // picks which do. Bound the enumeration itself too.
    total_ = std::min<int64_t>(total, 1 << 20);
    order_.resize(total_);
    std::iota(order_.begin(), order_.end(), 0);
    Rng rng = Rng::For(options.seed, kGridStream, 0);
    for (int64_t i = total_ - 1; i > 0; --i) {
      std::swap(order_[i], order_[rng.Below(i + 1)]);
    }
    order_.resize(std::min<int64_t>(total_, options.max_trials));
  }

  int NumTrials() const override { return static_cast<int>(order_.size()); }
  bool UsesHistory() const override { return false; }

  Point Propose(int index, absl::Span<const TrialObservation>) override {
    const auto& params = options_.space.params();
    int64_t cell = order_[std::clamp<int64_t>(index, 0, order_.size() - 1)];
    Point point(params.size());
    // Mixed radix, last parameter fastest.
    for (size_t i = params.size(); i-- > 0;) {
      const int64_t level = cell % levels_[i];
      cell /= levels_[i];
      if (params[i].kind == ParamKind::kCategorical) {
        point[i] = params[i].values[level];
      } else {
        point[i] = params[i].FromUnit((level + 0.5) / levels_[i]);
      }
    }
    return point;
  }

  std::string Describe() const override {
    return absl::StrCat("grid of ", order_.size(), " points (",
                        absl::StrJoin(levels_, " x "), ")");
  }

 private:
  const TuneOptions options_;
  std::vector<int64_t> levels_;
  int64_t total_ = 0;
  std::vector<int64_t> order_;
};

double NormalCdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

// A mixture of normals truncated to [0, 1] (the unit interval of one
// parameter), with bandwidths from the distance to neighbouring points, and a
// broad prior component so that no region's density is ever zero.
class Parzen {
 public:
  explicit Parzen(std::vector<double> points) {
    constexpr double kPriorMu = 0.5, kPriorSigma = 1.0;
    const size_t n = points.size();
    std::vector<std::pair<double, bool>> mus;  // (mu, is_prior)
    for (double p : points) mus.emplace_back(std::clamp(p, 0.0, 1.0), false);
    mus.emplace_back(kPriorMu, true);
    std::stable_sort(mus.begin(), mus.end());
    const double min_sigma = kPriorSigma / std::min<double>(100, n + 1);
    for (size_t i = 0; i < mus.size(); ++i) {
      double sigma = kPriorSigma;
      if (!mus[i].second) {
        const double left =
            i > 0 ? mus[i].first - mus[i - 1].first : mus[i].first;
        const double right = i + 1 < mus.size()
                                 ? mus[i + 1].first - mus[i].first
                                 : 1.0 - mus[i].first;
        sigma = std::clamp(std::max(left, right), min_sigma, kPriorSigma);
      }
      const double mass = NormalCdf((1 - mus[i].first) / sigma) -
                          NormalCdf((0 - mus[i].first) / sigma);
      mu_.push_back(mus[i].first);
      sigma_.push_back(sigma);
      mass_.push_back(std::max(mass, 1e-12));
    }
  }

  double Pdf(double x) const {
    double sum = 0;
    for (size_t i = 0; i < mu_.size(); ++i) {
      const double z = (x - mu_[i]) / sigma_[i];
      sum +=
          std::exp(-0.5 * z * z) / (sigma_[i] * std::sqrt(2 * kPi) * mass_[i]);
    }
    return sum / mu_.size();
  }

  double Sample(Rng& rng) const {
    const size_t i = rng.Below(mu_.size());
    for (int attempt = 0; attempt < 64; ++attempt) {
      const double x = mu_[i] + sigma_[i] * rng.Normal();
      if (x >= 0 && x <= 1) return x;
    }
    return rng.Uniform();
  }

 private:
  std::vector<double> mu_, sigma_, mass_;
};

// Choice probabilities of a categorical parameter: counts plus one for
// every choice. A weaker prior lets the first few good trials, which are
// good mostly for their continuous values, lock the search onto whichever
// choice they happened to draw.
std::vector<double> CategoricalWeights(int choices,
                                       const std::vector<int>& picks) {
  std::vector<double> w(choices, 1.0);
  for (int p : picks) w[p] += 1;
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  for (double& v : w) v /= total;
  return w;
}

int ChoiceIndex(const ParamDef& p, double value) {
  int best = 0;
  for (int i = 1; i < p.NumChoices(); ++i) {
    if (std::abs(p.values[i] - value) < std::abs(p.values[best] - value))
      best = i;
  }
  return best;
}

class TpeSearcher : public Searcher {
 public:
  TpeSearcher(const TuneOptions& options, TpeSettings settings)
      : options_(options), settings_(settings) {
    if (settings_.startup_trials <= 0) {
      settings_.startup_trials =
          std::max(4, std::min(10, options.max_trials / 3));
    }
    settings_.gamma = std::clamp(settings_.gamma, 0.01, 0.99);
    settings_.candidates = std::max(1, settings_.candidates);
  }

  int NumTrials() const override { return options_.max_trials; }
  bool UsesHistory() const override { return true; }

  Point Propose(int index,
                absl::Span<const TrialObservation> history) override {
    std::vector<const TrialObservation*> done;
    for (const TrialObservation& t : history) {
      if (!t.failed && !t.costs.empty()) done.push_back(&t);
    }
    if (static_cast<int>(done.size()) < settings_.startup_trials) {
      return RandomPoint(options_.space, options_.seed, index);
    }
    std::stable_sort(done.begin(), done.end(),
                     [](const TrialObservation* a, const TrialObservation* b) {
                       return BetterTrial(*a, *b);
                     });
    const size_t n_good = std::clamp<size_t>(
        static_cast<size_t>(std::ceil(settings_.gamma * done.size())), 1,
        done.size() - 1);

    const auto& params = options_.space.params();
    Rng rng = Rng::For(options_.seed, kTpeStream, index);
    struct Dim {
      std::unique_ptr<Parzen> good, bad;
      std::vector<double> good_w, bad_w;
    };
    std::vector<Dim> dims(params.size());
    for (size_t d = 0; d < params.size(); ++d) {
      const ParamDef& p = params[d];
      if (p.kind == ParamKind::kCategorical) {
        std::vector<int> good, bad;
        for (size_t i = 0; i < done.size(); ++i) {
          (i < n_good ? good : bad)
              .push_back(ChoiceIndex(p, done[i]->point[d]));
        }
        dims[d].good_w = CategoricalWeights(p.NumChoices(), good);
        dims[d].bad_w = CategoricalWeights(p.NumChoices(), bad);
      } else {
        std::vector<double> good, bad;
        for (size_t i = 0; i < done.size(); ++i) {
          (i < n_good ? good : bad).push_back(p.ToUnit(done[i]->point[d]));
        }
        dims[d].good = std::make_unique<Parzen>(std::move(good));
        dims[d].bad = std::make_unique<Parzen>(std::move(bad));
      }
    }

    Point best;
    double best_score = -std::numeric_limits<double>::infinity();
    for (int c = 0; c < settings_.candidates; ++c) {
      Point candidate(params.size());
      double score = 0;
      for (size_t d = 0; d < params.size(); ++d) {
        const ParamDef& p = params[d];
        if (p.kind == ParamKind::kCategorical) {
          // Draw a choice from the good weights.
          double u = rng.Uniform(), acc = 0;
          int pick = p.NumChoices() - 1;
          for (int k = 0; k < p.NumChoices(); ++k) {
            acc += dims[d].good_w[k];
            if (u < acc) {
              pick = k;
              break;
            }
          }
          candidate[d] = p.values[pick];
          score +=
              std::log(dims[d].good_w[pick]) - std::log(dims[d].bad_w[pick]);
        } else {
          const double x = dims[d].good->Sample(rng);
          candidate[d] = p.FromUnit(x);
          score += std::log(std::max(dims[d].good->Pdf(x), 1e-300)) -
                   std::log(std::max(dims[d].bad->Pdf(x), 1e-300));
        }
      }
      if (score > best_score) {
        best_score = score;
        best = std::move(candidate);
      }
    }
    return best;
  }

  std::string Describe() const override {
    return absl::StrCat("tree-structured Parzen estimator (",
                        settings_.startup_trials, " random start-up trials, ",
                        settings_.candidates, " candidates per proposal)");
  }

 private:
  const TuneOptions options_;
  TpeSettings settings_;
};

}  // namespace

double TrialObservation::final_cost() const {
  if (costs.empty()) return std::numeric_limits<double>::infinity();
  return costs.back();
}

bool BetterTrial(const TrialObservation& a, const TrialObservation& b) {
  auto group = [](const TrialObservation& t) {
    if (t.failed || t.costs.empty()) return 2;
    return t.stopped_early ? 1 : 0;
  };
  if (group(a) != group(b)) return group(a) < group(b);
  if (group(a) == 1 && a.costs.size() != b.costs.size()) {
    return a.costs.size() > b.costs.size();
  }
  const double ca = a.final_cost(), cb = b.final_cost();
  if (ca != cb) return ca < cb;
  return a.index < b.index;
}

Rng::Rng(uint64_t seed) {
  uint64_t s = seed;
  for (uint64_t& word : state_) word = SplitMix64(&s);
}

Rng Rng::For(uint64_t seed, uint64_t stream, uint64_t index) {
  return Rng(Mix(seed ^ Mix(stream * 0x632BE59BD9B4E019ULL + 1)) ^
             Mix(index + 0x8CB92BA72F3D8DD7ULL));
}

uint64_t Rng::Next() {
  const uint64_t result = Rotl(state_[1] * 5, 7) * 9;
  const uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = Rotl(state_[3], 45);
  return result;
}

double Rng::Uniform() { return (Next() >> 11) * 0x1.0p-53; }

double Rng::Normal() {
  const double u1 = 1.0 - Uniform();  // (0, 1]
  const double u2 = Uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * kPi * u2);
}

uint64_t Rng::Below(uint64_t n) {
  if (n <= 1) return 0;
  // Rejection keeps every value equally likely.
  const uint64_t limit = std::numeric_limits<uint64_t>::max() -
                         std::numeric_limits<uint64_t>::max() % n;
  uint64_t x;
  do {
    x = Next();
  } while (x >= limit);
  return x % n;
}

std::unique_ptr<Searcher> MakeSearcher(const TuneOptions& options) {
  switch (options.strategy) {
    case kennel::v1::SEARCH_STRATEGY_GRID:
      return std::make_unique<GridSearcher>(options);
    case kennel::v1::SEARCH_STRATEGY_TPE:
      return std::make_unique<TpeSearcher>(options, TpeSettings{});
    default:
      return std::make_unique<RandomSearcher>(options);
  }
}

std::unique_ptr<Searcher> MakeTpeSearcher(const TuneOptions& options,
                                          TpeSettings settings) {
  return std::make_unique<TpeSearcher>(options, settings);
}

}  // namespace kennel::trainer
