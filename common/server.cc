#include "common/server.h"

#include <glog/logging.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <signal.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kennel {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError("cannot read " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace

std::string NormalizeListenAddress(const std::string& address) {
  if (absl::StartsWith(address, ":")) return "0.0.0.0" + address;
  return address;
}

void BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

Server::Server(ServerOptions options)
    : options_(std::move(options)), metrics_(options_.name) {}

Server::~Server() {
  if (server_ == nullptr) return;
  Shutdown();
  Drain(absl::ZeroDuration());
}

void Server::AddService(grpc::Service* service, std::string health_name) {
  metrics_.rpc().Serve(health_name);
  services_.emplace_back(service, std::move(health_name));
}

void Server::OnDrain(std::function<void()> callback) {
  absl::MutexLock lock(&mu_);
  drain_callbacks_.push_back(std::move(callback));
}

absl::Status Server::Start() {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (options_.tls_cert.empty() != options_.tls_key.empty()) {
    return absl::InvalidArgumentError(
        "--tls-cert and --tls-key go together: give both or neither");
  }
  if (!options_.tls_cert.empty()) {
    auto cert = ReadFile(options_.tls_cert);
    if (!cert.ok()) return cert.status();
    auto key = ReadFile(options_.tls_key);
    if (!key.ok()) return key.status();
    grpc::SslServerCredentialsOptions ssl;
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    pair.private_key = *key;
    pair.cert_chain = *cert;
    ssl.pem_key_cert_pairs.push_back(pair);
    credentials = grpc::SslServerCredentials(ssl);
  } else {
    credentials = grpc::InsecureServerCredentials();
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  grpc::ServerBuilder builder;
  const std::string listen = NormalizeListenAddress(options_.listen);
  builder.AddListeningPort(listen, credentials, &port_);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  builder.AddChannelArgument(
      GRPC_ARG_KEEPALIVE_TIME_MS,
      static_cast<int>(absl::ToInt64Milliseconds(options_.keepalive_time)));
  builder.AddChannelArgument(
      GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
      static_cast<int>(absl::ToInt64Milliseconds(options_.keepalive_timeout)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Let clients ping every 10 s to keep long streams (watches, training
  // progress) alive through proxies.
  builder.AddChannelArgument(
      GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  // gRPC sets SO_REUSEPORT by default, which lets a second server silently
  // share a port that is already taken; a busy port must be an error.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  for (auto& [service, name] : services_) builder.RegisterService(service);

  std::vector<
      std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
      interceptors;
  interceptors.push_back(metrics_.NewInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));

  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", listen,
                     " (address in use, or not an address of this machine?)"));
  }
  if (absl::Status s = metrics_.Start(options_.metrics_listen); !s.ok()) {
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    server_.reset();
    return s;
  }
  SetServing(initially_serving_);
  if (auto* health = server_->GetHealthCheckService()) {
    health->SetServingStatus(kLivenessService, true);
  }
  LOG(INFO) << options_.name << " listening on "
            << listen.substr(0, listen.rfind(':')) << ":" << port_
            << (options_.tls_cert.empty() ? " (plaintext)" : " (TLS)")
            << (metrics_.port()
                    ? absl::StrCat("; metrics on ",
                                   options_.metrics_listen.substr(
                                       0, options_.metrics_listen.rfind(':')),
                                   ":", metrics_.port(), "/metrics")
                    : std::string("; metrics off"));
  return absl::OkStatus();
}

void Server::SetServing(bool serving) {
  if (server_ == nullptr) {
    initially_serving_ = serving;
    return;
  }
  auto* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  // Named one by one: the overload without a name would also flip liveness.
  health->SetServingStatus("", serving);
  for (auto& [service, name] : services_) {
    health->SetServingStatus(name, serving);
  }
}

void Server::Shutdown() {
  absl::MutexLock lock(&mu_);
  stop_requested_ = true;
}

bool Server::stop_requested() {
  absl::MutexLock lock(&mu_);
  return stop_requested_;
}

void Server::Wait() {
  if (server_ == nullptr) return;
  // Take stop signals in this thread, polling so Shutdown() also wakes it.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  while (!stop_requested()) {
    timespec timeout{0, 200 * 1000 * 1000};
    int signal = sigtimedwait(&set, nullptr, &timeout);
    if (signal > 0) {
      LOG(INFO) << options_.name << ": " << strsignal(signal)
                << ", draining for up to " << options_.drain_grace;
      break;
    }
  }
  Shutdown();
  Drain(options_.drain_grace);
}

void Server::Drain(absl::Duration grace) {
  std::vector<std::function<void()>> callbacks;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return;
    draining_ = true;
    callbacks.swap(drain_callbacks_);
  }
  // Load balancers and probes see NOT_SERVING first; then long-lived streams
  // end and in-flight unary calls get the grace period to finish.
  if (auto* health = server_->GetHealthCheckService()) health->Shutdown();
  for (auto& callback : callbacks) callback();
  server_->Shutdown(std::chrono::system_clock::now() +
                    absl::ToChronoMilliseconds(grace));
  server_->Wait();
  LOG(INFO) << options_.name << " stopped";
}

}  // namespace kennel
