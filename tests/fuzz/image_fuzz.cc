// libFuzzer target over the path every request takes: bytes -> sniff and
// probe -> decode -> preprocess (and the trainer's augmentation). Any crash,
// sanitizer report, hang or runaway allocation here is a bug: the pipeline
// must turn every input into either a tensor or INVALID_ARGUMENT.
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "common/image/image.h"

namespace {

kennel::v1::Preprocessing SmallBgrStretch() {
  kennel::v1::Preprocessing spec;
  spec.set_input_size(32);
  spec.set_resize_mode(kennel::v1::RESIZE_MODE_STRETCH);
  spec.set_color_order(kennel::v1::COLOR_ORDER_BGR);
  return spec;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace image = kennel::image;
  static const kennel::v1::Preprocessing kImageNet =
      image::ImageNetPreprocessing();
  static const kennel::v1::Preprocessing kSmall = SmallBgrStretch();
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);

  // Small limits keep each run fast; the limit checks are part of the path.
  image::DecodeLimits limits;
  limits.max_bytes = 4 << 20;
  limits.max_pixels = 4'000'000;

  image::SniffFormat(bytes);
  (void)image::Probe(bytes);
  (void)image::CheckContentType(bytes, "image/jpeg");
  (void)image::CheckContentType(bytes, "image/png");

  const kennel::v1::Preprocessing& spec = (size % 2) ? kImageNet : kSmall;
  std::vector<float> out(image::TensorSize(spec));
  (void)image::DecodeAndPreprocess(bytes, spec, limits, out.data());

  auto rgb = image::DecodeRgb(bytes, limits, /*min_side=*/0);
  if (rgb.ok()) {
    std::mt19937_64 rng(size);
    std::vector<float> augmented(image::TensorSize(kSmall));
    (void)image::PreprocessAugmented(*rgb, kSmall, rng, augmented.data());
    std::vector<float> full(image::TensorSize(kImageNet));
    (void)image::Preprocess(*rgb, kImageNet, full.data());
  }
  return 0;
}
