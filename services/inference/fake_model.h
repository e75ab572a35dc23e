// Test doubles for the inference service: a model whose logits are a known
// function of its input, and a loader that hands such models out by path.
#ifndef KENNEL_SERVICES_INFERENCE_FAKE_MODEL_H_
#define KENNEL_SERVICES_INFERENCE_FAKE_MODEL_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "services/inference/model.h"

namespace kennel::inference::testing {

// What a FakeModel does; shared so that tests can watch and steer it.
struct FakeBehaviour {
  int classes = 3;
  // Logit of class c for an image whose mean input value is m: the class
  // `winner` gets m + 10, every other class gets c. `bf16_winner` is the
  // winner of the bf16 copy.
  int winner = 0;
  int bf16_winner = 0;
  bool bf16_available = true;
  // Forward fails with this status when set.
  absl::Status forward_error;
  // When set, Forward sleeps this long for a batch of the given size.
  std::function<absl::Duration(int)> cost;
  // When set, Forward waits for it (after announcing `entered`).
  absl::Notification* gate = nullptr;
  absl::Notification* entered = nullptr;

  absl::Mutex mu;
  std::vector<int> batch_sizes ABSL_GUARDED_BY(mu);
  std::atomic<int> images{0};
  std::atomic<int> destroyed{0};
};

class FakeModel : public Model {
 public:
  FakeModel(std::shared_ptr<FakeBehaviour> b, bool bf16)
      : b_(std::move(b)), bf16_(bf16) {}
  ~FakeModel() override { ++b_->destroyed; }

  absl::StatusOr<std::vector<float>> Forward(const float* input, int batch,
                                             int size) override {
    if (b_->entered != nullptr && !b_->entered->HasBeenNotified()) {
      b_->entered->Notify();
    }
    if (b_->gate != nullptr) b_->gate->WaitForNotification();
    if (b_->cost) absl::SleepFor(b_->cost(batch));
    {
      absl::MutexLock lock(&b_->mu);
      b_->batch_sizes.push_back(batch);
    }
    b_->images += batch;
    if (!b_->forward_error.ok()) return b_->forward_error;
    const size_t per_image = static_cast<size_t>(3) * size * size;
    std::vector<float> out;
    for (int i = 0; i < batch; ++i) {
      const float* x = input + per_image * i;
      const float mean = std::accumulate(x, x + per_image, 0.0f) /
                         static_cast<float>(per_image);
      const int winner = bf16_ ? b_->bf16_winner : b_->winner;
      for (int c = 0; c < b_->classes; ++c) {
        out.push_back(c == winner ? mean + 10.0f : static_cast<float>(c));
      }
    }
    return out;
  }

  absl::StatusOr<std::unique_ptr<Model>> ToBf16() const override {
    if (!b_->bf16_available) return absl::UnimplementedError("no bf16");
    return std::unique_ptr<Model>(new FakeModel(b_, /*bf16=*/true));
  }

 private:
  std::shared_ptr<FakeBehaviour> b_;
  const bool bf16_;
};

// Opens paths registered with Add; anything else is "not TorchScript".
class FakeLoader : public ModelLoader {
 public:
  struct Entry {
    std::shared_ptr<FakeBehaviour> behaviour;
    std::vector<std::string> labels;
    std::string preprocessing_json;
  };

  void Add(const std::string& path, Entry entry) {
    absl::MutexLock lock(&mu_);
    entries_[path] = std::move(entry);
  }

  absl::StatusOr<OpenedModel> Open(const std::string& path) override {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(path);
    if (it == entries_.end()) {
      return absl::InvalidArgumentError(path + " is not a TorchScript module");
    }
    OpenedModel opened;
    opened.model = std::make_unique<FakeModel>(it->second.behaviour, false);
    opened.labels = it->second.labels;
    opened.preprocessing_json = it->second.preprocessing_json;
    return opened;
  }

  bool Bf16Supported() const override { return bf16_supported; }
  bool bf16_supported = true;

 private:
  absl::Mutex mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kennel::inference::testing

#endif  // KENNEL_SERVICES_INFERENCE_FAKE_MODEL_H_
