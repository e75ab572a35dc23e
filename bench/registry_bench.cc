// registry_bench: one push and one pull of a file through kennel-registry
// with the shared RegistryClient, timed inside the process (so process
// start-up is not counted). Prints one JSON line. bench/registry_bench.py
// runs it beside the baselines; see bench/README.md.
#include <sys/stat.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/registry_client.h"

ABSL_FLAG(std::string, addr, "127.0.0.1:50051", "registry HOST:PORT");
ABSL_FLAG(std::string, file, "", "artifact to push");
ABSL_FLAG(std::string, name, "bench", "model name to push under");
ABSL_FLAG(std::string, out, "", "where to pull the artifact back to");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "registry_bench --addr HOST:PORT --file ARTIFACT --out PULLED");
  absl::ParseCommandLine(argc, argv);
  const std::string file = absl::GetFlag(FLAGS_file);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (file.empty() || out.empty()) {
    std::cerr << "registry_bench needs --file and --out\n";
    return 2;
  }
  struct stat st;
  if (stat(file.c_str(), &st) != 0) {
    std::cerr << "cannot read " << file << "\n";
    return 2;
  }
  kennel::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_addr);
  options.timeout = absl::Minutes(5);
  kennel::RegistryClient client(options);

  kennel::v1::PushHeader header;
  header.set_name(absl::GetFlag(FLAGS_name));
  header.add_components()->set_role(kennel::v1::COMPONENT_ROLE_MODEL);
  const absl::Time push_start = absl::Now();
  auto version = client.PushFiles(header, {file});
  const absl::Duration push = absl::Now() - push_start;
  if (!version.ok()) {
    std::cerr << "push: " << version.status() << "\n";
    return 1;
  }
  const std::string ref =
      absl::StrFormat("%s:%d", version->name(), version->version());
  const absl::Time pull_start = absl::Now();
  absl::Status pulled =
      client.PullComponent(ref, version->components(0).digest(), out);
  const absl::Duration pull = absl::Now() - pull_start;
  if (!pulled.ok()) {
    std::cerr << "pull: " << pulled << "\n";
    return 1;
  }
  std::cout << absl::StrFormat(
      "{\"version\": %d, \"bytes\": %d, \"push_s\": %.6f, \"pull_s\": %.6f}\n",
      version->version(), static_cast<int64_t>(st.st_size),
      absl::ToDoubleSeconds(push), absl::ToDoubleSeconds(pull));
  return 0;
}
