#include "services/registry/registry_service.h"

#include <glog/logging.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/names.h"
#include "common/status.h"
#include "common/storage/object_store.h"

namespace kennel::registry {
namespace {

// One WatchModel stream. Holds at most the state being written and the
// newest one waiting behind it, so a slow client skips intermediate states
// instead of queueing them. Deletes itself in OnDone.
class WatchReactor : public grpc::ServerWriteReactor<v1::WatchModelResponse>,
                     public WatchHub::Subscriber {
 public:
  explicit WatchReactor(WatchHub* hub) : hub_(hub) {}

  void Start(const ModelRef& ref) { hub_->Subscribe(ref, this); }
  void Reject(const absl::Status& status) { Stop(ToGrpcStatus(status)); }

  void OnState(WatchHub::State state) override {
    const v1::WatchModelResponse* to_write = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (finishing_) return;
      if (writing_) {
        pending_ = std::move(state);  // replaces any older waiting state
        return;
      }
      current_ = std::move(state);
      writing_ = true;
      to_write = current_.get();
    }
    StartWrite(to_write);
  }

  void OnShutdown() override {
    Stop(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "the registry is shutting down; watch again"));
  }

  void OnCancel() override {
    Stop(grpc::Status(grpc::StatusCode::CANCELLED, "watch cancelled"));
  }

  void OnWriteDone(bool ok) override {
    const v1::WatchModelResponse* to_write = nullptr;
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok && !finishing_) {
        finishing_ = true;
        finish_status_ =
            grpc::Status(grpc::StatusCode::CANCELLED, "the watcher went away");
      }
      if (finishing_) {
        finish = finish_status_;
      } else if (pending_ != nullptr) {
        current_ = std::move(pending_);
        writing_ = true;
        to_write = current_.get();
      }
    }
    if (finish.has_value()) {
      Finish(*finish);
    } else if (to_write != nullptr) {
      StartWrite(to_write);
    }
  }

  void OnDone() override {
    hub_->Unsubscribe(this);
    delete this;
  }

 private:
  // Finishes now, or after the write in flight (OnWriteDone finishes then).
  void Stop(grpc::Status status) {
    {
      absl::MutexLock lock(&mu_);
      if (finishing_) return;
      finishing_ = true;
      finish_status_ = status;
      if (writing_) return;
    }
    Finish(status);
  }

  WatchHub* const hub_;
  absl::Mutex mu_;
  WatchHub::State current_ ABSL_GUARDED_BY(mu_);  // being written
  WatchHub::State pending_ ABSL_GUARDED_BY(mu_);  // newest, not yet written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status finish_status_ ABSL_GUARDED_BY(mu_);
};

// The limits of the storage calls one RPC makes: they end a little before
// the caller's deadline, so that a hung store still gets an UNAVAILABLE that
// says why, not a bare DEADLINE_EXCEEDED, and they stop when the caller
// cancels. The margin covers sending the answer back.
std::shared_ptr<const storage::CallLimits> LimitsFor(
    const grpc::ServerContext& context) {
  auto limits = std::make_shared<storage::CallLimits>();
  const std::chrono::system_clock::time_point deadline = context.deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    const absl::Time end = absl::FromChrono(deadline);
    const absl::Duration margin =
        std::clamp((end - absl::Now()) / 10, absl::Milliseconds(20),
                   absl::Milliseconds(500));
    limits->deadline = end - margin;
  }
  limits->cancelled = [&context] { return context.IsCancelled(); };
  return limits;
}

}  // namespace

RegistryService::RegistryService(ModelStore* store, WatchHub* hub,
                                 const TokenAuth* auth,
                                 RegistryMetrics* metrics)
    : store_(store), hub_(hub), auth_(auth), metrics_(metrics) {}

grpc::Status RegistryService::PushModel(
    grpc::ServerContext* context,
    grpc::ServerReader<v1::PushModelRequest>* reader,
    v1::PushModelResponse* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  auto result = Push(context, reader);
  if (!result.ok()) {
    LOG(WARNING) << "push refused: " << result.status();
    return ToGrpcStatus(result.status());
  }
  *response = *std::move(result);
  return grpc::Status::OK;
}

