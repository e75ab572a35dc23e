// Helpers for code that returns absl::Status / absl::StatusOr.
#ifndef KENNEL_COMMON_STATUS_H_
#define KENNEL_COMMON_STATUS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KENNEL_STATUS_CONCAT_INNER_(a, b) a##b
#define KENNEL_STATUS_CONCAT_(a, b) KENNEL_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                        \
  do {                                               \
    ::absl::Status kennel_status_ = (expr);          \
    if (!kennel_status_.ok()) return kennel_status_; \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>); on
// error returns its status, otherwise moves the value into `lhs`, which may be
// a declaration ("auto x").
#define ASSIGN_OR_RETURN(lhs, expr)                                         \
  ASSIGN_OR_RETURN_IMPL_(KENNEL_STATUS_CONCAT_(kennel_statusor_, __LINE__), \
                         lhs, expr)

#define ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                           \
  if (!statusor.ok()) return statusor.status();     \
  lhs = std::move(statusor).value()

namespace kennel {

// Prefixes a non-OK status's message with context ("loading model x: ...").
inline absl::Status Annotate(const absl::Status& status,
                             absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), std::string(context) + ": " +
                                         std::string(status.message()));
}

}  // namespace kennel

#endif  // KENNEL_COMMON_STATUS_H_
