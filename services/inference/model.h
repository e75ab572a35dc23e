// What the inference service knows about a model, without LibTorch: a
// forward function over float batches, the metadata a request needs to turn
// logits into answers, and the loader interface that produces models from
// files. model_loader.cc is the LibTorch implementation; tests use fakes.
#ifndef KENNEL_SERVICES_INFERENCE_MODEL_H_
#define KENNEL_SERVICES_INFERENCE_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kennel/v1/common.pb.h"

namespace kennel::inference {

// A callable network. Forward may be called from one thread at a time per
// instance (the batcher's worker, or the loader while warming up); it is not
// required to be safe for concurrent calls.
class Model {
 public:
  virtual ~Model() = default;

  // `input` holds batch x 3 x size x size floats (normalised CHW); returns
  // batch x C logits, row-major, in float.
  virtual absl::StatusOr<std::vector<float>> Forward(const float* input,
                                                     int batch, int size) = 0;

  // A copy of the network that computes in bfloat16 (channels-last, frozen),
  // or UNIMPLEMENTED where this model cannot do it.
  virtual absl::StatusOr<std::unique_ptr<Model>> ToBf16() const = 0;
};

// A model file opened in fp32, with the attributes the artifact contract
// puts in it (either may be empty for files from elsewhere).
struct OpenedModel {
  std::unique_ptr<Model> model;
  std::vector<std::string> labels;
  // The Preprocessing message as JSON, from the `kennel_preprocessing`
  // attribute.
  std::string preprocessing_json;
};

// Opens model files. Thread-safe.
class ModelLoader {
 public:
  virtual ~ModelLoader() = default;
  // INVALID_ARGUMENT when the file is not a usable TorchScript module.
  virtual absl::StatusOr<OpenedModel> Open(const std::string& path) = 0;
  // Whether bf16 can run fast here (AVX512-BF16 or AMX on this CPU).
  virtual bool Bf16Supported() const = 0;
};

// One servable version: the network plus everything a request needs to
// answer with it. Immutable once published; requests hold a shared_ptr to
// the version they started on, so a swap never changes a request's model
// and the old version is freed when its last request finishes.
struct LoadedModel {
  // What the server follows: a registry ref or a local file.
  std::string source;
  std::string name;
  int64_t version = 0;
  std::string digest;
  std::vector<std::string> labels;
  kennel::v1::Preprocessing preprocessing;
  kennel::v1::Precision precision = kennel::v1::PRECISION_FP32;
  absl::Time loaded_at;
  double load_seconds = 0;
  // Share of the warm-up images on which bf16 and fp32 agreed; 0 when bf16
  // was not tried.
  double bf16_agreement = 0;
  // Largest batch worth forming for this model, as timed at load; 0 means
  // the batcher's maximum.
  int max_batch_size = 0;
  // Aliases that pointed at this version when it was read.
  std::vector<std::string> aliases;

  // Called only by the batcher's worker once published.
  std::shared_ptr<Model> model;
};

}  // namespace kennel::inference

#endif  // KENNEL_SERVICES_INFERENCE_MODEL_H_