absl::StatusOr<v1::PushModelResponse> RegistryService::Push(
    grpc::ServerContext* context,
    grpc::ServerReader<v1::PushModelRequest>* reader) {
  RETURN_IF_ERROR(auth_->Check(*context));
  v1::PushModelRequest message;
  if (!reader->Read(&message)) {
    if (context->IsCancelled()) return absl::CancelledError("push cancelled");
    // gRPC also ends the reads when a message cannot be parsed.
    return absl::InvalidArgumentError(
        "the push ended before its header, or its header could not be "
        "parsed (text fields such as labels must be UTF-8)");
  }
  if (!message.has_header()) {
    return absl::InvalidArgumentError(
        "the first message of a push must be its header");
  }
  const v1::PushHeader header = std::move(*message.mutable_header());
  RETURN_IF_ERROR(store_->ValidateHeader(header));

  std::vector<std::string> digests;
  for (const v1::ComponentSpec& spec : header.components()) {
    if (std::find(digests.begin(), digests.end(), spec.digest()) ==
        digests.end()) {
      digests.push_back(spec.digest());
    }
  }
  ASSIGN_OR_RETURN(std::vector<std::string> present_list,
                   store_->PresentBlobs(digests));
  const std::set<std::string> present(present_list.begin(), present_list.end());

  std::set<std::string> uploaded;
  std::unique_ptr<BlobUpload> current;
  int current_index = -1;
  int64_t received = 0;
  auto finish_current = [&]() -> absl::Status {
    if (current == nullptr) return absl::OkStatus();
    RETURN_IF_ERROR(
        Annotate(current->Finish(), absl::StrCat("component ", current_index)));
    uploaded.insert(current->digest());
    current.reset();
    return absl::OkStatus();
  };
  while (reader->Read(&message)) {
    if (!message.has_chunk()) {
      return absl::InvalidArgumentError(
          "only the first message of a push may be a header");
    }
    const v1::Chunk& chunk = message.chunk();
    if (chunk.component() < 0 ||
        chunk.component() >= header.components_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("a chunk names component ", chunk.component(),
                       " but the header lists ", header.components_size()));
    }
    const v1::ComponentSpec& spec = header.components(chunk.component());
    if (current == nullptr || current->digest() != spec.digest()) {
      RETURN_IF_ERROR(finish_current());
      if (uploaded.count(spec.digest())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the bytes of component ", chunk.component(), " (", spec.digest(),
            ") were already sent; send each component once, in one run"));
      }
      ASSIGN_OR_RETURN(current, store_->StartBlob(spec.digest(), spec.size()));
      current_index = chunk.component();
    }
    if (chunk.offset() != current->received()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a chunk of component ", chunk.component(), " starts at byte ",
          chunk.offset(), " but ", current->received(),
          " bytes have arrived; send chunks in order"));
    }
    const int64_t size = static_cast<int64_t>(chunk.data().size());
    // Hands the chunk's buffer over (no copy) and gets a used one back for
    // the next message to be parsed into.
    RETURN_IF_ERROR(current->Write(message.mutable_chunk()->mutable_data()));
    received += size;
    metrics_->bytes_received.Increment(static_cast<double>(size));
  }
  if (context->IsCancelled()) {
    return absl::CancelledError("the push was cancelled; nothing was stored");
  }
  RETURN_IF_ERROR(finish_current());
  for (int i = 0; i < header.components_size(); ++i) {
    const v1::ComponentSpec& spec = header.components(i);
    if (present.count(spec.digest()) || uploaded.count(spec.digest())) continue;
    if (spec.size() == 0) {
      // An empty component has no chunks to carry it.
      ASSIGN_OR_RETURN(std::unique_ptr<BlobUpload> empty,
                       store_->StartBlob(spec.digest(), 0));
      RETURN_IF_ERROR(Annotate(empty->Finish(), absl::StrCat("component ", i)));
      uploaded.insert(spec.digest());
      continue;
    }
    return absl::FailedPreconditionError(
        absl::StrCat("component ", i, " (", spec.digest(),
                     ") is not stored and the push sent none of its bytes"));
  }
  ASSIGN_OR_RETURN(v1::ModelVersion model, store_->Commit(header));
  metrics_->versions_committed.Increment();
  LOG(INFO) << "committed " << model.name() << ":" << model.version() << " ("
            << received << " bytes received)";
  v1::PushModelResponse response;
  *response.mutable_model() = std::move(model);
  response.set_bytes_received(received);
  return response;
}

