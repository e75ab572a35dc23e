#include "common/preprocessing.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace kennel::preprocessing {

absl::Status Validate(const kennel::v1::Preprocessing& spec) {
  if (spec.input_size() < 1 || spec.input_size() > kMaxInputSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("preprocessing input_size must be in 1..", kMaxInputSize,
                     ", not ", spec.input_size()));
  }
  if (spec.mean_size() != 0 && spec.mean_size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "preprocessing mean must have 0 or 3 values, not ", spec.mean_size()));
  }
  if (spec.std_size() != 0 && spec.std_size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "preprocessing std must have 0 or 3 values, not ", spec.std_size()));
  }
  for (int i = 0; i < spec.mean_size(); ++i) {
    if (!std::isfinite(spec.mean(i))) {
      return absl::InvalidArgumentError("preprocessing mean must be finite");
    }
  }
  for (int i = 0; i < spec.std_size(); ++i) {
    if (!std::isfinite(spec.std(i)) || spec.std(i) == 0.0f) {
      return absl::InvalidArgumentError(
          "preprocessing std must be finite and non-zero");
    }
  }
  switch (spec.resize_mode()) {
    case kennel::v1::RESIZE_MODE_SHORTER_SIDE_THEN_CROP:
      if (spec.resize() < 0 || spec.resize() > kMaxResize) {
        return absl::InvalidArgumentError(
            absl::StrCat("preprocessing resize must be in 0..", kMaxResize,
                         ", not ", spec.resize()));
      }
      if (spec.resize() != 0 && spec.resize() < spec.input_size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "preprocessing resize (", spec.resize(),
            ") must be at least input_size (", spec.input_size(), ") to crop"));
      }
      break;
    case kennel::v1::RESIZE_MODE_STRETCH:
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown preprocessing resize_mode ",
                       static_cast<int>(spec.resize_mode())));
  }
  if (spec.color_order() != kennel::v1::COLOR_ORDER_RGB &&
      spec.color_order() != kennel::v1::COLOR_ORDER_BGR) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown preprocessing color_order ",
                     static_cast<int>(spec.color_order())));
  }
  return absl::OkStatus();
}

}  // namespace kennel::preprocessing
