// Publishes trained models to kennel-registry through the shared registry
// client (only blobs the registry lacks are sent). Thread-safe.
#ifndef KENNEL_SERVICES_TRAINER_REGISTRY_PUBLISHER_H_
#define KENNEL_SERVICES_TRAINER_REGISTRY_PUBLISHER_H_

#include <memory>
#include <string>
#include <vector>

#include "common/registry_client.h"
#include "services/trainer/trainer_backend.h"

namespace kennel::trainer {

class RegistryPublisher : public ModelPublisher {
 public:
  explicit RegistryPublisher(ClientOptions options);

  absl::StatusOr<kennel::v1::ModelVersion> Publish(
      const kennel::v1::PushHeader& header,
      const std::vector<std::string>& paths) override;
  std::string Describe() const override;

 private:
  RegistryClient client_;
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_REGISTRY_PUBLISHER_H_