grpc::Status RegistryService::HasBlobs(grpc::ServerContext* context,
                                       const v1::HasBlobsRequest* request,
                                       v1::HasBlobsResponse* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  if (request->digests_size() > 1000) {
    return ToGrpcStatus(
        absl::InvalidArgumentError("ask about at most 1000 digests at once"));
  }
  std::vector<std::string> digests(request->digests().begin(),
                                   request->digests().end());
  auto present = store_->PresentBlobs(digests);
  if (!present.ok()) return ToGrpcStatus(present.status());
  for (std::string& digest : *present) response->add_present(std::move(digest));
  return grpc::Status::OK;
}

grpc::Status RegistryService::GetModel(grpc::ServerContext* context,
                                       const v1::GetModelRequest* request,
                                       v1::ModelVersion* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  auto model = store_->Resolve(request->ref());
  if (!model.ok()) return ToGrpcStatus(model.status());
  *response = *std::move(model);
  return grpc::Status::OK;
}

grpc::Status RegistryService::PullModel(
    grpc::ServerContext* context, const v1::PullModelRequest* request,
    grpc::ServerWriter<v1::PullModelResponse>* writer) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  absl::Status status = Pull(context, *request, writer);
  if (!status.ok() && !absl::IsCancelled(status)) {
    LOG(WARNING) << "pull " << request->ref() << ": " << status;
  }
  return ToGrpcStatus(status);
}

absl::Status RegistryService::Pull(
    grpc::ServerContext* context, const v1::PullModelRequest& request,
    grpc::ServerWriter<v1::PullModelResponse>* writer) {
  ASSIGN_OR_RETURN(ModelRef ref, ParseModelRef(request.ref()));
  for (const std::string& digest : request.digests()) {
    RETURN_IF_ERROR(ValidateDigest(digest));
  }
  ASSIGN_OR_RETURN(v1::ModelVersion model, store_->Resolve(ref));
  std::vector<int> selected;
  std::set<std::string> chosen;
  for (int i = 0; i < model.components_size(); ++i) {
    const std::string& digest = model.components(i).digest();
    const bool wanted =
        request.digests().empty() ||
        std::find(request.digests().begin(), request.digests().end(), digest) !=
            request.digests().end();
    if (wanted && chosen.insert(digest).second) selected.push_back(i);
  }
  for (const std::string& digest : request.digests()) {
    if (!chosen.count(digest)) {
      return absl::NotFoundError(absl::StrCat(
          model.name(), ":", model.version(), " has no component ", digest));
    }
  }
  v1::PullModelResponse message;
  *message.mutable_header() = model;
  if (!writer->Write(message))
    return absl::CancelledError("the client went away");
  for (int index : selected) {
    v1::Chunk* chunk = message.mutable_chunk();
    chunk->set_component(index);
    RETURN_IF_ERROR(store_->ReadBlobChunks(
        model.components(index),
        [&](int64_t offset, std::string* data) -> absl::Status {
          if (context->IsCancelled()) {
            return absl::CancelledError("the client went away");
          }
          chunk->set_offset(offset);
          // The store's buffer becomes the message's, and the message's
          // previous one (already serialised by the last Write) goes back
          // to be filled next: no copy of the chunk here.
          chunk->mutable_data()->swap(*data);
          if (!writer->Write(message)) {
            return absl::CancelledError("the client went away");
          }
          metrics_->bytes_sent.Increment(
              static_cast<double>(chunk->data().size()));
          return absl::OkStatus();
        }));
  }
  return absl::OkStatus();
}

