// Model names, aliases and refs. Names and aliases match
// [a-z0-9][a-z0-9._-]{0,62}, so none can climb out of a storage root.
#ifndef KENNEL_COMMON_NAMES_H_
#define KENNEL_COMMON_NAMES_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kennel {

// INVALID_ARGUMENT naming `what` ("model name", "alias") unless `name` is
// valid.
absl::Status ValidateName(absl::string_view what, absl::string_view name);

// "name" (the newest version), "name:7" or "name@production".
struct ModelRef {
  std::string name;
  int64_t version = 0;  // > 0 for "name:7"
  std::string alias;    // non-empty for "name@alias"

  bool is_latest() const { return version == 0 && alias.empty(); }
  std::string ToString() const;
};

absl::StatusOr<ModelRef> ParseModelRef(absl::string_view ref);

// "sha256:<64 lowercase hex>"; INVALID_ARGUMENT otherwise.
absl::Status ValidateDigest(absl::string_view digest);

}  // namespace kennel

#endif  // KENNEL_COMMON_NAMES_H_
