// The gRPC edge of kennel-registry: checks tokens and names, moves bytes
// between streams and the ModelStore, and converts statuses once. Unary and
// transfer methods are synchronous; WatchModel is a callback reactor, so
// idle watchers hold no thread.
#ifndef KENNEL_SERVICES_REGISTRY_REGISTRY_SERVICE_H_
#define KENNEL_SERVICES_REGISTRY_REGISTRY_SERVICE_H_

#include "common/auth.h"
#include "kennel/v1/registry.grpc.pb.h"
#include "services/registry/model_store.h"
#include "services/registry/registry_metrics.h"
#include "services/registry/watch_hub.h"

namespace kennel::registry {

// Thread-safe. The store, hub, auth and metrics must outlive it.
class RegistryService final
    : public v1::ModelRegistry::WithCallbackMethod_WatchModel<
          v1::ModelRegistry::Service> {
 public:
  RegistryService(ModelStore* store, WatchHub* hub, const TokenAuth* auth,
                  RegistryMetrics* metrics);

  grpc::Status PushModel(grpc::ServerContext* context,
                         grpc::ServerReader<v1::PushModelRequest>* reader,
                         v1::PushModelResponse* response) override;
  grpc::Status HasBlobs(grpc::ServerContext* context,
                        const v1::HasBlobsRequest* request,
                        v1::HasBlobsResponse* response) override;
  grpc::Status GetModel(grpc::ServerContext* context,
                        const v1::GetModelRequest* request,
                        v1::ModelVersion* response) override;
  grpc::Status PullModel(
      grpc::ServerContext* context, const v1::PullModelRequest* request,
      grpc::ServerWriter<v1::PullModelResponse>* writer) override;
  grpc::Status ListModels(grpc::ServerContext* context,
                          const v1::ListModelsRequest* request,
                          v1::ListModelsResponse* response) override;
  grpc::Status ListVersions(grpc::ServerContext* context,
                            const v1::ListVersionsRequest* request,
                            v1::ListVersionsResponse* response) override;
  grpc::Status SetAlias(grpc::ServerContext* context,
                        const v1::SetAliasRequest* request,
                        v1::Alias* response) override;
  grpc::Status DeleteAlias(grpc::ServerContext* context,
                           const v1::DeleteAliasRequest* request,
                           v1::DeleteAliasResponse* response) override;
  grpc::Status DeleteVersion(grpc::ServerContext* context,
                             const v1::DeleteVersionRequest* request,
                             v1::DeleteVersionResponse* response) override;
  grpc::Status GarbageCollect(grpc::ServerContext* context,
                              const v1::GarbageCollectRequest* request,
                              v1::GarbageCollectResponse* response) override;
  grpc::ServerWriteReactor<v1::WatchModelResponse>* WatchModel(
      grpc::CallbackServerContext* context,
      const v1::WatchModelRequest* request) override;

 private:
  absl::StatusOr<v1::PushModelResponse> Push(
      grpc::ServerContext* context,
      grpc::ServerReader<v1::PushModelRequest>* reader);
  absl::Status Pull(grpc::ServerContext* context,
                    const v1::PullModelRequest& request,
                    grpc::ServerWriter<v1::PullModelResponse>* writer);

  ModelStore* const store_;
  WatchHub* const hub_;
  const TokenAuth* const auth_;
  RegistryMetrics* const metrics_;
};

}  // namespace kennel::registry

#endif  // KENNEL_SERVICES_REGISTRY_REGISTRY_SERVICE_H_
