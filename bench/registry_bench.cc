// registry_bench: a push and a pull (or either) of a file through
// kennel-registry with the shared RegistryClient, timed inside the process (so
// process start-up is not counted). Prints one JSON line.
// bench/registry_bench.py runs it beside the baselines; see bench/README.md.
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
ABSL_FLAG(std::string, out, "",
          "where to pull the artifact back to (empty: push only)");
ABSL_FLAG(std::string, ref, "",
          "pull this NAME:VERSION instead of pushing first (needs --out)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "times a push and a pull through kennel-registry.\n"
      "Usage: registry_bench --addr HOST:PORT --file ARTIFACT [--out PULLED]\n"
      "       registry_bench --addr HOST:PORT --ref NAME:VERSION --out PULLED");
  absl::ParseCommandLine(argc, argv);
  const std::string file = absl::GetFlag(FLAGS_file);
  const std::string out = absl::GetFlag(FLAGS_out);
  std::string ref = absl::GetFlag(FLAGS_ref);
  if (file.empty() == ref.empty() || (!ref.empty() && out.empty())) {
    std::cerr << "registry_bench needs --file (to push, and pull back with "
                 "--out) or --ref with --out (to pull)\n";
    return 2;
  }
  kennel::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_addr);
  options.timeout = absl::Minutes(5);
  kennel::RegistryClient client(options);

  int64_t bytes = 0;
  double push_s = 0;
  std::string digest;
  int64_t version = 0;
  if (!file.empty()) {
    struct stat st;
    if (stat(file.c_str(), &st) != 0) {
      std::cerr << "cannot read " << file << "\n";
      return 2;
    }
    bytes = st.st_size;
    kennel::v1::PushHeader header;
    header.set_name(absl::GetFlag(FLAGS_name));
    header.add_components()->set_role(kennel::v1::COMPONENT_ROLE_MODEL);
    const absl::Time push_start = absl::Now();
    auto pushed = client.PushFiles(header, {file});
    push_s = absl::ToDoubleSeconds(absl::Now() - push_start);
    if (!pushed.ok()) {
      std::cerr << "push: " << pushed.status() << "\n";
      return 1;
    }
    ref = absl::StrFormat("%s:%d", pushed->name(), pushed->version());
    digest = pushed->components(0).digest();
    version = pushed->version();
  } else {
    auto model = client.GetModel(ref);
    if (!model.ok()) {
      std::cerr << "pull: " << model.status() << "\n";
      return 1;
    }
    digest = model->components(0).digest();
    bytes = model->components(0).size();
    version = model->version();
  }
  double pull_s = 0;
  if (!out.empty()) {
    const absl::Time pull_start = absl::Now();
    absl::Status pulled = client.PullComponent(ref, digest, out);
    pull_s = absl::ToDoubleSeconds(absl::Now() - pull_start);
    if (!pulled.ok()) {
      std::cerr << "pull: " << pulled << "\n";
      return 1;
    }
  }
  std::cout << absl::StrFormat(
      "{\"version\": %d, \"bytes\": %d, \"push_s\": %.6f, \"pull_s\": "
      "%.6f}\n",
      version, bytes, push_s, pull_s);
  return 0;
}
