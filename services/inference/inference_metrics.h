// The inference service's Prometheus families (names fixed by the deployment
// dashboards and alerts). Thread-safe: prometheus-cpp metrics are.
#ifndef KENNEL_SERVICES_INFERENCE_INFERENCE_METRICS_H_
#define KENNEL_SERVICES_INFERENCE_INFERENCE_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace kennel::inference {

struct InferenceMetrics {
  explicit InferenceMetrics(prometheus::Registry& registry);

  prometheus::Family<prometheus::Histogram>& latency;
  prometheus::Histogram& decode_seconds;
  prometheus::Histogram& queue_seconds;
  prometheus::Histogram& model_seconds;
  prometheus::Histogram& total_seconds;

  prometheus::Histogram& batch_size;
  prometheus::Gauge& queue_depth;

  prometheus::Family<prometheus::Gauge>& model_info;
  prometheus::Gauge& model_ready;
  prometheus::Family<prometheus::Counter>& loads;
  prometheus::Counter& loads_success;
  prometheus::Counter& loads_failure;

  prometheus::Family<prometheus::Counter>& rejected;
  prometheus::Counter& rejected_queue_full;
  prometheus::Counter& rejected_deadline;
  prometheus::Counter& rejected_too_large;
  prometheus::Counter& rejected_bad_image;
};

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_INFERENCE_METRICS_H_
