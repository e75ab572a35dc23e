// The one conversion between absl::Status and grpc::Status, used at every
// service edge. The two share code numbers, so this is a cast plus a message
// bounded in length (a status message travels in an HTTP/2 trailer).
#ifndef KENNEL_COMMON_GRPC_STATUS_H_
#define KENNEL_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kennel {

// Longest message sent to a client; longer ones are cut with "...".
inline constexpr size_t kMaxStatusMessageBytes = 1024;

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace kennel

#endif  // KENNEL_COMMON_GRPC_STATUS_H_
