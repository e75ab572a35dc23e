// Flags that `kennel train` and `kennel tune` share. Absl flags are global to
// the binary, so each is defined once here. The hyperparameter flags are
// strings because tune reads ranges and sets where train reads one value
// ("--lr 0.01" for train, "--lr 0.001:0.1:log" for tune).
#ifndef KENNEL_SERVICES_CLI_TRAINING_FLAGS_H_
#define KENNEL_SERVICES_CLI_TRAINING_FLAGS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "kennel/v1/trainer.pb.h"

ABSL_DECLARE_FLAG(std::string, data);
ABSL_DECLARE_FLAG(std::string, backbone);
ABSL_DECLARE_FLAG(std::string, mode);
ABSL_DECLARE_FLAG(std::string, lr);
ABSL_DECLARE_FLAG(std::string, weight_decay);
ABSL_DECLARE_FLAG(std::string, batch_size);
ABSL_DECLARE_FLAG(std::string, epochs);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(std::string, register_as);
ABSL_DECLARE_FLAG(std::vector<std::string>, alias);
ABSL_DECLARE_FLAG(std::string, precision);
ABSL_DECLARE_FLAG(std::string, device);

namespace kennel::cli {

// Defaults of the hyperparameter flags (the trainer's own defaults).
inline constexpr double kDefaultLearningRate = 1e-3;
inline constexpr double kDefaultWeightDecay = 0;
inline constexpr int kDefaultBatchSize = 64;
inline constexpr int kDefaultEpochs = 5;

// The JobSpec from --data, --backbone, --precision, --device,
// --register-as and --alias. INVALID_ARGUMENT when --data or --backbone is
// missing or --precision is unknown.
absl::StatusOr<kennel::v1::JobSpec> JobSpecFromFlags();

// TRAIN_MODE_HEAD or TRAIN_MODE_FINETUNE from --mode.
absl::StatusOr<kennel::v1::TrainMode> TrainModeFromFlags();

}  // namespace kennel::cli

#endif  // KENNEL_SERVICES_CLI_TRAINING_FLAGS_H_
