// The image pipeline shared by training and serving: bytes -> decoded RGB
// image -> the float CHW tensor data a model takes. Training and inference
// both call it, so preprocessing cannot drift between them. OpenCV lives
// here and nowhere else; the output is a plain float buffer, so callers that
// own LibTorch copy it into a tensor without this file knowing LibTorch.
//
// All functions are thread-safe (they share no state) and never throw: OpenCV
// exceptions are caught and returned as INVALID_ARGUMENT with context.
#ifndef KENNEL_COMMON_IMAGE_IMAGE_H_
#define KENNEL_COMMON_IMAGE_IMAGE_H_

#include <cstdint>
#include <opencv2/core/mat.hpp>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kennel/v1/common.pb.h"

namespace kennel::image {

enum class Format { kUnknown, kJpeg, kPng, kWebp, kBmp };

// Names the format from its magic bytes; kUnknown when none matches.
Format SniffFormat(absl::string_view bytes);
absl::string_view FormatName(Format format);
// "image/jpeg" -> kJpeg, etc.; kUnknown for anything else.
Format FormatFromContentType(absl::string_view content_type);

// OK when `content_type` is empty or names the format the bytes carry;
// INVALID_ARGUMENT when it names an unsupported type or contradicts the
// magic bytes.
absl::Status CheckContentType(absl::string_view bytes,
                              absl::string_view content_type);

struct DecodeLimits {
  // Largest encoded size accepted.
  int64_t max_bytes = 32 << 20;
  // Largest width x height, read from the header before any pixel is
  // decoded, so a tiny file declaring huge dimensions is refused cheaply.
  int64_t max_pixels = 40'000'000;
};

struct ImageInfo {
  Format format = Format::kUnknown;
  int width = 0;
  int height = 0;
};

// Reads format and dimensions (as stored, before any EXIF rotation) from the
// header without decoding pixels.
absl::StatusOr<ImageInfo> Probe(absl::string_view bytes);

// Decodes to 8-bit, 3-channel RGB: EXIF orientation applied, grey expanded to
// three channels, alpha dropped. When `min_side` > 0 a large JPEG may be
// decoded at 1/2, 1/4 or 1/8 scale, never below `min_side` on its shorter
// side, which saves most of the decode time for photos far larger than the
// model's input. Errors: INVALID_ARGUMENT for empty, oversized, truncated,
// corrupt or unsupported input.
absl::StatusOr<cv::Mat> DecodeRgb(absl::string_view bytes,
                                  const DecodeLimits& limits, int min_side = 0);

// The smallest shorter side the decoder may reduce to without losing detail
// the preprocessing keeps (spec.resize, or input_size for a stretch).
int MinDecodeSide(const kennel::v1::Preprocessing& spec);

// Number of floats one preprocessed image takes: 3 * input_size^2.
int64_t TensorSize(const kennel::v1::Preprocessing& spec);

// Resize, centre crop and normalise an RGB image into `out` (TensorSize
// floats, CHW, channels in spec.color_order). The resize is Pillow's
// antialiased bilinear filter, computed with Pillow's own fixed-point
// arithmetic, so the result equals torchvision's Resize / CenterCrop /
// ToTensor / Normalize on a PIL image of the same pixels.
absl::Status Preprocess(const cv::Mat& rgb,
                        const kennel::v1::Preprocessing& spec, float* out);

// Training augmentation: a random resized crop (scale 0.08-1 of the area,
// aspect 3/4-4/3, as torchvision's RandomResizedCrop) and a horizontal flip
// with probability 1/2, then normalisation, into `out`. Deterministic for a
// given generator state.
absl::Status PreprocessAugmented(const cv::Mat& rgb,
                                 const kennel::v1::Preprocessing& spec,
                                 std::mt19937_64& rng, float* out);

// Bytes to tensor data in one call: DecodeRgb at the reduced scale the spec
// allows, then Preprocess.
absl::Status DecodeAndPreprocess(absl::string_view bytes,
                                 const kennel::v1::Preprocessing& spec,
                                 const DecodeLimits& limits, float* out);

// A deterministic photo-like RGB picture (smooth colour fields, soft-edged
// shapes, a little noise) for warm-up batches, benchmarks and tests, where no
// real image is at hand. The same seed gives the same pixels.
cv::Mat SyntheticImage(int width, int height, uint64_t seed);

// ImageNet's preprocessing: resize 256, centre crop 224, ImageNet mean/std.
kennel::v1::Preprocessing ImageNetPreprocessing();

// INVALID_ARGUMENT unless the spec is usable (input_size in 1..4096, mean and
// std empty or 3 values, std non-zero, resize >= input_size when cropping):
// the rules of common/preprocessing.h, which the registry applies too.
absl::Status ValidatePreprocessing(const kennel::v1::Preprocessing& spec);

}  // namespace kennel::image

#endif  // KENNEL_COMMON_IMAGE_IMAGE_H_
