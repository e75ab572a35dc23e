// kennel: the command line for Kennel's services.
#include <glog/logging.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cstring>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/auth.h"
#include "common/dashed_flags.h"
#include "services/cli/command.h"

ABSL_FLAG(std::string, addr, "",
          "HOST:PORT of the service the command talks to. Default: registry "
          "127.0.0.1:50051, trainer 127.0.0.1:50052, inference "
          "127.0.0.1:50053.");
ABSL_FLAG(std::string, token_file, "",
          "File holding the bearer token for mutating calls. Default: "
          "$KENNEL_TOKEN_FILE.");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM file of the CA that signed the server's certificate; connects "
          "with TLS when set.");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(30),
          "Deadline of each call (e.g. 10s, 2m). Streams that follow a job "
          "or a model are not limited by it.");
ABSL_FLAG(bool, json, false, "Print results as JSON instead of tables.");

namespace kennel::cli {

std::map<std::string, Command>& Commands() {
  static auto* commands = new std::map<std::string, Command>();
  return *commands;
}

CommandRegistrar::CommandRegistrar(Command command) {
  std::string name = command.name;
  Commands().emplace(std::move(name), std::move(command));
}

absl::StatusOr<ClientOptions> ClientOptionsFromFlags(
    const std::string& default_addr) {
  ClientOptions options;
  options.address = absl::GetFlag(FLAGS_addr);
  if (options.address.empty()) options.address = default_addr;
  options.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  options.timeout = absl::GetFlag(FLAGS_timeout);
  std::string token_file = absl::GetFlag(FLAGS_token_file);
  if (token_file.empty()) {
    if (const char* env = std::getenv("KENNEL_TOKEN_FILE")) token_file = env;
  }
  if (!token_file.empty()) {
    auto token = ReadSecretFile(token_file);
    if (!token.ok()) return token.status();
    options.token = *std::move(token);
  }
  return options;
}

int Fail(const absl::Status& status) {
  std::cerr << "kennel: " << absl::StatusCodeToString(status.code()) << ": "
            << status.message();
  // gRPC's own answer for a method the server does not have carries no
  // message: the usual cause is --addr naming another Kennel service.
  if (absl::IsUnimplemented(status) && status.message().empty()) {
    std::cerr << "the server at --addr does not have this method; is it the "
                 "right service? (registry 127.0.0.1:50051, trainer :50052, "
                 "inference :50053 by default)";
  }
  std::cerr << "\n";
  return kExitFailed;
}

int UsageError(const std::string& message) {
  std::cerr << "kennel: " << message << "\n";
  return kExitUsage;
}

std::string ToJson(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

std::string Table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size())
        line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

namespace {

std::string TopLevelHelp() {
  std::string out =
      "kennel: train, version and serve image classifiers.\n\n"
      "Usage: kennel COMMAND [ARGS] [FLAGS]\n\nCommands:\n";
  size_t width = 0;
  for (const auto& [name, command] : Commands())
    width = std::max(width, name.size());
  for (const auto& [name, command] : Commands()) {
    out += absl::StrCat("  ", name, std::string(width - name.size() + 2, ' '),
                        command.summary, "\n");
  }
  out +=
      "\nFlags every command takes:\n"
      "  --addr HOST:PORT     the service to talk to (each command has a "
      "default)\n"
      "  --token-file FILE    bearer token for mutating calls "
      "($KENNEL_TOKEN_FILE)\n"
      "  --tls-ca FILE        connect with TLS, trusting this CA\n"
      "  --timeout DURATION   deadline of each call (default 30s)\n"
      "  --json               print results as JSON\n"
      "\n`kennel COMMAND --help` explains a command. Exit status: 0 success, "
      "1 failure (the gRPC status is printed), 2 bad command line.\n";
  return out;
}

bool IsHelp(const char* arg) {
  return std::strcmp(arg, "--help") == 0 || std::strcmp(arg, "-h") == 0 ||
         std::strcmp(arg, "-help") == 0 || std::strcmp(arg, "--helpfull") == 0;
}

// absl's parser exits with status 1 on an unknown flag or a value it cannot
// parse; a bad command line is exit status 2 here, so flags are checked
// first. Values are parsed as absl will parse them again.
absl::Status CheckFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;
    // A negative number is a value, not a flag.
    if (absl::ascii_isdigit(arg[1]) || arg[1] == '.') continue;
    const absl::string_view body =
        absl::StripPrefix(absl::StripPrefix(arg, "-"), "-");
    const size_t eq = body.find('=');
    const absl::string_view name = body.substr(0, eq);
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && absl::StartsWith(name, "no")) {
      // --noFLAG sets a boolean flag to false.
      const absl::CommandLineFlag* positive =
          absl::FindCommandLineFlag(name.substr(2));
      if (positive != nullptr && positive->IsOfType<bool>() &&
          eq == absl::string_view::npos) {
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag ", arg.substr(0, arg.find('=')),
                       "; kennel COMMAND --help lists the flags"));
    }
    std::string value;
    if (eq != absl::string_view::npos) {
      value = std::string(body.substr(eq + 1));
    } else if (flag->IsOfType<bool>()) {
      continue;
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " needs a value"));
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": ", error));
    }
  }
  if (absl::GetFlag(FLAGS_timeout) <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--timeout must be positive (e.g. 30s)");
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kennel::cli

int main(int argc, char** argv) {
  using namespace kennel::cli;
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  absl::SetProgramUsageMessage(
      "kennel COMMAND [ARGS] [FLAGS]; see kennel --help");

  // Help is answered before flag parsing, per command.
  const char* command_name = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] != '-') {
      command_name = argv[i];
      break;
    }
  }
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--version") == 0) {
      std::cout << "kennel " << KENNEL_VERSION << "\n";
      return kExitOk;
    }
    if (IsHelp(argv[i])) {
      auto it = command_name ? Commands().find(command_name) : Commands().end();
      std::cout << (it == Commands().end() ? TopLevelHelp() : it->second.help);
      return kExitOk;
    }
  }
  if (command_name == nullptr || std::strcmp(command_name, "help") == 0) {
    if (command_name != nullptr) {
      // "kennel help CMD"
      for (int i = 1; i < argc; ++i) {
        auto it = Commands().find(argv[i]);
        if (it != Commands().end()) {
          std::cout << it->second.help;
          return kExitOk;
        }
      }
    }
    std::cout << TopLevelHelp();
    return command_name == nullptr ? kExitUsage : kExitOk;
  }

  kennel::AcceptDashedFlags(argc, argv);
  if (absl::Status s = CheckFlags(argc, argv); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  std::vector<std::string> args(positional.begin() + 1, positional.end());
  // The first word that did not start with '-' may have been a flag's value
  // ("--addr HOST:PORT"), leaving no command once the flags are parsed.
  if (args.empty()) {
    return UsageError("no command given; kennel --help lists them");
  }
  auto it = Commands().find(args.front());
  if (it == Commands().end()) {
    return UsageError("unknown command \"" + args.front() +
                      "\"; kennel --help lists them");
  }
  args.erase(args.begin());
  return it->second.run(args);
}
