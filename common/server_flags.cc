#include "common/server_flags.h"

#include <glog/logging.h>

#include <cctype>
#include <cstring>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"

ABSL_FLAG(std::string, listen, "",
          "HOST:PORT to serve gRPC on; port 0 picks a free port and logs it. "
          "Empty: the service's default (registry 127.0.0.1:50051, trainer "
          "127.0.0.1:50052, inference 127.0.0.1:50053). Use 0.0.0.0:PORT or "
          ":PORT to serve every interface.");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT for Prometheus /metrics. Empty: the service's default "
          "(registry 127.0.0.1:9101, trainer 127.0.0.1:9102, inference "
          "127.0.0.1:9103); \"off\" disables it.");
ABSL_FLAG(std::string, token_file, "",
          "File holding the bearer token that mutating RPCs must carry "
          "(authorization: Bearer TOKEN). Empty: no token needed.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain; with --tls-key the server speaks TLS only.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls-cert.");
ABSL_FLAG(int, threads, 0,
          "Compute threads (LibTorch intra-op threads, decode workers). 0: "
          "the number of cores.");
ABSL_FLAG(int, max_message_mb, 16,
          "Largest gRPC message accepted or sent, in MiB. Artifacts move in "
          "1 MiB chunks, so this bounds single requests such as images.");
ABSL_FLAG(double, drain_seconds, 30,
          "On SIGTERM or SIGINT, how long in-flight calls may take to finish "
          "before the server exits.");

namespace kennel {

std::vector<char*> InitServerProcess(int argc, char** argv,
                                     const std::string& usage) {
  BlockStopSignals();
  AcceptDashedFlags(argc, argv);
  // --help lists Kennel's own flags (the service's and the shared ones), not
  // absl's internals; --helpfull still lists everything.
  absl::FlagsUsageConfig usage_config;
  auto ours = [](absl::string_view file) {
    return absl::StrContains(file, "services/") ||
           absl::StrContains(file, "common/");
  };
  usage_config.contains_help_flags = ours;
  usage_config.contains_helpshort_flags = ours;
  usage_config.normalize_filename = [](absl::string_view file) {
    for (absl::string_view root : {"services/", "common/"}) {
      if (size_t at = file.rfind(root); at != absl::string_view::npos) {
        return std::string(file.substr(at));
      }
    }
    return std::string(file);
  };
  usage_config.version_string = [] {
    return std::string(KENNEL_VERSION) + "\n";
  };
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(usage);
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  FLAGS_logtostderr = true;
  FLAGS_colorlogtostderr = false;
  google::InitGoogleLogging(argv[0]);
  return positional;
}

ServerOptions ServerOptionsFromFlags(const std::string& name,
                                     const std::string& default_listen,
                                     const std::string& default_metrics) {
  ServerOptions options;
  options.name = name;
  options.listen = absl::GetFlag(FLAGS_listen);
  if (options.listen.empty()) options.listen = default_listen;
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  if (options.metrics_listen.empty()) options.metrics_listen = default_metrics;
  if (options.metrics_listen == "off") options.metrics_listen.clear();
  options.metrics_listen = NormalizeListenAddress(options.metrics_listen);
  options.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key = absl::GetFlag(FLAGS_tls_key);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_mb) << 20;
  options.drain_grace = absl::Seconds(absl::GetFlag(FLAGS_drain_seconds));
  return options;
}

int ThreadsFromFlags() {
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads > 0) return threads;
  return std::max(1u, std::thread::hardware_concurrency());
}

absl::StatusOr<TokenAuth> TokenAuthFromFlags() {
  return TokenAuth::FromFile(absl::GetFlag(FLAGS_token_file));
}

}  // namespace kennel
