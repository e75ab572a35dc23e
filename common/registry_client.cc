#include "common/registry_client.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/sha256.h"
#include "common/status.h"

namespace kennel {
namespace {

constexpr size_t kChunkBytes = 1 << 20;

absl::Status Errno(absl::string_view what, const std::string& path) {
  int err = errno;
  return absl::Status(
      err == ENOENT ? absl::StatusCode::kNotFound
                    : absl::StatusCode::kFailedPrecondition,
      absl::StrCat("cannot ", what, " ", path, ": ", strerror(err)));
}

// Closes a descriptor on every return path.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

absl::Status WriteAll(int fd, const char* data, size_t size,
                      const std::string& path) {
  while (size > 0) {
    ssize_t n = write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Errno("write", path);
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Hashes the chunks of a pull on a thread of its own, so that receiving and
// writing the next chunk overlap with hashing this one.
class BackgroundHash {
 public:
  BackgroundHash() : thread_([this] { Run(); }) {}
  ~BackgroundHash() {
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
    }
    thread_.join();
  }

  // Takes the bytes (swapping `data` with a spare buffer); blocks while
  // too many bytes wait to be hashed.
  void Add(std::string* data) {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](BackgroundHash* h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(h->mu_) {
          return h->queued_bytes_ < kMaxQueuedBytes;
        },
        this));
    queued_bytes_ += static_cast<int64_t>(data->size());
    queue_.emplace_back();
    queue_.back().swap(*data);
    if (!spare_.empty()) {
      data->swap(spare_.back());
      spare_.pop_back();
    }
  }

  // "sha256:<hex>" of everything added. Call once.
  std::string Digest() {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    mu_.Await(absl::Condition(&done_));
    return digest_;
  }

 private:
  static constexpr int64_t kMaxQueuedBytes = int64_t{8} << 20;

  void Run() {
    Sha256 hash;
    while (true) {
      std::string data;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](BackgroundHash* h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(h->mu_) {
              return !h->queue_.empty() || h->closing_;
            },
            this));
        if (queue_.empty()) {
          digest_ = hash.Digest();
          done_ = true;
          return;
        }
        data.swap(queue_.front());
        queue_.pop_front();
      }
      hash.Update(data);
      absl::MutexLock lock(&mu_);
      queued_bytes_ -= static_cast<int64_t>(data.size());
      if (spare_.size() < 4) spare_.push_back(std::move(data));
    }
  }

  absl::Mutex mu_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> spare_ ABSL_GUARDED_BY(mu_);
  int64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  std::string digest_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;  // last: starts once the rest is ready
};

// Pulls at least this large hash on a second thread.
constexpr int64_t kBackgroundHashBytes = int64_t{8} << 20;

template <typename Request, typename Response>
using UnaryMethod = grpc::Status (v1::ModelRegistry::Stub::*)(
    grpc::ClientContext*, const Request&, Response*);

}  // namespace

ModelWatch::ModelWatch(v1::ModelRegistry::Stub* stub,
                       std::unique_ptr<grpc::ClientContext> context,
                       v1::WatchModelRequest request)
    : stub_(stub), context_(std::move(context)), request_(std::move(request)) {}

ModelWatch::ModelWatch(absl::Status failure)
    : finished_(true), status_(std::move(failure)) {}

ModelWatch::~ModelWatch() {
  if (finished_ || reader_ == nullptr) return;
  context_->TryCancel();
  v1::WatchModelResponse ignored;
  while (reader_->Read(&ignored)) {
  }
  reader_->Finish();
}

bool ModelWatch::Next(v1::WatchModelResponse* response) {
  if (finished_) return false;
  if (reader_ == nullptr) {
    // Blocks until the request is sent: while the channel connects, or
    // until Cancel() (a context cancelled earlier cancels the call at once).
    reader_ = stub_->WatchModel(context_.get(), request_);
  }
  if (reader_->Read(response)) return true;
  status_ = FromGrpcStatus(reader_->Finish());
  finished_ = true;
  return false;
}

void ModelWatch::Cancel() {
  if (context_ != nullptr) context_->TryCancel();
}

absl::Status ModelWatch::status() const { return status_; }

