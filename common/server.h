// Runs a Kennel gRPC server: health and reflection services, the metrics
// interceptor and endpoint, optional TLS, keepalive, and a graceful drain on
// SIGTERM/SIGINT. Every binary builds one of these in main.cc.
#ifndef KENNEL_COMMON_SERVER_H_
#define KENNEL_COMMON_SERVER_H_

#include <grpcpp/server.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"

namespace grpc {
class Service;
}  // namespace grpc

namespace kennel {

struct ServerOptions {
  // Used in logs and on kennel_build_info ("kennel-registry").
  std::string name;
  // HOST:PORT for gRPC; ":PORT" means every interface; port 0 picks one.
  std::string listen = "127.0.0.1:0";
  // HOST:PORT for /metrics; empty serves no metrics.
  std::string metrics_listen;
  // PEM files; both or neither. With them the server speaks TLS only.
  std::string tls_cert;
  std::string tls_key;
  int max_message_bytes = 16 << 20;
  absl::Duration keepalive_time = absl::Seconds(30);
  absl::Duration keepalive_timeout = absl::Seconds(10);
  // How long in-flight calls may take to finish after a stop signal.
  absl::Duration drain_grace = absl::Seconds(30);
};

// Health-check name that reports whether the process is alive, as opposed to
// ready to serve.
inline constexpr char kLivenessService[] = "liveness";

// Turns ":PORT" into "0.0.0.0:PORT"; leaves anything else alone.
std::string NormalizeListenAddress(const std::string& address);

// Lifecycle: construct, AddService..., Start, then Wait (blocks until a
// signal or Shutdown, then drains). Thread-safe after Start.
class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The service must outlive the server. Call before Start. `health_name` is
  // the service's full name ("kennel.v1.ModelRegistry"): health checks use
  // it, and the RPC metrics label its methods.
  void AddService(grpc::Service* service, std::string health_name);

  // Runs when draining begins, before the server stops accepting; services
  // use it to end their long-lived streams.
  void OnDrain(std::function<void()> callback);

  Metrics& metrics() { return metrics_; }

  // Binds, starts serving, logs the bound ports.
  absl::Status Start();
  int port() const { return port_; }
  int metrics_port() const { return metrics_.port(); }

  // Sets the health status of every registered service and of "" (readiness).
  // A server starts SERVING unless initially_serving was cleared before Start.
  // The health name "liveness" (kLivenessService) is SERVING from Start until
  // the drain whatever readiness says, so a liveness probe does not restart a
  // process that is only waiting (inference before its first model).
  void SetServing(bool serving);
  void set_initially_serving(bool serving) { initially_serving_ = serving; }

  // Blocks until SIGTERM or SIGINT arrives (see BlockStopSignals) or
  // Shutdown() is called; then reports NOT_SERVING, lets in-flight calls
  // finish for up to drain_grace, and returns.
  void Wait();
  // Begins the drain from any thread. Idempotent.
  void Shutdown();

  grpc::Server* grpc_server() { return server_.get(); }

 private:
  void Drain(absl::Duration grace);
  bool stop_requested();

  const ServerOptions options_;
  Metrics metrics_;
  std::vector<std::pair<grpc::Service*, std::string>> services_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool initially_serving_ = true;

  absl::Mutex mu_;
  std::vector<std::function<void()>> drain_callbacks_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_requested_ ABSL_GUARDED_BY(mu_) = false;
};

// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts
// later, so Server::Wait can take them with sigwait. Call first in main.
void BlockStopSignals();

}  // namespace kennel

#endif  // KENNEL_COMMON_SERVER_H_
