// kennel-trainer: trains classifiers and streams their progress.
#include <glog/logging.h>

#include "common/server_flags.h"
#include "kennel/v1/trainer.grpc.pb.h"

int main(int argc, char** argv) {
  kennel::InitServerProcess(
      argc, argv,
      "kennel-trainer: trains and tunes image classifiers over gRPC.\n"
      "Usage: kennel-trainer [--listen=HOST:PORT] [--registry=HOST:PORT] ...");
  auto auth = kennel::TokenAuthFromFlags();
  if (!auth.ok()) {
    LOG(ERROR) << auth.status();
    return 2;
  }
  kennel::Server server(kennel::ServerOptionsFromFlags(
      "kennel-trainer", "127.0.0.1:50052", "127.0.0.1:9102"));
  kennel::v1::Trainer::Service service;
  server.AddService(&service, "kennel.v1.Trainer");
  if (absl::Status s = server.Start(); !s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  server.Wait();
  return 0;
}