RegistryClient::RegistryClient(ClientOptions options)
    : options_(std::move(options)) {
  auto channel = MakeChannel(options_);
  if (!channel.ok()) {
    channel_status_ = channel.status();
    return;
  }
  stub_ = v1::ModelRegistry::NewStub(*channel);
}

absl::StatusOr<v1::ModelRegistry::Stub*> RegistryClient::stub() {
  if (!channel_status_.ok()) return channel_status_;
  return stub_.get();
}

absl::Duration RegistryClient::TransferTimeout(int64_t bytes) const {
  if (options_.timeout == absl::InfiniteDuration()) return options_.timeout;
  return options_.timeout +
         absl::Seconds(static_cast<double>(bytes) / (4 << 20));
}

namespace {

template <typename Request, typename Response>
absl::StatusOr<Response> CallUnary(v1::ModelRegistry::Stub* stub,
                                   const ClientOptions& options,
                                   UnaryMethod<Request, Response> method,
                                   const Request& request) {
  grpc::ClientContext context;
  PrepareContext(options, &context);
  Response response;
  grpc::Status status = (stub->*method)(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

}  // namespace

absl::StatusOr<v1::ModelVersion> RegistryClient::PushFiles(
    const v1::PushHeader& header,
    const std::vector<std::string>& component_paths, ProgressFn progress) {
  if (header.components_size() != static_cast<int>(component_paths.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the push header lists ", header.components_size(), " components but ",
        component_paths.size(), " files were given"));
  }
  if (component_paths.empty()) {
    return absl::InvalidArgumentError("a model needs at least one file");
  }
  v1::PushHeader filled = header;
  for (size_t i = 0; i < component_paths.size(); ++i) {
    const std::string& path = component_paths[i];
    v1::ComponentSpec* spec = filled.mutable_components(static_cast<int>(i));
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return Errno("read", path);
    if (!S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(path + " is not a regular file");
    }
    if (spec->digest().empty()) {
      int64_t size = 0;
      ASSIGN_OR_RETURN(std::string digest, Sha256File(path, &size));
      spec->set_digest(digest);
      spec->set_size(size);
    } else if (spec->size() == 0) {
      spec->set_size(st.st_size);
    }
    if (spec->size() != st.st_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, " has ", st.st_size, " bytes but the header says ",
                       spec->size()));
    }
  }
  auto result = PushOnce(filled, component_paths, /*send_all=*/false, progress);
  // A blob that was present when asked can be collected before the push
  // commits; the registry then asks for its bytes, so send everything once.
  if (!result.ok() &&
      result.status().code() == absl::StatusCode::kFailedPrecondition &&
      absl::StrContains(result.status().message(), "not stored")) {
    result = PushOnce(filled, component_paths, /*send_all=*/true, progress);
  }
  return result;
}

absl::StatusOr<v1::ModelVersion> RegistryClient::PushOnce(
    const v1::PushHeader& header,
    const std::vector<std::string>& component_paths, bool send_all,
    const ProgressFn& progress) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  // The first component index of each distinct digest.
  std::map<std::string, int> first_index;
  for (int i = 0; i < header.components_size(); ++i) {
    first_index.emplace(header.components(i).digest(), i);
  }
  std::set<std::string> present;
  if (!send_all) {
    std::vector<std::string> digests;
    for (const auto& [digest, index] : first_index) digests.push_back(digest);
    ASSIGN_OR_RETURN(std::vector<std::string> found, HasBlobs(digests));
    present.insert(found.begin(), found.end());
  }
  std::vector<int> to_send;
  int64_t total = 0;
  for (const auto& [digest, index] : first_index) {
    if (present.count(digest)) continue;
    to_send.push_back(index);
    total += header.components(index).size();
  }
  std::sort(to_send.begin(), to_send.end());

  grpc::ClientContext context;
  PrepareContext(options_, &context, TransferTimeout(total));
  v1::PushModelResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PushModelRequest>> writer =
      stub->PushModel(&context, &response);
  v1::PushModelRequest request;
  *request.mutable_header() = header;
  bool sending = writer->Write(request);
  absl::Status local_error;
  int64_t done = 0;
  if (progress) progress(0, total);
  for (size_t k = 0; sending && k < to_send.size(); ++k) {
    const int index = to_send[k];
    const std::string& path = component_paths[index];
    Fd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) {
      local_error = Errno("open", path);
      break;
    }
    v1::Chunk* chunk = request.mutable_chunk();
    chunk->set_component(index);
    int64_t offset = 0;
    while (sending) {
      std::string* data = chunk->mutable_data();
      data->resize(kChunkBytes);
      ssize_t n = read(fd.get(), data->data(), kChunkBytes);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        local_error = Errno("read", path);
        break;
      }
      if (n == 0) break;
      data->resize(static_cast<size_t>(n));
      chunk->set_offset(offset);
      sending = writer->Write(request);
      offset += n;
      done += n;
      if (progress) progress(done, total);
    }
    if (!local_error.ok()) break;
  }
  if (!local_error.ok()) {
    // Cancel so the registry discards what it received.
    context.TryCancel();
    writer->Finish();
    return local_error;
  }
  writer->WritesDone();
  grpc::Status status = writer->Finish();
  if (!status.ok()) return FromGrpcStatus(status);
  return response.model();
}

