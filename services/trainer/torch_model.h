// Backbones and classifiers as TorchScript: loading and checking a backbone
// file, running it for features in fp32 or bf16, and writing the classifier
// Kennel registers (backbone + linear head in one TorchScript file, with its
// labels and preprocessing as attributes, built from C++ with
// Module::define so Python's torch.jit.load opens it too).
//
// Every LibTorch exception is caught here and returned as a status.
#ifndef KENNEL_SERVICES_TRAINER_TORCH_MODEL_H_
#define KENNEL_SERVICES_TRAINER_TORCH_MODEL_H_

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kennel/v1/common.pb.h"

namespace kennel::trainer {

// A backbone file that passed InspectBackbone.
struct BackboneSpec {
  std::string path;
  // "sha256:<hex>" of the file.
  std::string digest;
  kennel::v1::Preprocessing preprocessing;
  // The preprocessing as JSON with proto field names (what the
  // kennel_preprocessing attribute of a classifier holds).
  std::string preprocessing_json;
  int feature_dim = 0;
};

// The preprocessing message as JSON, proto field names, every field printed.
std::string PreprocessingJson(const kennel::v1::Preprocessing& spec);
absl::StatusOr<kennel::v1::Preprocessing> ParsePreprocessingJson(
    const std::string& json);

// INVALID_ARGUMENT naming the file when it is not TorchScript.
absl::StatusOr<torch::jit::Module> LoadTorchScript(const std::string& path,
                                                   const std::string& what);

// Loads `path` and checks that it is a usable backbone: TorchScript; a
// preprocessing spec from `override` (when it has an input size), else its
// kennel_preprocessing attribute, else a "<path>.json" sidecar; and a
// forward pass on [2, 3, S, S] zeros returning a [2, F] float tensor (F
// equal to its feature_dim attribute when it has one). INVALID_ARGUMENT
// with a message naming what is wrong otherwise. The loaded module is
// returned through `module` when not null.
absl::StatusOr<BackboneSpec> InspectBackbone(
    const std::string& path, const kennel::v1::Preprocessing& override,
    torch::jit::Module* module);

// True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX).
bool CpuHasBf16();

// Runs a backbone in inference mode for features, in fp32 or bf16 (a frozen
// channels-last copy of the module). Not thread-safe; one per job.
class FeatureExtractor {
 public:
  // `precision` is FP32 or BF16 (not AUTO).
  // `warmup_batch` > 0 runs two forward passes of that many images of
  // `input_size` before returning: TorchScript profiles and optimises a
  // frozen graph on its first runs, which would otherwise slow the first
  // batches of a pass by seconds.
  static absl::StatusOr<std::unique_ptr<FeatureExtractor>> Create(
      const torch::jit::Module& backbone, kennel::v1::Precision precision,
      torch::Device device, int warmup_batch = 0, int input_size = 0);

  // `pixels` holds n images of 3 x size x size floats. Returns [n, F]
  // float32 on the CPU.
  absl::StatusOr<torch::Tensor> Run(const float* pixels, int64_t n, int size);

  kennel::v1::Precision precision() const { return precision_; }

 private:
  FeatureExtractor(torch::jit::Module module, kennel::v1::Precision precision,
                   torch::Device device)
      : module_(std::move(module)), precision_(precision), device_(device) {}

  torch::jit::Module module_;
  const kennel::v1::Precision precision_;
  const torch::Device device_;
};

// Writes the classifier: forward(x) = head(backbone(x)) as logits, with the
// attributes labels (List[str]) and kennel_preprocessing (str). The backbone
// is copied (and put in eval mode and fp32 on the CPU); the file is loaded
// back and run once to check its output is [N, labels.size()].
absl::Status ExportClassifier(const torch::jit::Module& backbone,
                              const torch::Tensor& weight,
                              const torch::Tensor& bias,
                              const std::vector<std::string>& labels,
                              const BackboneSpec& spec,
                              const std::string& path);

// The status of a caught LibTorch exception, with context; the message is
// cut to its first line (LibTorch appends long C++ backtraces).
absl::Status TorchError(absl::StatusCode code, const std::string& context,
                        const std::exception& e);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TORCH_MODEL_H_
