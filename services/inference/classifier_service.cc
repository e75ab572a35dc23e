#include "services/inference/classifier_service.h"

#include <glog/logging.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <numeric>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/image/image.h"
#include "common/names.h"
#include "common/status.h"

namespace kennel::inference {
namespace {

constexpr int kDefaultTopK = 5;

absl::Time DeadlineOf(const grpc::ServerContext& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(deadline);
}

int64_t Micros(absl::Duration d) { return absl::ToInt64Microseconds(d); }

// NOT_FOUND unless `ref` names the version being served.
absl::Status CheckRef(const std::string& ref, const LoadedModel& model) {
  ASSIGN_OR_RETURN(ModelRef parsed, ParseModelRef(ref));
  const std::string serving = absl::StrCat(model.name, ":", model.version);
  auto not_served = [&] {
    return absl::NotFoundError(absl::StrCat("this server serves ", serving,
                                            " (following ", model.source,
                                            "), not ", ref));
  };
  if (parsed.name != model.name) return not_served();
  if (parsed.version > 0 && parsed.version != model.version) {
    return not_served();
  }
  if (!parsed.alias.empty() && ref != model.source &&
      std::find(model.aliases.begin(), model.aliases.end(), parsed.alias) ==
          model.aliases.end()) {
    return not_served();
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<kennel::v1::Prediction> TopK(const std::vector<float>& logits,
                                         const std::vector<std::string>& labels,
                                         int k) {
  std::vector<kennel::v1::Prediction> out;
  if (logits.empty()) return out;
  // Softmax with the maximum subtracted, so large logits cannot overflow.
  const float max = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    p[i] = std::exp(static_cast<double>(logits[i]) - max);
    sum += p[i];
  }
  k = std::clamp<int>(k, 0, static_cast<int>(logits.size()));
  std::vector<int> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(
      order.begin(), order.begin() + k, order.end(),
      [&](int a, int b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
  for (int i = 0; i < k; ++i) {
    kennel::v1::Prediction prediction;
    prediction.set_index(order[i]);
    if (order[i] < static_cast<int>(labels.size())) {
      prediction.set_label(labels[order[i]]);
    }
    prediction.set_score(static_cast<float>(p[order[i]] / sum));
    out.push_back(std::move(prediction));
  }
  return out;
}

ClassifierService::ClassifierService(ModelManager* manager, Batcher* batcher,
                                     InferenceMetrics* metrics,
                                     ServiceOptions options)
    : manager_(manager),
      batcher_(batcher),
      metrics_(metrics),
      options_(std::move(options)) {}

// Holds one of the decode slots for its lifetime.
class ClassifierService::DecodeSlot {
 public:
  explicit DecodeSlot(ClassifierService* service) : service_(service) {
    absl::MutexLock lock(&service_->decode_mu_);
    service_->decode_mu_.Await(absl::Condition(
        +[](ClassifierService* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->decode_mu_) {
          return s->decoding_ < s->options_.max_concurrent_decodes;
        },
        service_));
    ++service_->decoding_;
  }
  ~DecodeSlot() {
    absl::MutexLock lock(&service_->decode_mu_);
    --service_->decoding_;
  }

 private:
  ClassifierService* const service_;
};

absl::StatusOr<PreparedRequest> ClassifierService::Prepare(
    const kennel::v1::ClassifyRequest& request, absl::Time start) {
  PreparedRequest prepared;
  prepared.start = start;
  prepared.request_id = request.request_id();
  prepared.model = manager_->Current();
  if (prepared.model == nullptr) {
    const ManagerStatus status = manager_->Status();
    std::string why = "; retry shortly";
    if (!status.last_error.empty()) {
      why = absl::StrCat("; the last load failed: ", status.last_error);
    } else if (!status.waiting_for.empty()) {
      why = absl::StrCat("; ", status.waiting_for);
    }
    return absl::UnavailableError(absl::StrCat(
        "no model is loaded yet (following ", options_.source, ")", why));
  }
  const LoadedModel& model = *prepared.model;
  if (!request.model_ref().empty()) {
    RETURN_IF_ERROR(CheckRef(request.model_ref(), model));
  }
  if (request.top_k() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_k must be 0 (meaning 5) or more, not ", request.top_k()));
  }
  prepared.top_k = request.top_k() == 0 ? kDefaultTopK : request.top_k();
  prepared.top_k =
      std::min(prepared.top_k, static_cast<int>(model.labels.size()));

  const std::string& bytes = request.image();
  auto reject = [&](prometheus::Counter* counter, absl::Status status) {
    if (metrics_ != nullptr) counter->Increment();
    return status;
  };
  if (bytes.empty()) {
    return reject(metrics_ ? &metrics_->rejected_bad_image : nullptr,
                  absl::InvalidArgumentError("the request has no image bytes"));
  }
  if (static_cast<int64_t>(bytes.size()) > options_.max_image_bytes) {
    return reject(metrics_ ? &metrics_->rejected_too_large : nullptr,
                  absl::InvalidArgumentError(absl::StrCat(
                      "the image is ", bytes.size(),
                      " bytes; this server accepts at "
                      "most ",
                      options_.max_image_bytes, " (--max-image-bytes)")));
  }
  if (absl::Status s = image::CheckContentType(bytes, request.content_type());
      !s.ok()) {
    return reject(metrics_ ? &metrics_->rejected_bad_image : nullptr, s);
  }
  // Dimensions come from the header, before any pixel is decoded.
  if (auto info = image::Probe(bytes); info.ok()) {
    const int64_t pixels = int64_t{info->width} * info->height;
    if (pixels > options_.max_pixels) {
      return reject(metrics_ ? &metrics_->rejected_too_large : nullptr,
                    absl::InvalidArgumentError(absl::StrCat(
                        "the image is ", info->width, "x", info->height, " = ",
                        pixels, " pixels; this server accepts at most ",
                        options_.max_pixels, " (--max-pixels)")));
    }
  }
  const int64_t floats = image::TensorSize(model.preprocessing);
  prepared.input.resize(floats);
  image::DecodeLimits limits;
  limits.max_bytes = options_.max_image_bytes;
  limits.max_pixels = options_.max_pixels;
  absl::Status decoded;
  {
    DecodeSlot slot(this);
    decoded = image::DecodeAndPreprocess(bytes, model.preprocessing, limits,
                                         prepared.input.data());
  }
  prepared.decode_time = absl::Now() - start;
  if (metrics_ != nullptr) {
    metrics_->decode_seconds.Observe(
        absl::ToDoubleSeconds(prepared.decode_time));
  }
  if (!decoded.ok()) {
    return reject(metrics_ ? &metrics_->rejected_bad_image : nullptr, decoded);
  }
  return prepared;
}

void ClassifierService::Answer(const PreparedRequest& prepared,
                               const BatchOutput& output,
                               kennel::v1::ClassifyResponse* response) {
  const LoadedModel& model = *prepared.model;
  for (auto& p : TopK(output.logits, model.labels, prepared.top_k)) {
    *response->add_predictions() = std::move(p);
  }
  response->set_model_name(model.name);
  response->set_model_version(model.version);
  response->set_model_digest(model.digest);
  response->set_precision(model.precision);
  response->set_request_id(prepared.request_id);
  const absl::Duration total = absl::Now() - prepared.start;
  kennel::v1::Timings* t = response->mutable_timings();
  t->set_decode_us(Micros(prepared.decode_time));
  t->set_queue_us(Micros(output.queue_time));
  t->set_model_us(Micros(output.model_time));
  t->set_total_us(Micros(total));
  t->set_batch_size(output.batch_size);
  if (metrics_ != nullptr) {
    metrics_->total_seconds.Observe(absl::ToDoubleSeconds(total));
  }
}

grpc::Status ClassifierService::Classify(
    grpc::ServerContext* context, const kennel::v1::ClassifyRequest* request,
    kennel::v1::ClassifyResponse* response) {
  const absl::Time start = absl::Now();
  Batcher::Arrival arrival(batcher_);
  absl::StatusOr<PreparedRequest> prepared = Prepare(*request, start);
  if (!prepared.ok()) return ToGrpcStatus(prepared.status());
  absl::StatusOr<BatchOutput> output =
      batcher_->Run(prepared->model, std::move(prepared->input),
                    DeadlineOf(*context), &arrival);
  if (!output.ok()) return ToGrpcStatus(output.status());
  Answer(*prepared, *output, response);
  return grpc::Status::OK;
}

// One ClassifyStream call: the handler thread reads and decodes, the batcher
// computes, and a writer thread sends the answers as they complete, so the
// worker never blocks on a slow client.
struct ClassifierService::StreamState {
  int max_in_flight = 1;
  absl::Mutex mu;
  std::deque<kennel::v1::ClassifyResponse> outbox ABSL_GUARDED_BY(mu);
  int in_flight ABSL_GUARDED_BY(mu) = 0;
  bool reading_done ABSL_GUARDED_BY(mu) = false;
  bool draining ABSL_GUARDED_BY(mu) = false;

  void Push(kennel::v1::ClassifyResponse response) {
    absl::MutexLock lock(&mu);
    outbox.push_back(std::move(response));
  }
};

grpc::Status ClassifierService::ClassifyStream(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<kennel::v1::ClassifyResponse,
                             kennel::v1::ClassifyRequest>* stream) {
  // Shared with the batcher's callbacks, which may still be returning from
  // their last unlock when the handler ends.
  auto state_ptr = std::make_shared<StreamState>();
  StreamState& state = *state_ptr;
  state.max_in_flight = std::max(1, options_.max_stream_in_flight);
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is shutting down");
    }
    streams_.insert(&state);
  }
  auto error_response = [](const std::string& id, const absl::Status& s) {
    kennel::v1::ClassifyResponse r;
    r.set_request_id(id);
    r.set_error_code(static_cast<int>(s.code()));
    r.set_error_message(std::string(s.message()).substr(0, 1024));
    return r;
  };

  std::thread writer([&] {
    bool broken = false;
    while (true) {
      kennel::v1::ClassifyResponse next;
      {
        absl::MutexLock lock(&state.mu);
        state.mu.Await(absl::Condition(
            +[](StreamState* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) {
              return !s->outbox.empty() ||
                     (s->in_flight == 0 && (s->reading_done || s->draining));
            },
            &state));
        if (state.outbox.empty()) {
          // Everything answered: end a draining stream so its reader
          // returns; otherwise reading is over and so is the stream.
          if (state.draining && !state.reading_done) context->TryCancel();
          return;
        }
        next = std::move(state.outbox.front());
        state.outbox.pop_front();
      }
      if (!broken && !stream->Write(next)) broken = true;
    }
  });

  kennel::v1::ClassifyRequest request;
  while (true) {
    {
      // Backpressure: stop reading while too many answers are pending.
      absl::MutexLock lock(&state.mu);
      state.mu.Await(absl::Condition(
          +[](StreamState* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) {
            return s->in_flight < s->max_in_flight || s->draining;
          },
          &state));
    }
    if (!stream->Read(&request)) break;
    bool draining;
    {
      absl::MutexLock lock(&state.mu);
      draining = state.draining;
    }
    if (draining) {
      state.Push(error_response(
          request.request_id(),
          absl::UnavailableError("the server is shutting down")));
      continue;
    }
    Batcher::Arrival arrival(batcher_);
    absl::StatusOr<PreparedRequest> prepared = Prepare(request, absl::Now());
    if (!prepared.ok()) {
      state.Push(error_response(request.request_id(), prepared.status()));
      continue;
    }
    auto shared = std::make_shared<PreparedRequest>(*std::move(prepared));
    BatchItem item;
    item.model = shared->model;
    item.input = std::move(shared->input);
    item.deadline = DeadlineOf(*context);
    item.done = [this, shared, state_ptr,
                 error_response](absl::StatusOr<BatchOutput> output) {
      StreamState& state = *state_ptr;
      kennel::v1::ClassifyResponse response;
      if (output.ok()) {
        Answer(*shared, *output, &response);
      } else {
        response = error_response(shared->request_id, output.status());
      }
      absl::MutexLock lock(&state.mu);
      state.outbox.push_back(std::move(response));
      --state.in_flight;
    };
    {
      absl::MutexLock lock(&state.mu);
      ++state.in_flight;
    }
    if (absl::Status s = batcher_->Submit(std::move(item), &arrival); !s.ok()) {
      absl::MutexLock lock(&state.mu);
      --state.in_flight;
      state.outbox.push_back(error_response(request.request_id(), s));
    }
  }
  {
    absl::MutexLock lock(&state.mu);
    state.reading_done = true;
  }
  writer.join();
  {
    absl::MutexLock lock(&mu_);
    streams_.erase(&state);
  }
  return grpc::Status::OK;
}

void ClassifierService::BeginDrain() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  for (StreamState* state : streams_) {
    absl::MutexLock stream_lock(&state->mu);
    state->draining = true;
  }
}

grpc::Status ClassifierService::GetModelStatus(
    grpc::ServerContext* context,
    const kennel::v1::GetModelStatusRequest* request,
    kennel::v1::ModelStatus* response) {
  const ManagerStatus status = manager_->Status();
  response->set_source(options_.source);
  response->set_last_error(status.last_error);
  response->set_last_failed_version(status.last_failed_version);
  if (status.current == nullptr) {
    response->set_ready(false);
    return grpc::Status::OK;
  }
  const LoadedModel& model = *status.current;
  response->set_ready(true);
  if (!model.source.empty()) response->set_source(model.source);
  response->set_model_name(model.name);
  response->set_model_version(model.version);
  response->set_model_digest(model.digest);
  const int64_t nanos = absl::ToUnixNanos(model.loaded_at);
  response->mutable_loaded_at()->set_seconds(nanos / 1000000000);
  response->mutable_loaded_at()->set_nanos(
      static_cast<int32_t>(nanos % 1000000000));
  response->set_load_seconds(model.load_seconds);
  response->set_precision(model.precision);
  for (const std::string& label : model.labels) response->add_labels(label);
  *response->mutable_preprocessing() = model.preprocessing;
  response->set_bf16_agreement(model.bf16_agreement);
  return grpc::Status::OK;
}

}  // namespace kennel::inference