absl::StatusOr<v1::ModelVersion> RegistryClient::GetModel(
    const std::string& ref) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  v1::GetModelRequest request;
  request.set_ref(ref);
  return CallUnary(stub, options_, &v1::ModelRegistry::Stub::GetModel, request);
}

absl::Status RegistryClient::PullComponent(const std::string& ref,
                                           const std::string& digest,
                                           const std::string& dest_path,
                                           ProgressFn progress) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  ASSIGN_OR_RETURN(v1::ModelVersion model, GetModel(ref));
  int64_t size = -1;
  for (const v1::Component& component : model.components()) {
    if (component.digest() == digest) size = component.size();
  }
  if (size < 0) {
    return absl::NotFoundError(absl::StrCat(model.name(), ":", model.version(),
                                            " has no component ", digest));
  }
  // Pin the version just read, so a ref that moves meanwhile cannot mix two
  // versions.
  v1::PullModelRequest request;
  request.set_ref(absl::StrCat(model.name(), ":", model.version()));
  request.add_digests(digest);

  std::string temp_path = dest_path + ".tmp-XXXXXX";
  Fd fd(mkstemp(temp_path.data()));
  if (fd.get() < 0) return Errno("create a temporary file beside", dest_path);
  fchmod(fd.get(), 0644);
  bool keep = false;
  struct Cleanup {
    const std::string& path;
    bool& keep;
    ~Cleanup() {
      if (!keep) unlink(path.c_str());
    }
  } cleanup{temp_path, keep};

  grpc::ClientContext context;
  PrepareContext(options_, &context, TransferTimeout(size));
  std::unique_ptr<grpc::ClientReader<v1::PullModelResponse>> reader =
      stub->PullModel(&context, request);
  v1::PullModelResponse response;
  bool have_header = false;
  v1::ModelVersion header;
  Sha256 hash;
  std::unique_ptr<BackgroundHash> background;
  if (size >= kBackgroundHashBytes)
    background = std::make_unique<BackgroundHash>();
  int64_t written = 0;
  absl::Status local_error;
  if (progress) progress(0, size);
  while (reader->Read(&response)) {
    if (response.has_header()) {
      header = response.header();
      have_header = true;
      continue;
    }
    const v1::Chunk& chunk = response.chunk();
    if (!have_header || chunk.component() < 0 ||
        chunk.component() >= header.components_size() ||
        header.components(chunk.component()).digest() != digest ||
        chunk.offset() != written) {
      local_error = absl::InternalError(
          "the registry sent a chunk out of order or for another component");
      break;
    }
    if (absl::Status s = WriteAll(fd.get(), chunk.data().data(),
                                  chunk.data().size(), temp_path);
        !s.ok()) {
      local_error = s;
      break;
    }
    written += static_cast<int64_t>(chunk.data().size());
    if (background != nullptr) {
      // The buffer comes back empty (or a used one), for the next message to
      // be parsed into.
      background->Add(response.mutable_chunk()->mutable_data());
    } else {
      hash.Update(chunk.data());
    }
    if (progress) progress(written, size);
  }
  if (!local_error.ok()) {
    context.TryCancel();
    while (reader->Read(&response)) {
    }
    reader->Finish();
    return local_error;
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return FromGrpcStatus(status);
  if (written != size) {
    return absl::DataLossError(
        absl::StrCat("received ", written, " of ", size, " bytes of ", digest));
  }
  const std::string got =
      background != nullptr ? background->Digest() : hash.Digest();
  if (got != digest) {
    return absl::DataLossError(
        absl::StrCat("received bytes hash to ", got, ", expected ", digest));
  }
  if (close(fd.release()) != 0) return Errno("write", temp_path);
  if (rename(temp_path.c_str(), dest_path.c_str()) != 0) {
    return Errno("rename a temporary file to", dest_path);
  }
  keep = true;
  return absl::OkStatus();
}

