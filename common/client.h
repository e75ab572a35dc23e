// Channels and call contexts for Kennel clients: the CLI, and services that
// call each other (trainer -> registry, inference -> registry).
#ifndef KENNEL_COMMON_CLIENT_H_
#define KENNEL_COMMON_CLIENT_H_

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kennel {

struct ClientOptions {
  // HOST:PORT.
  std::string address;
  // Bearer token sent on every call; empty sends none.
  std::string token;
  // PEM file of the CA that signed the server's certificate; empty means a
  // plaintext connection.
  std::string tls_ca;
  // Deadline of each unary call.
  absl::Duration timeout = absl::Seconds(30);
  int max_message_bytes = 16 << 20;
};

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const ClientOptions& options);

// Sets the token and a deadline `timeout` from now (none when infinite).
void PrepareContext(const ClientOptions& options, grpc::ClientContext* context,
                    absl::Duration timeout);
inline void PrepareContext(const ClientOptions& options,
                           grpc::ClientContext* context) {
  PrepareContext(options, context, options.timeout);
}

}  // namespace kennel

#endif  // KENNEL_COMMON_CLIENT_H_
