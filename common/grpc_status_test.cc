#include "common/grpc_status.h"

#include <gtest/gtest.h>

namespace kennel {
namespace {

TEST(GrpcStatusTest, CodesMapOneToOne) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status status(static_cast<absl::StatusCode>(code), code ? "m" : "");
    grpc::Status converted = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(converted.error_code()), code);
    EXPECT_EQ(FromGrpcStatus(converted), status);
  }
}

TEST(GrpcStatusTest, MessagePassesThrough) {
  grpc::Status s = ToGrpcStatus(absl::NotFoundError("no model \"dogs\""));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "no model \"dogs\"");
}

TEST(GrpcStatusTest, LongMessageIsBoundedAtACharacterBoundary) {
  // Two-byte characters, so a byte cut could split one.
  std::string message;
  for (int i = 0; i < 2000; ++i) message += "\xc3\xa9";
  grpc::Status s = ToGrpcStatus(absl::InvalidArgumentError(message));
  EXPECT_LE(s.error_message().size(), kMaxStatusMessageBytes);
  EXPECT_EQ(s.error_message().substr(s.error_message().size() - 3), "...");
  std::string body = s.error_message().substr(0, s.error_message().size() - 3);
  EXPECT_EQ(body.size() % 2, 0u);
  EXPECT_EQ(static_cast<unsigned char>(body[0]), 0xc3);
}

}  // namespace
}  // namespace kennel
