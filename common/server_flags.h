// Flags every Kennel server binary shares, and the start-up every main.cc
// does: parse flags, log to stderr, block stop signals.
#ifndef KENNEL_COMMON_SERVER_FLAGS_H_
#define KENNEL_COMMON_SERVER_FLAGS_H_

#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "common/auth.h"
#include "common/dashed_flags.h"
#include "common/server.h"

ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, metrics_listen);
ABSL_DECLARE_FLAG(std::string, token_file);
ABSL_DECLARE_FLAG(std::string, tls_cert);
ABSL_DECLARE_FLAG(std::string, tls_key);
ABSL_DECLARE_FLAG(int, threads);
ABSL_DECLARE_FLAG(int, max_message_mb);
ABSL_DECLARE_FLAG(double, drain_seconds);

namespace kennel {

// Parses flags (exits with usage on a bad one), sends glog to stderr and
// blocks SIGTERM/SIGINT for Server::Wait. Returns the positional arguments.
std::vector<char*> InitServerProcess(int argc, char** argv,
                                     const std::string& usage);

// Server options from the shared flags; an empty --listen or
// --metrics-listen takes the given per-service default.
ServerOptions ServerOptionsFromFlags(const std::string& name,
                                     const std::string& default_listen,
                                     const std::string& default_metrics);

// --threads, with 0 meaning the number of cores.
int ThreadsFromFlags();

// The token check configured by --token-file.
absl::StatusOr<TokenAuth> TokenAuthFromFlags();

}  // namespace kennel

#endif  // KENNEL_COMMON_SERVER_FLAGS_H_
