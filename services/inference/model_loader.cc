#include "services/inference/model_loader.h"

#include <ATen/Parallel.h>
#include <glog/logging.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/script.h>

#include <cstring>
#include <exception>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kennel::inference {
namespace {

// A frozen TorchScript network. The unfrozen module is kept so that a bf16
// copy can be made from the original fp32 weights.
class TorchModel : public Model {
 public:
  TorchModel(torch::jit::Module original, torch::jit::Module frozen, bool bf16)
      : original_(std::move(original)),
        frozen_(std::move(frozen)),
        bf16_(bf16) {}

  absl::StatusOr<std::vector<float>> Forward(const float* input, int batch,
                                             int size) override {
    try {
      c10::InferenceMode inference_mode;
      torch::Tensor x = torch::from_blob(const_cast<float*>(input),
                                         {batch, 3, size, size}, torch::kFloat);
      if (bf16_) x = x.to(torch::kBFloat16);
      // The frozen weights are channels-last; oneDNN runs fastest when the
      // activations are too.
      x = x.contiguous(torch::MemoryFormat::ChannelsLast);
      torch::jit::IValue result = frozen_.forward({x});
      if (!result.isTensor()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "forward returned ", result.tagKind(), ", not a tensor of logits"));
      }
      torch::Tensor logits = result.toTensor();
      if (logits.dim() != 2 || logits.size(0) != batch) {
        return absl::InvalidArgumentError(absl::StrCat(
            "forward returned shape ", c10::str(logits.sizes()),
            " for a batch of ", batch, "; expected [", batch, ", classes]"));
      }
      logits = logits.to(torch::kFloat).contiguous();
      const float* data = logits.data_ptr<float>();
      return std::vector<float>(data, data + logits.numel());
    } catch (const c10::Error& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward failed: ", e.what_without_backtrace()));
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward failed: ", e.what()));
    }
  }

  absl::StatusOr<std::unique_ptr<Model>> ToBf16() const override {
    try {
      torch::jit::Module copy = original_.deepcopy();
      copy.to(torch::kBFloat16);
      return std::unique_ptr<Model>(
          new TorchModel(original_, Freeze(copy), /*bf16=*/true));
    } catch (const c10::Error& e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "converting to bfloat16 failed: ", e.what_without_backtrace()));
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("converting to bfloat16 failed: ", e.what()));
    }
  }

  // Channels-last 4-D weights, eval mode, frozen (constants folded, batch
  // norm folded into convolutions). Throws on failure.
  static torch::jit::Module Freeze(torch::jit::Module module) {
    module.eval();
    {
      torch::NoGradGuard no_grad;
      for (torch::Tensor p : module.parameters()) {
        if (p.dim() == 4) {
          p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
        }
      }
    }
    return torch::jit::freeze(module);
  }

 private:
  const torch::jit::Module original_;
  torch::jit::Module frozen_;
  const bool bf16_;
};

}  // namespace

void InitTorchThreads(int threads) {
  at::set_num_threads(std::max(1, threads));
  at::set_num_interop_threads(1);
  LOG(INFO) << "LibTorch intra-op threads: " << at::get_num_threads();
}

void PrepareThreadForTorch() { at::init_num_threads(); }

bool CpuHasFastBf16() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    for (absl::string_view flag : absl::StrSplit(line, ' ')) {
      if (flag == "avx512_bf16" || flag == "amx_bf16") return true;
    }
    return false;
  }
  return false;
}

absl::StatusOr<OpenedModel> TorchModelLoader::Open(const std::string& path) {
  OpenedModel opened;
  try {
    torch::jit::Module module = torch::jit::load(path, torch::kCPU);
    module.eval();
    if (module.hasattr("labels")) {
      const torch::jit::IValue labels = module.attr("labels");
      if (!labels.isList()) {
        return absl::InvalidArgumentError(
            "the model's labels attribute is not a list of strings");
      }
      for (const torch::jit::IValue& label : labels.toListRef()) {
        if (!label.isString()) {
          return absl::InvalidArgumentError(
              "the model's labels attribute is not a list of strings");
        }
        opened.labels.push_back(label.toStringRef());
      }
    }
    if (module.hasattr("kennel_preprocessing")) {
      const torch::jit::IValue spec = module.attr("kennel_preprocessing");
      if (spec.isString()) opened.preprocessing_json = spec.toStringRef();
    }
    if (module.find_method("forward") == c10::nullopt) {
      return absl::InvalidArgumentError("the module has no forward method");
    }
    torch::jit::Module frozen = TorchModel::Freeze(module.deepcopy());
    opened.model =
        std::make_unique<TorchModel>(std::move(module), std::move(frozen),
                                     /*bf16=*/false);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        path,
        " is not a usable TorchScript module: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a usable TorchScript module: ", e.what()));
  }
  return opened;
}

bool TorchModelLoader::Bf16Supported() const {
  static const bool supported = CpuHasFastBf16();
  return supported;
}

}  // namespace kennel::inference
