#include "common/auth.h"

#include <grpcpp/server_context.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

namespace kennel {
namespace {

// Compares in time that depends only on the lengths, so a wrong token does
// not reveal how much of it was right.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i]) ^ static_cast<unsigned char>(b[i]);
  }
  return diff == 0;
}

}  // namespace

absl::StatusOr<std::string> ReadSecretFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError("cannot read token file " + path);
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string secret(absl::StripAsciiWhitespace(buffer.str()));
  if (secret.empty()) {
    return absl::InvalidArgumentError("token file " + path + " is empty");
  }
  return secret;
}

absl::StatusOr<TokenAuth> TokenAuth::FromFile(const std::string& path) {
  if (path.empty()) return TokenAuth();
  auto token = ReadSecretFile(path);
  if (!token.ok()) return token.status();
  return TokenAuth(*std::move(token));
}

absl::Status TokenAuth::CheckHeader(absl::string_view authorization) const {
  if (!enabled()) return absl::OkStatus();
  if (authorization.empty()) {
    return absl::UnauthenticatedError(
        "this method needs a bearer token (authorization: Bearer <token>; "
        "kennel --token-file FILE)");
  }
  constexpr absl::string_view kPrefix = "Bearer ";
  if (!absl::StartsWithIgnoreCase(authorization, kPrefix) ||
      !ConstantTimeEquals(authorization.substr(kPrefix.size()), token_)) {
    return absl::UnauthenticatedError("wrong bearer token");
  }
  return absl::OkStatus();
}

absl::Status TokenAuth::Check(const grpc::ServerContextBase& context) const {
  if (!enabled()) return absl::OkStatus();
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return CheckHeader("");
  return CheckHeader(absl::string_view(it->second.data(), it->second.size()));
}

}  // namespace kennel
