#include "services/inference/inference_metrics.h"

#include "common/metrics.h"

namespace kennel::inference {
namespace {

prometheus::Family<prometheus::Counter>& Loads(prometheus::Registry& r) {
  return prometheus::BuildCounter()
      .Name("kennel_inference_model_loads_total")
      .Help("Attempts to load a model version, by result (success|failure).")
      .Register(r);
}

prometheus::Family<prometheus::Counter>& Rejected(prometheus::Registry& r) {
  return prometheus::BuildCounter()
      .Name("kennel_inference_requests_rejected_total")
      .Help(
          "Requests refused before or instead of the model, by reason "
          "(queue_full|deadline|too_large|bad_image).")
      .Register(r);
}

}  // namespace

InferenceMetrics::InferenceMetrics(prometheus::Registry& registry)
    : latency(prometheus::BuildHistogram()
                  .Name("kennel_inference_latency_seconds")
                  .Help("Time per request by stage: decode (decode and "
                        "preprocess), queue (waiting for a batch), model "
                        "(the batch's forward pass), total.")
                  .Register(registry)),
      decode_seconds(latency.Add({{"stage", "decode"}}, LatencyBuckets())),
      queue_seconds(latency.Add({{"stage", "queue"}}, LatencyBuckets())),
      model_seconds(latency.Add({{"stage", "model"}}, LatencyBuckets())),
      total_seconds(latency.Add({{"stage", "total"}}, LatencyBuckets())),
      batch_size(prometheus::BuildHistogram()
                     .Name("kennel_inference_batch_size")
                     .Help("Images per forward pass.")
                     .Register(registry)
                     .Add({},
                          prometheus::Histogram::BucketBoundaries{
                              1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64})),
      queue_depth(prometheus::BuildGauge()
                      .Name("kennel_inference_queue_depth")
                      .Help("Requests waiting for a batch.")
                      .Register(registry)
                      .Add({})),
      model_info(prometheus::BuildGauge()
                     .Name("kennel_inference_model_info")
                     .Help("1 for the model version being served.")
                     .Register(registry)),
      model_ready(prometheus::BuildGauge()
                      .Name("kennel_inference_model_ready")
                      .Help("1 once a model is loaded and serving.")
                      .Register(registry)
                      .Add({})),
      loads(Loads(registry)),
      loads_success(loads.Add({{"result", "success"}})),
      loads_failure(loads.Add({{"result", "failure"}})),
      rejected(Rejected(registry)),
      rejected_queue_full(rejected.Add({{"reason", "queue_full"}})),
      rejected_deadline(rejected.Add({{"reason", "deadline"}})),
      rejected_too_large(rejected.Add({{"reason", "too_large"}})),
      rejected_bad_image(rejected.Add({{"reason", "bad_image"}})) {}

}  // namespace kennel::inference
