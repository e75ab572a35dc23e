// The rules a Preprocessing spec must follow to be usable, with no OpenCV or
// LibTorch behind them: the image pipeline (common/image/image.h) applies
// them before every resize, and the registry applies the same ones before it
// stores a version, so a spec it accepts is one the pipeline can run.
#ifndef KENNEL_COMMON_PREPROCESSING_H_
#define KENNEL_COMMON_PREPROCESSING_H_

#include "absl/status/status.h"
#include "kennel/v1/common.pb.h"

namespace kennel::preprocessing {

// Bounds on the pixel sizes a spec may name.
inline constexpr int kMaxInputSize = 4096;
inline constexpr int kMaxResize = 8192;

// INVALID_ARGUMENT, saying which field is wrong and what it may be, unless
// input_size is in 1..kMaxInputSize, mean and std are empty or have 3 finite
// values (std non-zero), resize_mode and color_order are known values and,
// when cropping, resize is 0 or in input_size..kMaxResize.
absl::Status Validate(const kennel::v1::Preprocessing& spec);

}  // namespace kennel::preprocessing

#endif  // KENNEL_COMMON_PREPROCESSING_H_
