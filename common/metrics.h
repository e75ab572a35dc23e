// Prometheus metrics for a Kennel service: one registry, the HTTP endpoint
// that serves it at /metrics, standard process metrics, and the gRPC server
// interceptor that counts and times every RPC.
#ifndef KENNEL_COMMON_METRICS_H_
#define KENNEL_COMMON_METRICS_H_

#include <grpcpp/support/server_interceptor.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace prometheus {
class Exposer;
}  // namespace prometheus

namespace kennel {

// Bucket bounds (seconds) for request latencies: 0.5 ms to 60 s.
prometheus::Histogram::BucketBoundaries LatencyBuckets();

// Families recorded by the RPC interceptor. Thread-safe: prometheus-cpp
// families and metrics are.
struct RpcMetrics {
  explicit RpcMetrics(prometheus::Registry& registry);

  // Gives the methods of the service with this full name ("kennel.v1.
  // Trainer") labels of their own; gRPC's health and reflection methods
  // always have them. Every other method a client sends is counted as
  // "unknown", so clients cannot add series. Call before the server starts.
  void Serve(absl::string_view service);

  // Records one finished RPC. `full_method` is "/package.Service/Method".
  void Record(absl::string_view full_method, int code, double seconds);
  // The service and method labels of `full_method`.
  std::pair<std::string, std::string> Labels(
      absl::string_view full_method) const;

  prometheus::Family<prometheus::Counter>& started;
  prometheus::Family<prometheus::Counter>& handled;
  prometheus::Family<prometheus::Histogram>& latency;

 private:
  // "/package.Service/Method" of every labelled method.
  absl::flat_hash_set<std::string> served_;
};

// Owns the registry and its exposer. Create one per process; pass registry()
// to the parts that export metrics. Thread-safe after Start().
class Metrics {
 public:
  // `service` is stamped on the kennel_build_info gauge ("kennel-registry").
  explicit Metrics(std::string service);
  ~Metrics();

  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Serves /metrics on HOST:PORT (port 0 picks a free one). An empty address
  // serves nothing, which tests use.
  absl::Status Start(const std::string& listen);
  // The bound port, or 0 when not serving.
  int port() const { return port_; }

  prometheus::Registry& registry() { return *registry_; }
  RpcMetrics& rpc() { return *rpc_; }

  // A factory for grpc::ServerBuilder::experimental().
  // SetInterceptorCreators().
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
  NewInterceptorFactory();

  // The text exposition, as a scrape would return it (for tests and tools).
  std::string Scrape() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_;
  std::unique_ptr<RpcMetrics> rpc_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace kennel

#endif  // KENNEL_COMMON_METRICS_H_
