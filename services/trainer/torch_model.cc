#include "services/trainer/torch_model.h"

#include <glog/logging.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/image/image.h"
#include "common/sha256.h"
#include "common/status.h"

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;

std::string ShapeString(const torch::Tensor& t) {
  std::vector<std::string> dims;
  for (int64_t d : t.sizes()) dims.push_back(absl::StrCat(d));
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

constexpr char kHeadSource[] = R"(
def forward(self, x):
    return torch.linear(x, self.weight, self.bias)
)";

constexpr char kClassifierSource[] = R"(
def forward(self, x):
    return self.head.forward(self.backbone.forward(x))
)";

}  // namespace

absl::Status TorchError(absl::StatusCode code, const std::string& context,
                        const std::exception& e) {
  std::string message = e.what();
  const size_t newline = message.find('\n');
  if (newline != std::string::npos) message.resize(newline);
  return absl::Status(code, absl::StrCat(context, ": ", message));
}

std::string PreprocessingJson(const kennel::v1::Preprocessing& spec) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(spec, &out, options);
  return out;
}

absl::StatusOr<kennel::v1::Preprocessing> ParsePreprocessingJson(
    const std::string& json) {
  kennel::v1::Preprocessing spec;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  auto status =
      google::protobuf::util::JsonStringToMessage(json, &spec, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("preprocessing JSON is not a kennel.v1.Preprocessing: ",
                     status.message().as_string()));
  }
  return spec;
}

absl::StatusOr<torch::jit::Module> LoadTorchScript(const std::string& path,
                                                   const std::string& what) {
  try {
    return torch::jit::load(path, torch::kCPU);
  } catch (const std::exception& e) {
    return TorchError(absl::StatusCode::kInvalidArgument,
                      absl::StrCat(what, " ", path,
                                   " is not a TorchScript file torch.jit.load "
                                   "can open"),
                      e);
  }
}

absl::StatusOr<BackboneSpec> InspectBackbone(
    const std::string& path, const kennel::v1::Preprocessing& override,
    torch::jit::Module* module_out) {
  ASSIGN_OR_RETURN(torch::jit::Module module,
                   LoadTorchScript(path, "backbone"));
  BackboneSpec spec;
  spec.path = path;
  if (override.input_size() > 0) {
    spec.preprocessing = override;
  } else {
    std::string json;
    try {
      if (module.hasattr("kennel_preprocessing")) {
        json = module.attr("kennel_preprocessing").toStringRef();
      }
    } catch (const std::exception& e) {
      return TorchError(
          absl::StatusCode::kInvalidArgument,
          "backbone " + path + ": kennel_preprocessing is not a string", e);
    }
    if (json.empty()) {
      std::ifstream sidecar(path + ".json");
      if (sidecar) {
        std::stringstream buffer;
        buffer << sidecar.rdbuf();
        json = buffer.str();
      }
    }
    if (json.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("backbone ", path,
                       " carries no preprocessing spec: export it with "
                       "tools/export_backbone.py, put a ",
                       fs::path(path).filename().string(),
                       ".json beside it, or set the job's preprocessing"));
    }
    auto parsed = ParsePreprocessingJson(json);
    if (!parsed.ok()) {
      return Annotate(parsed.status(), "backbone " + path);
    }
    spec.preprocessing = *parsed;
  }
  RETURN_IF_ERROR(Annotate(image::ValidatePreprocessing(spec.preprocessing),
                           "backbone " + path + " preprocessing"));
  spec.preprocessing_json = PreprocessingJson(spec.preprocessing);

  const int size = spec.preprocessing.input_size();
  try {
    module.eval();
    torch::NoGradGuard no_grad;
    torch::jit::IValue out = module.forward({torch::zeros({2, 3, size, size})});
    if (!out.isTensor()) {
      return absl::InvalidArgumentError(
          absl::StrCat("backbone ", path, " returns a ", out.type()->str(),
                       ", not a tensor; a backbone maps [N, 3, ", size, ", ",
                       size, "] images to [N, F] features"));
    }
    torch::Tensor features = out.toTensor();
    if (features.dim() != 2 || features.size(0) != 2 || features.size(1) < 1 ||
        !features.is_floating_point()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "backbone ", path, " output ", ShapeString(features),
          " for a [2, 3, ", size, ", ", size,
          "] input does not fit: a backbone must return [N, F] float "
          "features (is it a classifier, or does it expect another input "
          "size?)"));
    }
    spec.feature_dim = static_cast<int>(features.size(1));
    if (module.hasattr("feature_dim")) {
      const int64_t declared = module.attr("feature_dim").toInt();
      if (declared != spec.feature_dim) {
        return absl::InvalidArgumentError(
            absl::StrCat("backbone ", path, " declares feature_dim ", declared,
                         " but returns ", spec.feature_dim, " features"));
      }
    }
  } catch (const std::exception& e) {
    return TorchError(absl::StatusCode::kInvalidArgument,
                      absl::StrCat("backbone ", path, " failed on a [2, 3, ",
                                   size, ", ", size, "] input"),
                      e);
  }
  ASSIGN_OR_RETURN(spec.digest, Sha256File(path));
  if (module_out) *module_out = std::move(module);
  return spec;
}

bool CpuHasBf16() {
  static const bool has = [] {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
      if (absl::StartsWith(line, "flags")) {
        return absl::StrContains(line, " avx512_bf16") ||
               absl::StrContains(line, " amx_bf16");
      }
    }
    return false;
  }();
  return has;
}

