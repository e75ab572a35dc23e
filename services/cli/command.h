// The `kennel` command line: each subcommand lives in its own file and
// registers itself here; main.cc parses flags and dispatches.
#ifndef KENNEL_SERVICES_CLI_COMMAND_H_
#define KENNEL_SERVICES_CLI_COMMAND_H_

#include <google/protobuf/message.h>

#include <map>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/client.h"

ABSL_DECLARE_FLAG(std::string, addr);
ABSL_DECLARE_FLAG(std::string, token_file);
ABSL_DECLARE_FLAG(std::string, tls_ca);
ABSL_DECLARE_FLAG(absl::Duration, timeout);
ABSL_DECLARE_FLAG(bool, json);

namespace kennel::cli {

// Exit codes: 0 success, 1 the operation failed, 2 the command line is wrong.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;

struct Command {
  // "health", "models", ...
  std::string name;
  // One line for `kennel --help`.
  std::string summary;
  // Full text for `kennel NAME --help`: usage, arguments, flags, examples.
  std::string help;
  // Runs with the positional arguments after the command name.
  int (*run)(const std::vector<std::string>& args);
};

std::map<std::string, Command>& Commands();

struct CommandRegistrar {
  explicit CommandRegistrar(Command command);
};

// Client options from --addr (or `default_addr` when --addr is empty),
// --token-file, --tls-ca and --timeout.
absl::StatusOr<ClientOptions> ClientOptionsFromFlags(
    const std::string& default_addr);

inline constexpr char kRegistryAddr[] = "127.0.0.1:50051";
inline constexpr char kTrainerAddr[] = "127.0.0.1:50052";
inline constexpr char kInferenceAddr[] = "127.0.0.1:50053";

// Prints "kennel: CODE: message" to stderr and returns kExitFailed (or
// kExitUsage for INVALID_ARGUMENT raised before any call).
int Fail(const absl::Status& status);
int UsageError(const std::string& message);

// One message as indented JSON, field names as in the proto.
std::string ToJson(const google::protobuf::Message& message);

// Renders rows as an aligned text table, the first row being the header.
std::string Table(const std::vector<std::vector<std::string>>& rows);

}  // namespace kennel::cli

#define KENNEL_CLI_CONCAT_INNER_(a, b) a##b
#define KENNEL_CLI_CONCAT_(a, b) KENNEL_CLI_CONCAT_INNER_(a, b)
// KENNEL_CLI_COMMAND({"name", "summary", "help", &Run});
#define KENNEL_CLI_COMMAND(...)                                            \
  static ::kennel::cli::CommandRegistrar KENNEL_CLI_CONCAT_(kennel_cmd_, \
                                                            __LINE__)(   \
      ::kennel::cli::Command __VA_ARGS__)

#endif  // KENNEL_SERVICES_CLI_COMMAND_H_
