// kennel-registry: versioned TorchScript artifacts on S3 or a local folder.
#include <glog/logging.h>
#include <malloc.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/synchronization/notification.h"
#include "common/server_flags.h"
#include "common/storage/object_store.h"
#include "services/registry/model_store.h"
#include "services/registry/registry_metrics.h"
#include "services/registry/registry_service.h"
#include "services/registry/watch_hub.h"

ABSL_FLAG(std::string, storage, "",
          "Where models live: file:///PATH (a local folder) or "
          "s3://BUCKET[/PREFIX]. Default: file://$XDG_DATA_HOME/kennel, or "
          "file://~/.local/share/kennel. S3 credentials come from "
          "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN.");
ABSL_FLAG(std::string, s3_endpoint, "",
          "S3 endpoint, http(s)://HOST[:PORT]. Default: AWS, "
          "https://s3.REGION.amazonaws.com.");
ABSL_FLAG(std::string, s3_region, "us-east-1", "S3 region used in signatures.");
ABSL_FLAG(bool, s3_path_style, false,
          "Address buckets as ENDPOINT/BUCKET/KEY rather than "
          "BUCKET.ENDPOINT/KEY (MinIO, Ceph and test servers want this).");
ABSL_FLAG(std::string, spool_dir, "",
          "Local folder where S3 uploads are staged. Default: "
          "$TMPDIR or /tmp.");
ABSL_FLAG(absl::Duration, watch_poll, absl::Seconds(10),
          "How often watched refs are re-read from storage, to see changes "
          "made by other registry replicas (changes made through this "
          "process reach watchers at once).");
ABSL_FLAG(int, pull_threads, 2,
          "Threads that read and check each large blob being pulled, a "
          "segment each (ranged GETs on S3), ahead of the one being sent. "
          "0 or 1: one sequential read per pull.");
ABSL_FLAG(int, pull_segment_mb, 4,
          "Size of those segments in MiB; a pull holds at most "
          "(pull_threads + 2) segments in memory.");

namespace {

std::string DefaultStorage() {
  const char* xdg = std::getenv("XDG_DATA_HOME");
  if (xdg != nullptr && xdg[0] == '/')
    return std::string("file://") + xdg + "/kennel";
  const char* home = std::getenv("HOME");
  return std::string("file://") + (home ? home : "/tmp") +
         "/.local/share/kennel";
}

}  // namespace

int main(int argc, char** argv) {
  // Transfers allocate and free buffers of a few MiB all the time (gRPC's
  // receive slices, serialised messages). With glibc's defaults freed
  // memory above 2 MiB goes straight back to the kernel, and the next
  // buffer is page-faulted and zeroed again: about a fifth of the
  // registry's CPU time in a 100 MB push and pull. Keep it instead.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  kennel::InitServerProcess(
      argc, argv,
      "stores versioned models and serves them over gRPC.\n"
      "Usage: kennel-registry [--listen=HOST:PORT] [--storage=URL] ...");
  auto auth = kennel::TokenAuthFromFlags();
  if (!auth.ok()) {
    LOG(ERROR) << auth.status();
    return 2;
  }
  std::string url = absl::GetFlag(FLAGS_storage);
  if (url.empty()) url = DefaultStorage();
  kennel::storage::S3Settings s3;
  s3.endpoint = absl::GetFlag(FLAGS_s3_endpoint);
  s3.region = absl::GetFlag(FLAGS_s3_region);
  s3.path_style = absl::GetFlag(FLAGS_s3_path_style);
  s3.spool_dir = absl::GetFlag(FLAGS_spool_dir);

  kennel::Server server(kennel::ServerOptionsFromFlags(
      "kennel-registry", "127.0.0.1:50051", "127.0.0.1:9101"));
  kennel::registry::RegistryMetrics metrics(server.metrics().registry());
  auto opened = kennel::storage::OpenObjectStore(url, s3);
  if (!opened.ok()) {
    LOG(ERROR) << "--storage=" << url << ": " << opened.status();
    return 2;
  }
  auto store = std::make_shared<kennel::registry::InstrumentedStore>(
      std::move(*opened), &metrics);
  kennel::registry::ModelStoreOptions options;
  options.read_parallelism = absl::GetFlag(FLAGS_pull_threads);
  options.read_segment_bytes =
      int64_t{std::clamp(absl::GetFlag(FLAGS_pull_segment_mb), 1, 256)} << 20;
  kennel::registry::ModelStore models(store, options);

  // The store may be down at start-up; serve anyway (calls fail with
  // UNAVAILABLE until it is back) and keep asking.
  absl::Notification stopping;
  std::thread init([&] {
    for (absl::Duration wait = absl::Seconds(1);;
         wait = std::min(wait * 2, absl::Seconds(30))) {
      absl::Status status = models.Init();
      if (status.ok()) return;
      LOG(WARNING) << status << "; version allocation is serialised in this "
                   << "process until the store answers; retrying in " << wait;
      if (stopping.WaitForNotificationWithTimeout(wait)) return;
    }
  });

  kennel::registry::WatchHub hub(
      [&models](const kennel::ModelRef& ref) { return models.Resolve(ref); },
      absl::GetFlag(FLAGS_watch_poll));
  models.SetChangeListener(
      [&hub](const std::string& name) { hub.ModelChanged(name); });
  kennel::registry::RegistryService service(&models, &hub, &*auth, &metrics);
  server.AddService(&service, "kennel.v1.ModelRegistry");
  server.OnDrain([&hub] { hub.Shutdown(); });
  if (absl::Status s = server.Start(); !s.ok()) {
    LOG(ERROR) << s;
    stopping.Notify();
    init.join();
    return 1;
  }
  LOG(INFO) << "storage: " << store->Describe()
            << (auth->enabled() ? "; mutating calls need the token" : "");
  server.Wait();
  stopping.Notify();
  init.join();
  return 0;
}
