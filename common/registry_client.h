// Client of kennel-registry for the trainer, inference and the CLI: pushes
// model files (sending only the blobs the registry lacks), reads manifests,
// pulls components into verified files, moves aliases and follows a ref.
#ifndef KENNEL_COMMON_REGISTRY_CLIENT_H_
#define KENNEL_COMMON_REGISTRY_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/client.h"
#include "kennel/v1/registry.grpc.pb.h"

namespace kennel {

// Called as bytes move: `done` of `total` bytes of this call's transfer.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

// One WatchModel stream. Next() blocks; Cancel() may be called from any
// thread to end it, also while the first Next() is still starting the stream
// (connecting to a registry that does not answer). Not otherwise safe to
// share between threads. The RegistryClient that made it must outlive it.
class ModelWatch {
 public:
  // The stream starts in the first Next(), so that making a watch never
  // blocks and a caller can hold it where Cancel() can reach it first.
  ModelWatch(v1::ModelRegistry::Stub* stub,
             std::unique_ptr<grpc::ClientContext> context,
             v1::WatchModelRequest request);
  // A watch that could not start: Next() returns false, status() says why.
  explicit ModelWatch(absl::Status failure);
  ~ModelWatch();

  // The next state of the ref (the first is its state when the watch
  // began). False when the stream has ended; status() then says why.
  bool Next(v1::WatchModelResponse* response);
  void Cancel();
  // Why the stream ended (OK while it runs). CANCELLED after Cancel();
  // UNAVAILABLE when the registry went away or is draining: watch again.
  absl::Status status() const;

 private:
  v1::ModelRegistry::Stub* const stub_ = nullptr;
  const std::unique_ptr<grpc::ClientContext> context_;
  const v1::WatchModelRequest request_;
  std::unique_ptr<grpc::ClientReader<v1::WatchModelResponse>> reader_;
  bool finished_ = false;
  absl::Status status_;
};

// Thread-safe: calls may run concurrently (each has its own context).
class RegistryClient {
 public:
  explicit RegistryClient(ClientOptions options);

  // Pushes a new version. `header.components[i]` describes
  // `component_paths[i]`; its digest and size are computed when empty. Only
  // blobs the registry does not already hold are sent, in 1 MiB chunks.
  absl::StatusOr<v1::ModelVersion> PushFiles(
      const v1::PushHeader& header,
      const std::vector<std::string>& component_paths,
      ProgressFn progress = nullptr);

  absl::StatusOr<v1::ModelVersion> GetModel(const std::string& ref);

  // Downloads one component (by digest) of the version `ref` points at into
  // `dest_path`: written to a temporary file beside it, checked against the
  // digest, then renamed, so `dest_path` is either absent or complete.
  absl::Status PullComponent(const std::string& ref, const std::string& digest,
                             const std::string& dest_path,
                             ProgressFn progress = nullptr);

  absl::StatusOr<v1::Alias> SetAlias(const std::string& name,
                                     const std::string& alias, int64_t version);
  absl::Status DeleteAlias(const std::string& name, const std::string& alias);
  absl::Status DeleteVersion(const std::string& name, int64_t version);

  // Follows a ref. Callers re-watch with backoff when the stream ends.
  std::unique_ptr<ModelWatch> Watch(const std::string& ref);

  absl::StatusOr<std::vector<std::string>> HasBlobs(
      const std::vector<std::string>& digests);
  absl::StatusOr<v1::ListModelsResponse> ListModels();
  absl::StatusOr<v1::ListVersionsResponse> ListVersions(
      const std::string& name, int page_size = 0,
      const std::string& page_token = "");
  absl::StatusOr<v1::GarbageCollectResponse> GarbageCollect(
      int64_t grace_seconds, bool dry_run);

  const ClientOptions& options() const { return options_; }

 private:
  // The stub, or why the channel could not be made (a bad TLS CA file).
  absl::StatusOr<v1::ModelRegistry::Stub*> stub();
  // Deadline for moving `bytes`: the unary timeout plus time at a slow
  // 4 MiB/s, so large artifacts are not cut off by a deadline meant for
  // small calls.
  absl::Duration TransferTimeout(int64_t bytes) const;
  absl::StatusOr<v1::ModelVersion> PushOnce(
      const v1::PushHeader& header,
      const std::vector<std::string>& component_paths, bool send_all,
      const ProgressFn& progress);

  const ClientOptions options_;
  absl::Status channel_status_;
  std::unique_ptr<v1::ModelRegistry::Stub> stub_;
};

}  // namespace kennel

#endif  // KENNEL_COMMON_REGISTRY_CLIENT_H_
