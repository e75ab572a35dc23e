#include "common/auth.h"

#include <grpcpp/server_context.h>
#include <grpcpp/test/server_context_test_spouse.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

namespace kennel {
namespace {

absl::Status CheckWith(const TokenAuth& auth, const char* header) {
  grpc::ServerContext context;
  grpc::testing::ServerContextTestSpouse spouse(&context);
  if (header != nullptr) spouse.AddClientMetadata("authorization", header);
  return auth.Check(context);
}

TEST(TokenAuthTest, NoTokenConfiguredAllowsEveryCall) {
  TokenAuth auth;
  EXPECT_FALSE(auth.enabled());
  EXPECT_TRUE(CheckWith(auth, nullptr).ok());
  EXPECT_TRUE(CheckWith(auth, "Bearer anything").ok());
}

TEST(TokenAuthTest, RightTokenPasses) {
  TokenAuth auth("s3cret");
  EXPECT_TRUE(CheckWith(auth, "Bearer s3cret").ok());
  EXPECT_TRUE(CheckWith(auth, "bearer s3cret").ok());
}

TEST(TokenAuthTest, MissingOrWrongTokenIsUnauthenticated) {
  TokenAuth auth("s3cret");
  EXPECT_EQ(CheckWith(auth, nullptr).code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckWith(auth, "Bearer s3cre").code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckWith(auth, "Bearer s3cret2").code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckWith(auth, "s3cret").code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckWith(auth, "Basic s3cret").code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(TokenAuthTest, MessageNeverContainsTheToken) {
  TokenAuth auth("s3cret");
  absl::Status status = CheckWith(auth, "Bearer wrong");
  EXPECT_EQ(std::string(status.message()).find("s3cret"), std::string::npos);
}

TEST(TokenAuthTest, FromFileTrimsWhitespace) {
  std::string path = testing::TempDir() + "/token";
  std::ofstream(path) << "  tok-en\n";
  auto auth = TokenAuth::FromFile(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE(auth->CheckHeader("Bearer tok-en").ok());
}

TEST(TokenAuthTest, EmptyPathDisablesButBadFileIsAnError) {
  auto none = TokenAuth::FromFile("");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->enabled());

  EXPECT_EQ(TokenAuth::FromFile("/nonexistent/token").status().code(),
            absl::StatusCode::kInvalidArgument);
  std::string empty = testing::TempDir() + "/empty-token";
  std::ofstream(empty) << "\n";
  EXPECT_EQ(TokenAuth::FromFile(empty).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kennel
