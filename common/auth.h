// Bearer-token check for the methods that change state. Services call Check()
// at the top of each mutating handler; reads stay open.
#ifndef KENNEL_COMMON_AUTH_H_
#define KENNEL_COMMON_AUTH_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace grpc {
class ServerContextBase;
}  // namespace grpc

namespace kennel {

// Immutable after construction; safe to use from any number of threads.
class TokenAuth {
 public:
  // No token: every call is allowed.
  TokenAuth() = default;
  explicit TokenAuth(std::string token) : token_(std::move(token)) {}

  // Reads the token from a file (surrounding whitespace ignored). An empty
  // path gives a TokenAuth that allows everything; an unreadable or empty file
  // is an error, so a typo never turns authentication off.
  static absl::StatusOr<TokenAuth> FromFile(const std::string& path);

  bool enabled() const { return !token_.empty(); }

  // UNAUTHENTICATED unless the call carries "authorization: Bearer <token>".
  absl::Status Check(const grpc::ServerContextBase& context) const;
  // The same check on the raw header value (empty when absent).
  absl::Status CheckHeader(absl::string_view authorization) const;

 private:
  std::string token_;
};

// Reads a whole small file, trimming surrounding whitespace; used for tokens.
absl::StatusOr<std::string> ReadSecretFile(const std::string& path);

}  // namespace kennel

#endif  // KENNEL_COMMON_AUTH_H_
