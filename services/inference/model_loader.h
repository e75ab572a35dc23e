// Opens TorchScript classifiers with LibTorch. This file and model_loader.cc
// are the only ones in the inference service that see LibTorch; every
// LibTorch exception is caught there and returned as a status.
#ifndef KENNEL_SERVICES_INFERENCE_MODEL_LOADER_H_
#define KENNEL_SERVICES_INFERENCE_MODEL_LOADER_H_

#include <memory>
#include <string>

#include "services/inference/model.h"

namespace kennel::inference {

// Sets LibTorch's intra-op thread count (and one inter-op thread). Call once,
// at start-up, before any model is loaded.
void InitTorchThreads(int threads);

// Gives the calling thread the intra-op thread count InitTorchThreads set;
// every thread that runs forward passes calls it once when it starts.
void PrepareThreadForTorch();

// True when the CPU reports AVX512-BF16 or AMX-BF16 (from /proc/cpuinfo).
bool CpuHasFastBf16();

// Loads TorchScript files: eval mode, frozen, channels-last; fp32 by
// default, bf16 copies on request (Model::ToBf16). Thread-safe.
class TorchModelLoader : public ModelLoader {
 public:
  absl::StatusOr<OpenedModel> Open(const std::string& path) override;
  bool Bf16Supported() const override;
};

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_MODEL_LOADER_H_
