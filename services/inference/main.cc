// kennel-inference: classifies image bytes with the model it follows.
#include <glog/logging.h>

#include "common/server_flags.h"
#include "kennel/v1/inference.grpc.pb.h"

int main(int argc, char** argv) {
  kennel::InitServerProcess(
      argc, argv,
      "kennel-inference: serves an image classifier over gRPC.\n"
      "Usage: kennel-inference [--listen=HOST:PORT] [--registry=HOST:PORT --model=REF | --model-path=FILE] ...");
  auto auth = kennel::TokenAuthFromFlags();
  if (!auth.ok()) {
    LOG(ERROR) << auth.status();
    return 2;
  }
  kennel::Server server(kennel::ServerOptionsFromFlags(
      "kennel-inference", "127.0.0.1:50053", "127.0.0.1:9103"));
  kennel::v1::Classifier::Service service;
  server.AddService(&service, "kennel.v1.Classifier");
  if (absl::Status s = server.Start(); !s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  server.Wait();
  return 0;
}
