// kennel.v1.Classifier over gRPC: checks and decodes each image on the
// request thread, hands the tensor to the batcher, and turns the logits into
// top-k answers with the model version that computed them. No LibTorch here.
#ifndef KENNEL_SERVICES_INFERENCE_CLASSIFIER_SERVICE_H_
#define KENNEL_SERVICES_INFERENCE_CLASSIFIER_SERVICE_H_

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kennel/v1/inference.grpc.pb.h"
#include "services/inference/batcher.h"
#include "services/inference/inference_metrics.h"
#include "services/inference/model_manager.h"

namespace kennel::inference {

struct ServiceOptions {
  // What the server follows, for GetModelStatus before a model is loaded.
  std::string source;
  int64_t max_image_bytes = 16 << 20;
  int64_t max_pixels = 40'000'000;
  // Requests of one ClassifyStream that may be queued or running at once;
  // the stream stops reading beyond it (backpressure).
  int max_stream_in_flight = 32;
  // Images decoded at once. More than the cores only adds switching and
  // memory (a 12-megapixel JPEG decodes into 36 MB) and starves the forward
  // pass; requests beyond it wait their turn.
  int max_concurrent_decodes = 2;
};

// A request that passed every check, decoded and ready for the batcher.
struct PreparedRequest {
  std::shared_ptr<const LoadedModel> model;
  std::vector<float> input;
  int top_k = 5;
  std::string request_id;
  absl::Time start;
  absl::Duration decode_time;
};

// The top-k classes of one row of logits, by softmax probability.
std::vector<kennel::v1::Prediction> TopK(const std::vector<float>& logits,
                                         const std::vector<std::string>& labels,
                                         int k);

// Thread-safe.
class ClassifierService final : public kennel::v1::Classifier::Service {
 public:
  // `manager`, `batcher` and `metrics` must outlive the service; `metrics`
  // may be null.
  ClassifierService(ModelManager* manager, Batcher* batcher,
                    InferenceMetrics* metrics, ServiceOptions options);

  grpc::Status Classify(grpc::ServerContext* context,
                        const kennel::v1::ClassifyRequest* request,
                        kennel::v1::ClassifyResponse* response) override;
  grpc::Status ClassifyStream(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<kennel::v1::ClassifyResponse,
                               kennel::v1::ClassifyRequest>* stream) override;
  grpc::Status GetModelStatus(grpc::ServerContext* context,
                              const kennel::v1::GetModelStatusRequest* request,
                              kennel::v1::ModelStatus* response) override;

  // Ends open streams once their answers are written; later images on them
  // are refused with UNAVAILABLE. For Server::OnDrain.
  void BeginDrain();

  // Every check and the decode, on the calling thread. Public for tests.
  absl::StatusOr<PreparedRequest> Prepare(
      const kennel::v1::ClassifyRequest& request, absl::Time start);
  // Fills the answer from the batcher's output.
  void Answer(const PreparedRequest& prepared, const BatchOutput& output,
              kennel::v1::ClassifyResponse* response);

 private:
  struct StreamState;
  class DecodeSlot;

  // Constant after construction.
  ModelManager* const manager_;
  Batcher* const batcher_;
  InferenceMetrics* const metrics_;
  const ServiceOptions options_;

  absl::Mutex decode_mu_;
  int decoding_ ABSL_GUARDED_BY(decode_mu_) = 0;

  absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  std::set<StreamState*> streams_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_CLASSIFIER_SERVICE_H_
