// kennel-registry: versioned TorchScript artifacts on S3 or a local folder.
#include <glog/logging.h>

#include "common/server_flags.h"
#include "kennel/v1/registry.grpc.pb.h"

int main(int argc, char** argv) {
  kennel::InitServerProcess(
      argc, argv,
      "kennel-registry: stores versioned models and serves them over gRPC.\n"
      "Usage: kennel-registry [--listen=HOST:PORT] [--storage=URL] ...");
  auto auth = kennel::TokenAuthFromFlags();
  if (!auth.ok()) {
    LOG(ERROR) << auth.status();
    return 2;
  }
  kennel::Server server(kennel::ServerOptionsFromFlags(
      "kennel-registry", "127.0.0.1:50051", "127.0.0.1:9101"));
  kennel::v1::ModelRegistry::Service service;
  server.AddService(&service, "kennel.v1.ModelRegistry");
  if (absl::Status s = server.Start(); !s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  server.Wait();
  return 0;
}
