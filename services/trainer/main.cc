// kennel-trainer: trains classifiers and streams their progress.
#include <glog/logging.h>

#include <filesystem>
#include <memory>

#include "absl/flags/flag.h"
#include "common/auth.h"
#include "common/client.h"
#include "common/server_flags.h"
#include "services/trainer/job_manager.h"
#include "services/trainer/registry_publisher.h"
#include "services/trainer/trainer_backend.h"
#include "services/trainer/trainer_metrics.h"
#include "services/trainer/trainer_service.h"

ABSL_FLAG(std::string, registry, "",
          "HOST:PORT of kennel-registry, where finished models are pushed. "
          "Empty: jobs that ask to register a model are refused.");
ABSL_FLAG(std::string, registry_token_file, "",
          "Bearer token for the registry's mutating calls. Default: the "
          "--token-file of this server.");
ABSL_FLAG(std::string, registry_tls_ca, "",
          "PEM file of the CA that signed the registry's certificate; "
          "connects with TLS when set.");
ABSL_FLAG(std::string, data_root, "",
          "Folder under which data sets and backbones are read. Requests "
          "naming paths outside it (symlinks included) are refused. Empty: "
          "no local data is read.");
ABSL_FLAG(std::string, cache_dir, "",
          "Holds the feature cache (features/) and exported models "
          "(models/). Empty: a kennel-trainer folder under $TMPDIR.");
ABSL_FLAG(std::string, jobs_dir, "",
          "Where job history is kept so that it survives a restart. Empty: "
          "history is kept in memory only.");
ABSL_FLAG(std::string, device, "auto",
          "auto, cpu or cuda: where jobs train unless they say otherwise "
          "(auto: CUDA when LibTorch has it).");
ABSL_FLAG(std::string, s3_endpoint, "",
          "http(s)://HOST:PORT of the S3 service holding s3:// data sets and "
          "backbones. Empty: AWS (https://s3.REGION.amazonaws.com). "
          "Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.");
ABSL_FLAG(std::string, s3_region, "us-east-1", "S3 region used in signatures.");
ABSL_FLAG(bool, s3_path_style, false,
          "Address S3 as http://HOST/BUCKET/KEY instead of "
          "http://BUCKET.HOST/KEY (MinIO, Ceph).");
ABSL_FLAG(int, max_concurrent_jobs, 1,
          "Jobs that run at once; the rest wait in a queue.");

int main(int argc, char** argv) {
  kennel::InitServerProcess(
      argc, argv,
      "trains and tunes image classifiers over gRPC.\n"
      "Usage: kennel-trainer [--listen=HOST:PORT] [--registry=HOST:PORT] "
      "[--data-root=DIR] [--cache-dir=DIR] [--jobs-dir=DIR] ...");
  auto auth = kennel::TokenAuthFromFlags();
  if (!auth.ok()) {
    LOG(ERROR) << auth.status();
    return 2;
  }
  const int threads = kennel::ThreadsFromFlags();

  kennel::Server server(kennel::ServerOptionsFromFlags(
      "kennel-trainer", "127.0.0.1:50052", "127.0.0.1:9102"));
  kennel::trainer::TrainerMetrics metrics(server.metrics().registry());

  std::unique_ptr<kennel::trainer::RegistryPublisher> publisher;
  if (const std::string registry = absl::GetFlag(FLAGS_registry);
      !registry.empty()) {
    kennel::ClientOptions client;
    client.address = registry;
    client.tls_ca = absl::GetFlag(FLAGS_registry_tls_ca);
    std::string token_file = absl::GetFlag(FLAGS_registry_token_file);
    if (token_file.empty()) token_file = absl::GetFlag(FLAGS_token_file);
    if (!token_file.empty()) {
      auto token = kennel::ReadSecretFile(token_file);
      if (!token.ok()) {
        LOG(ERROR) << "registry token: " << token.status();
        return 2;
      }
      client.token = *std::move(token);
    }
    publisher = std::make_unique<kennel::trainer::RegistryPublisher>(client);
  }

  kennel::trainer::TrainerOptions options;
  options.data_root = absl::GetFlag(FLAGS_data_root);
  options.cache_dir = absl::GetFlag(FLAGS_cache_dir);
  if (options.cache_dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    options.cache_dir = std::string(tmp ? tmp : "/tmp") + "/kennel-trainer";
  }
  options.device = absl::GetFlag(FLAGS_device);
  options.s3.endpoint = absl::GetFlag(FLAGS_s3_endpoint);
  options.s3.region = absl::GetFlag(FLAGS_s3_region);
  options.s3.path_style = absl::GetFlag(FLAGS_s3_path_style);
  options.threads = threads;
  options.publisher = publisher.get();
  options.metrics = &metrics;
  std::unique_ptr<kennel::trainer::TrainerBackend> backend =
      kennel::trainer::NewTorchTrainerBackend(options);

  kennel::trainer::JobManagerOptions job_options;
  job_options.jobs_dir = absl::GetFlag(FLAGS_jobs_dir);
  job_options.max_concurrent_jobs = absl::GetFlag(FLAGS_max_concurrent_jobs);
  job_options.observer = &metrics;
  auto jobs = kennel::trainer::JobManager::Create(job_options);
  if (!jobs.ok()) {
    LOG(ERROR) << jobs.status();
    return 2;
  }

  kennel::trainer::TrainerService service(jobs->get(), backend.get(), &*auth);
  server.AddService(&service, "kennel.v1.Trainer");
  // Running jobs stop at their next step and are recorded as failed by the
  // shutdown; open streams end so the drain does not wait on them.
  server.OnDrain([&jobs] { (*jobs)->Shutdown(); });
  if (absl::Status s = server.Start(); !s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  kennel::trainer::SetComputeThreads(threads);
  if (std::error_code ec;
      !options.data_root.empty() &&
      !std::filesystem::is_directory(options.data_root, ec)) {
    LOG(WARNING) << "--data-root " << options.data_root
                 << " is not a folder here; every local data set will be "
                    "refused until it exists (s3:// data sets still work)";
  }
  LOG(INFO) << "data root "
            << (options.data_root.empty() ? "(none)" : options.data_root)
            << ", cache " << options.cache_dir << ", jobs "
            << (job_options.jobs_dir.empty() ? "(memory only)"
                                             : job_options.jobs_dir)
            << ", registry "
            << (publisher ? publisher->Describe() : std::string("(none)"));
  server.Wait();
  (*jobs)->Shutdown();
  return 0;
}
