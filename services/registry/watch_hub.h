// Fans out what model refs point at to any number of watchers. Each watched
// ref is resolved once for all its watchers: again when this process changes
// the model, and on a slow poll that catches changes made by other replicas.
// Watchers get the newest state only; nothing queues up behind a slow one.
#ifndef KENNEL_SERVICES_REGISTRY_WATCH_HUB_H_
#define KENNEL_SERVICES_REGISTRY_WATCH_HUB_H_

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/names.h"
#include "kennel/v1/registry.pb.h"

namespace kennel::registry {

// Thread-safe. Subscribers are called with the hub's lock held: they must
// only record the state and start non-blocking work, and must not call back
// into the hub.
class WatchHub {
 public:
  using State = std::shared_ptr<const v1::WatchModelResponse>;
  using Resolver =
      std::function<absl::StatusOr<v1::ModelVersion>(const ModelRef&)>;

  class Subscriber {
   public:
    virtual ~Subscriber() = default;
    // The ref's current state (an unset model: it points at nothing).
    virtual void OnState(State state) = 0;
    // The hub is shutting down; no more states will come.
    virtual void OnShutdown() = 0;
  };

  WatchHub(Resolver resolver, absl::Duration poll_interval);
  ~WatchHub();

  // Starts delivering `ref`'s states to `subscriber` (at once when the hub
  // already knows it). After Shutdown, calls OnShutdown instead.
  void Subscribe(const ModelRef& ref, Subscriber* subscriber);
  // After this returns the subscriber is never called again.
  void Unsubscribe(Subscriber* subscriber);
  // Something about the model changed: resolve its watched refs again.
  void ModelChanged(const std::string& name);
  // Ends every watch (OnShutdown) and stops the worker. Idempotent.
  void Shutdown();

  int watcher_count() const;

 private:
  struct Entry {
    ModelRef ref;
    std::set<Subscriber*> subscribers;
    State state;  // null until first resolved
    bool dirty = true;
    absl::Time retry_at = absl::InfinitePast();
  };
  void Run();

  // Constant after construction.
  const Resolver resolver_;
  const absl::Duration poll_interval_;

  mutable absl::Mutex mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::map<Subscriber*, std::string> subscriber_refs_ ABSL_GUARDED_BY(mu_);
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace kennel::registry

#endif  // KENNEL_SERVICES_REGISTRY_WATCH_HUB_H_
