// kennel health: asks a service's grpc.health.v1 endpoint how it is.
#include <grpcpp/grpcpp.h>

#include <iostream>

#include "absl/flags/flag.h"
#include "common/grpc_status.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/cli/command.h"

namespace kennel::cli {
namespace {

int RunHealth(const std::vector<std::string>& args) {
  if (args.size() > 1) return UsageError("health takes at most one SERVICE");
  auto options = ClientOptionsFromFlags(kRegistryAddr);
  if (!options.ok()) return Fail(options.status());
  auto channel = MakeChannel(*options);
  if (!channel.ok()) return Fail(channel.status());
  auto stub = grpc::health::v1::Health::NewStub(*channel);
  grpc::health::v1::HealthCheckRequest request;
  if (!args.empty()) request.set_service(args[0]);
  grpc::health::v1::HealthCheckResponse response;
  grpc::ClientContext context;
  PrepareContext(*options, &context);
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return Fail(FromGrpcStatus(status));
  const std::string name =
      grpc::health::v1::HealthCheckResponse::ServingStatus_Name(
          response.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(response) << "\n";
  } else {
    std::cout << options->address << " " << name << "\n";
  }
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING
             ? kExitOk
             : kExitFailed;
}

KENNEL_CLI_COMMAND(
    {"health", "ask a service whether it is serving",
     "Usage: kennel health [SERVICE] --addr HOST:PORT\n\n"
     "Calls grpc.health.v1.Health/Check on the service at --addr "
     "(default the registry,\n127.0.0.1:50051) and prints its "
     "status. SERVICE narrows the question to one\nservice "
     "(e.g. kennel.v1.Classifier). Exits 0 only when SERVING.\n",
     &RunHealth});

}  // namespace
}  // namespace kennel::cli