grpc::Status RegistryService::ListModels(grpc::ServerContext* context,
                                         const v1::ListModelsRequest* request,
                                         v1::ListModelsResponse* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  auto models = store_->ListModels();
  if (!models.ok()) return ToGrpcStatus(models.status());
  *response = *std::move(models);
  return grpc::Status::OK;
}

grpc::Status RegistryService::ListVersions(
    grpc::ServerContext* context, const v1::ListVersionsRequest* request,
    v1::ListVersionsResponse* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  auto versions = store_->ListVersions(*request);
  if (!versions.ok()) return ToGrpcStatus(versions.status());
  *response = *std::move(versions);
  return grpc::Status::OK;
}

grpc::Status RegistryService::SetAlias(grpc::ServerContext* context,
                                       const v1::SetAliasRequest* request,
                                       v1::Alias* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  if (absl::Status s = auth_->Check(*context); !s.ok()) return ToGrpcStatus(s);
  auto alias =
      store_->SetAlias(request->name(), request->alias(), request->version());
  if (!alias.ok()) return ToGrpcStatus(alias.status());
  LOG(INFO) << "alias " << request->name() << "@" << request->alias() << " -> "
            << request->version();
  *response = *std::move(alias);
  return grpc::Status::OK;
}

grpc::Status RegistryService::DeleteAlias(grpc::ServerContext* context,
                                          const v1::DeleteAliasRequest* request,
                                          v1::DeleteAliasResponse* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  if (absl::Status s = auth_->Check(*context); !s.ok()) return ToGrpcStatus(s);
  absl::Status status = store_->DeleteAlias(request->name(), request->alias());
  if (status.ok()) {
    LOG(INFO) << "alias " << request->name() << "@" << request->alias()
              << " deleted";
  }
  return ToGrpcStatus(status);
}

grpc::Status RegistryService::DeleteVersion(
    grpc::ServerContext* context, const v1::DeleteVersionRequest* request,
    v1::DeleteVersionResponse* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  if (absl::Status s = auth_->Check(*context); !s.ok()) return ToGrpcStatus(s);
  absl::Status status =
      store_->DeleteVersion(request->name(), request->version());
  if (status.ok()) {
    LOG(INFO) << "version " << request->name() << ":" << request->version()
              << " deleted";
  }
  return ToGrpcStatus(status);
}

grpc::Status RegistryService::GarbageCollect(
    grpc::ServerContext* context, const v1::GarbageCollectRequest* request,
    v1::GarbageCollectResponse* response) {
  const storage::ScopedCallLimits limits(LimitsFor(*context));
  if (absl::Status s = auth_->Check(*context); !s.ok()) return ToGrpcStatus(s);
  if (request->grace_seconds() < 0) {
    return ToGrpcStatus(
        absl::InvalidArgumentError("grace_seconds must not be negative"));
  }
  const absl::Duration grace = request->grace_seconds() == 0
                                   ? absl::Hours(1)
                                   : absl::Seconds(request->grace_seconds());
  auto result = store_->GarbageCollect(grace, request->dry_run());
  if (!result.ok()) return ToGrpcStatus(result.status());
  *response = *std::move(result);
  return grpc::Status::OK;
}

grpc::ServerWriteReactor<v1::WatchModelResponse>* RegistryService::WatchModel(
    grpc::CallbackServerContext* context,
    const v1::WatchModelRequest* request) {
  auto* reactor = new WatchReactor(hub_);
  auto ref = ParseModelRef(request->ref());
  if (!ref.ok()) {
    reactor->Reject(ref.status());
  } else {
    reactor->Start(*ref);
  }
  return reactor;
}

}  // namespace kennel::registry
