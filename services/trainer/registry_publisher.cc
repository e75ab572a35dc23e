#include "services/trainer/registry_publisher.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kennel::trainer {

RegistryPublisher::RegistryPublisher(ClientOptions options)
    : client_(std::move(options)) {}

absl::StatusOr<kennel::v1::ModelVersion> RegistryPublisher::Publish(
    const kennel::v1::PushHeader& header,
    const std::vector<std::string>& paths) {
  auto pushed = client_.PushFiles(header, paths);
  if (!pushed.ok()) {
    return Annotate(
        pushed.status(),
        absl::StrCat("pushing model \"", header.name(), "\" to ", Describe()));
  }
  return pushed;
}

std::string RegistryPublisher::Describe() const {
  return absl::StrCat("the registry at ", client_.options().address);
}

}  // namespace kennel::trainer