absl::StatusOr<std::unique_ptr<FeatureExtractor>> FeatureExtractor::Create(
    const torch::jit::Module& backbone, kennel::v1::Precision precision,
    torch::Device device, int warmup_batch, int input_size) {
  if (precision != kennel::v1::PRECISION_FP32 &&
      precision != kennel::v1::PRECISION_BF16) {
    return absl::InvalidArgumentError("feature precision must be FP32 or BF16");
  }
  try {
    torch::jit::Module module = backbone.deepcopy();
    module.eval();
    module.to(device);
    if (precision == kennel::v1::PRECISION_BF16) module.to(torch::kBFloat16);
    // Freezing folds batch norm into the convolutions and inlines the
    // weights; a module it cannot handle still runs, only slower.
    try {
      module = torch::jit::freeze(module);
    } catch (const std::exception& e) {
      LOG(WARNING) << "backbone cannot be frozen; running it unfrozen: "
                   << std::string(e.what()).substr(0, 200);
    }
    std::unique_ptr<FeatureExtractor> extractor(
        new FeatureExtractor(std::move(module), precision, device));
    if (warmup_batch > 0 && input_size > 0) {
      std::vector<float> zeros(
          static_cast<size_t>(warmup_batch) * 3 * input_size * input_size, 0.f);
      for (int i = 0; i < 2; ++i) {
        auto warm = extractor->Run(zeros.data(), warmup_batch, input_size);
        if (!warm.ok()) return warm.status();
      }
    }
    return extractor;
  } catch (const std::exception& e) {
    return TorchError(absl::StatusCode::kInternal,
                      "preparing the backbone for feature extraction", e);
  }
}

absl::StatusOr<torch::Tensor> FeatureExtractor::Run(const float* pixels,
                                                    int64_t n, int size) {
  try {
    torch::InferenceMode guard;
    torch::Tensor x = torch::from_blob(const_cast<float*>(pixels),
                                       {n, 3, size, size}, torch::kFloat32);
    x = x.to(device_);
    if (precision_ == kennel::v1::PRECISION_BF16) {
      x = x.to(torch::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
    } else {
      x = x.contiguous(at::MemoryFormat::ChannelsLast);
    }
    torch::Tensor out = module_.forward({x}).toTensor();
    return out.to(torch::kCPU, torch::kFloat32).contiguous();
  } catch (const std::exception& e) {
    return TorchError(absl::StatusCode::kInternal, "backbone forward pass", e);
  }
}

absl::Status ExportClassifier(const torch::jit::Module& backbone,
                              const torch::Tensor& weight,
                              const torch::Tensor& bias,
                              const std::vector<std::string>& labels,
                              const BackboneSpec& spec,
                              const std::string& path) {
  if (weight.dim() != 2 || weight.size(0) != int64_t(labels.size()) ||
      bias.numel() != weight.size(0)) {
    return absl::InternalError(absl::StrCat("head ", ShapeString(weight),
                                            " does not fit ", labels.size(),
                                            " labels"));
  }
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  try {
    torch::jit::Module head("__torch__.kennel.LinearHead");
    head.register_attribute("training", c10::BoolType::get(), false);
    head.register_parameter(
        "weight", weight.detach().to(torch::kCPU, torch::kFloat32).clone(),
        false);
    head.register_parameter(
        "bias", bias.detach().to(torch::kCPU, torch::kFloat32).clone(), false);
    head.define(kHeadSource);

    torch::jit::Module body = backbone.deepcopy();
    body.to(torch::kCPU);
    body.to(torch::kFloat32);
    body.eval();

    torch::jit::Module model("__torch__.kennel.Classifier");
    model.register_attribute("training", c10::BoolType::get(), false);
    model.register_module("backbone", body);
    model.register_module("head", head);
    c10::List<std::string> label_list;
    for (const std::string& label : labels) label_list.push_back(label);
    model.register_attribute("labels", c10::ListType::ofStrings(),
                             c10::IValue(label_list));
    model.register_attribute("kennel_preprocessing", c10::StringType::get(),
                             c10::IValue(spec.preprocessing_json));
    model.define(kClassifierSource);
    model.eval();
    model.save(tmp);
  } catch (const std::exception& e) {
    std::remove(tmp.c_str());
    return TorchError(absl::StatusCode::kInternal,
                      "building the TorchScript classifier", e);
  }
  // Load what was written and run it once, so a file that cannot serve is
  // never registered.
  try {
    torch::jit::Module check = torch::jit::load(tmp, torch::kCPU);
    check.eval();
    torch::NoGradGuard no_grad;
    const int size = spec.preprocessing.input_size();
    torch::Tensor out =
        check.forward({torch::zeros({2, 3, size, size})}).toTensor();
    if (out.dim() != 2 || out.size(0) != 2 ||
        out.size(1) != int64_t(labels.size())) {
      std::remove(tmp.c_str());
      return absl::InternalError(
          absl::StrCat("the exported classifier returns ", ShapeString(out),
                       " instead of [2, ", labels.size(), "]"));
    }
    if (check.attr("labels").toList().size() != labels.size()) {
      std::remove(tmp.c_str());
      return absl::InternalError("the exported classifier lost its labels");
    }
  } catch (const std::exception& e) {
    std::remove(tmp.c_str());
    return TorchError(absl::StatusCode::kInternal,
                      "checking the exported classifier", e);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("cannot write ", path, ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace kennel::trainer