absl::StatusOr<v1::Alias> RegistryClient::SetAlias(const std::string& name,
                                                   const std::string& alias,
                                                   int64_t version) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  v1::SetAliasRequest request;
  request.set_name(name);
  request.set_alias(alias);
  request.set_version(version);
  return CallUnary(stub, options_, &v1::ModelRegistry::Stub::SetAlias, request);
}

absl::Status RegistryClient::DeleteAlias(const std::string& name,
                                         const std::string& alias) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  v1::DeleteAliasRequest request;
  request.set_name(name);
  request.set_alias(alias);
  return CallUnary(stub, options_, &v1::ModelRegistry::Stub::DeleteAlias,
                   request)
      .status();
}

absl::Status RegistryClient::DeleteVersion(const std::string& name,
                                           int64_t version) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  v1::DeleteVersionRequest request;
  request.set_name(name);
  request.set_version(version);
  return CallUnary(stub, options_, &v1::ModelRegistry::Stub::DeleteVersion,
                   request)
      .status();
}

std::unique_ptr<ModelWatch> RegistryClient::Watch(const std::string& ref) {
  auto context = std::make_unique<grpc::ClientContext>();
  // A watch lasts as long as its caller wants; keepalive pings notice a
  // registry that vanished.
  PrepareContext(options_, context.get(), absl::InfiniteDuration());
  auto stub_or = stub();
  if (!stub_or.ok()) return std::make_unique<ModelWatch>(stub_or.status());
  v1::WatchModelRequest request;
  request.set_ref(ref);
  return std::make_unique<ModelWatch>(*stub_or, std::move(context),
                                      std::move(request));
}

absl::StatusOr<std::vector<std::string>> RegistryClient::HasBlobs(
    const std::vector<std::string>& digests) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  v1::HasBlobsRequest request;
  for (const std::string& digest : digests) request.add_digests(digest);
  ASSIGN_OR_RETURN(
      v1::HasBlobsResponse response,
      CallUnary(stub, options_, &v1::ModelRegistry::Stub::HasBlobs, request));
  return std::vector<std::string>(response.present().begin(),
                                  response.present().end());
}

absl::StatusOr<v1::ListModelsResponse> RegistryClient::ListModels() {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  return CallUnary(stub, options_, &v1::ModelRegistry::Stub::ListModels,
                   v1::ListModelsRequest());
}

absl::StatusOr<v1::ListVersionsResponse> RegistryClient::ListVersions(
    const std::string& name, int page_size, const std::string& page_token) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  v1::ListVersionsRequest request;
  request.set_name(name);
  request.set_page_size(page_size);
  request.set_page_token(page_token);
  return CallUnary(stub, options_, &v1::ModelRegistry::Stub::ListVersions,
                   request);
}

absl::StatusOr<v1::GarbageCollectResponse> RegistryClient::GarbageCollect(
    int64_t grace_seconds, bool dry_run) {
  ASSIGN_OR_RETURN(v1::ModelRegistry::Stub * stub, stub());
  v1::GarbageCollectRequest request;
  request.set_grace_seconds(grace_seconds);
  request.set_dry_run(dry_run);
  return CallUnary(stub, options_, &v1::ModelRegistry::Stub::GarbageCollect,
                   request);
}

}  // namespace kennel
