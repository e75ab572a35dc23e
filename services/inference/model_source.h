// Where model versions come from. A source finds versions and hands each to
// the model manager, on a thread of its own so the server answers health
// checks (NOT_SERVING) while the first model loads.
//   RegistrySource follows a registry ref with WatchModel, downloads the
//   model component into a local cache keyed by digest, and asks the manager
//   to load it; it re-watches with backoff when the registry goes away. It
//   remembers the last version that served the ref, and at start-up serves
//   that one from the cache first, so a restart keeps serving while the
//   registry is unreachable or its current version cannot serve.
//   LocalFileSource serves one TorchScript file.
#ifndef KENNEL_SERVICES_INFERENCE_MODEL_SOURCE_H_
#define KENNEL_SERVICES_INFERENCE_MODEL_SOURCE_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/registry_client.h"
#include "services/inference/blob_cache.h"
#include "services/inference/model_manager.h"

namespace kennel::inference {

class ModelSource {
 public:
  virtual ~ModelSource() = default;
  // Starts the source's thread.
  virtual void Start() = 0;
  // Stops following and joins the thread. Idempotent.
  virtual void Stop() = 0;
};

class RegistrySource : public ModelSource {
 public:
  struct Options {
    ClientOptions client;
    std::string ref;
    std::string cache_dir;
    // Runs once on the source's thread before it loads anything.
    std::function<void()> on_thread_start;
  };
  RegistrySource(Options options, ModelManager* manager);
  ~RegistrySource() override;

  void Start() override;
  void Stop() override;

  // The steps of the source's thread, public for tests; only that thread
  // (or a test that has not started it) calls them.
  //
  // Opens the cache, which removes what crashed downloads left in it.
  absl::Status OpenCache();
  // Loads the version that last served the ref from the cache. NOT_FOUND
  // when none is remembered or its file is gone; else the load's status.
  absl::Status ServeLastGood();
  // Fetches (or finds in the cache) and loads one version the watch
  // reported, and remembers it once it serves.
  void Handle(const kennel::v1::ModelVersion& version);

 private:
  void Run();
  absl::StatusOr<std::string> Fetch(const kennel::v1::ModelVersion& version,
                                    const kennel::v1::Component& component);
  // The candidate for `version`, with its model component's digest, or why
  // it has no component that can serve (`candidate` is filled either way).
  absl::Status MakeCandidate(const kennel::v1::ModelVersion& version,
                             ModelCandidate* candidate) const;

  // Constant after construction.
  const Options options_;
  ModelManager* const manager_;
  RegistryClient client_;

  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<ModelWatch> watch_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;

  // Only the source's thread touches these.
  std::unique_ptr<BlobCache> cache_;
  // The version last handed to the manager (loaded or refused), so a
  // re-watch that reports the same state does not load it again.
  std::string last_handled_;
};

class LocalFileSource : public ModelSource {
 public:
  // `on_done` receives the outcome of the one load.
  LocalFileSource(ModelCandidate candidate, ModelManager* manager,
                  std::function<void()> on_thread_start,
                  std::function<void(const absl::Status&)> on_done);
  ~LocalFileSource() override;

  void Start() override;
  void Stop() override;

 private:
  const ModelCandidate candidate_;
  ModelManager* const manager_;
  const std::function<void()> on_thread_start_;
  const std::function<void(const absl::Status&)> on_done_;
  std::thread thread_;
};

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_MODEL_SOURCE_H_
