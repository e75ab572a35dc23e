#include "services/registry/watch_hub.h"

#include <glog/logging.h>

#include <vector>

namespace kennel::registry {

WatchHub::WatchHub(Resolver resolver, absl::Duration poll_interval)
    : resolver_(std::move(resolver)), poll_interval_(poll_interval) {
  worker_ = std::thread([this] { Run(); });
}

WatchHub::~WatchHub() {
  Shutdown();
  if (worker_.joinable()) worker_.join();
}

void WatchHub::Subscribe(const ModelRef& ref, Subscriber* subscriber) {
  absl::MutexLock lock(&mu_);
  if (shutdown_) {
    subscriber->OnShutdown();
    return;
  }
  const std::string key = ref.ToString();
  auto [it, inserted] = entries_.try_emplace(key);
  Entry& entry = it->second;
  if (inserted) {
    entry.ref = ref;
    wake_ = true;
  }
  entry.subscribers.insert(subscriber);
  subscriber_refs_[subscriber] = key;
  if (entry.state != nullptr) subscriber->OnState(entry.state);
}

void WatchHub::Unsubscribe(Subscriber* subscriber) {
  absl::MutexLock lock(&mu_);
  auto it = subscriber_refs_.find(subscriber);
  if (it == subscriber_refs_.end()) return;
  auto entry = entries_.find(it->second);
  subscriber_refs_.erase(it);
  if (entry == entries_.end()) return;
  entry->second.subscribers.erase(subscriber);
  if (entry->second.subscribers.empty()) entries_.erase(entry);
}

void WatchHub::ModelChanged(const std::string& name) {
  absl::MutexLock lock(&mu_);
  for (auto& [key, entry] : entries_) {
    if (entry.ref.name == name) {
      entry.dirty = true;
      entry.retry_at = absl::InfinitePast();
      wake_ = true;
    }
  }
}

void WatchHub::Shutdown() {
  absl::MutexLock lock(&mu_);
  if (shutdown_) return;
  shutdown_ = true;
  for (auto& [key, entry] : entries_) {
    for (Subscriber* subscriber : entry.subscribers) subscriber->OnShutdown();
  }
}

int WatchHub::watcher_count() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(subscriber_refs_.size());
}

void WatchHub::Run() {
  absl::Time next_poll = absl::Now() + poll_interval_;
  while (true) {
    std::vector<std::pair<std::string, ModelRef>> work;
    {
      absl::MutexLock lock(&mu_);
      // Sleep until woken, the next poll, or the earliest retry.
      absl::Time wake_at = next_poll;
      for (const auto& [key, entry] : entries_) {
        if (entry.dirty) wake_at = std::min(wake_at, entry.retry_at);
      }
      mu_.AwaitWithDeadline(
          absl::Condition(
              +[](WatchHub* hub) ABSL_EXCLUSIVE_LOCKS_REQUIRED(hub->mu_) {
                return hub->wake_ || hub->shutdown_;
              },
              this),
          wake_at);
      if (shutdown_) return;
      wake_ = false;
      const absl::Time now = absl::Now();
      if (now >= next_poll) {
        for (auto& [key, entry] : entries_) entry.dirty = true;
        next_poll = now + poll_interval_;
      }
      for (auto& [key, entry] : entries_) {
        if (entry.dirty && entry.retry_at <= now) {
          entry.dirty = false;
          work.emplace_back(key, entry.ref);
        }
      }
    }
    for (const auto& [key, ref] : work) {
      // Resolve without the lock: it reads storage.
      absl::StatusOr<v1::ModelVersion> resolved = resolver_(ref);
      auto state = std::make_shared<v1::WatchModelResponse>();
      if (resolved.ok()) {
        *state->mutable_model() = *std::move(resolved);
      } else if (!absl::IsNotFound(resolved.status())) {
        LOG(WARNING) << "watch " << key << ": " << resolved.status()
                     << "; trying again shortly";
        absl::MutexLock lock(&mu_);
        auto it = entries_.find(key);
        if (it != entries_.end()) {
          it->second.dirty = true;
          it->second.retry_at = absl::Now() + absl::Seconds(1);
        }
        continue;
      }
      absl::MutexLock lock(&mu_);
      if (shutdown_) return;
      auto it = entries_.find(key);
      if (it == entries_.end()) continue;  // nobody watches it any more
      Entry& entry = it->second;
      const bool changed =
          entry.state == nullptr ||
          entry.state->has_model() != state->has_model() ||
          entry.state->model().version() != state->model().version();
      if (!changed) continue;
      entry.state = state;
      for (Subscriber* subscriber : entry.subscribers)
        subscriber->OnState(state);
    }
  }
}

}  // namespace kennel::registry
