// kennel-inference: classifies image bytes with the model it follows.
#include <dirent.h>
#include <glog/logging.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/names.h"
#include "common/server_flags.h"
#include "services/inference/batcher.h"
#include "services/inference/classifier_service.h"
#include "services/inference/inference_metrics.h"
#include "services/inference/model_loader.h"
#include "services/inference/model_manager.h"
#include "services/inference/model_source.h"

ABSL_FLAG(std::string, registry, "",
          "HOST:PORT of kennel-registry; with --model, follow a ref there.");
ABSL_FLAG(std::string, registry_tls_ca, "",
          "PEM file of the CA that signed the registry's certificate; "
          "connects to --registry with TLS when set.");
ABSL_FLAG(std::string, model, "",
          "Registry ref to follow: NAME (newest version), NAME:VERSION or "
          "NAME@ALIAS. Needs --registry.");
ABSL_FLAG(std::string, model_path, "",
          "Serve this local TorchScript file instead of following a registry "
          "(labels from --labels or the file's `labels` attribute).");
ABSL_FLAG(std::string, labels, "",
          "With --model-path: a text file with one class label per line, in "
          "the model's output order.");
ABSL_FLAG(std::string, model_name, "",
          "With --model-path: the name answers report (default: the file "
          "name without its extension).");
ABSL_FLAG(int, input_size, 0,
          "With --model-path: the model's input side in pixels. 0 takes the "
          "file's kennel_preprocessing attribute, else ImageNet's (224).");
ABSL_FLAG(int, resize, 0,
          "With --input-size: the shorter side before the centre crop (0: "
          "input size).");
ABSL_FLAG(std::string, resize_mode, "crop",
          "With --input-size: crop (shorter side to --resize, centre crop) "
          "or stretch (straight to input size).");
ABSL_FLAG(std::string, mean, "0.485,0.456,0.406",
          "With --input-size: per-channel mean, comma-separated.");
ABSL_FLAG(std::string, std, "0.229,0.224,0.225",
          "With --input-size: per-channel standard deviation.");
ABSL_FLAG(std::string, color_order, "rgb",
          "With --input-size: channel order the model takes (rgb or bgr).");
ABSL_FLAG(std::string, precision, "auto",
          "fp32, bf16 or auto. bf16 (and auto, unless the manifest says fp32) "
          "serves in bfloat16 where the CPU has AVX512-BF16 or AMX and the "
          "warm-up answers agree with fp32; otherwise fp32.");
ABSL_FLAG(double, bf16_min_agreement, 0.9,
          "Share of warm-up images whose top-1 class must match fp32 before "
          "bf16 serves.");
ABSL_FLAG(std::string, warmup_dir, "",
          "Folder of images for the warm-up and the bf16 check (up to 32); "
          "synthetic pictures when empty.");
ABSL_FLAG(int, max_batch_size, 8, "Most images in one forward pass.");
ABSL_FLAG(bool, tune_batch_size, true,
          "At load, time batches of 1, 2, 4 ... --max-batch-size and form "
          "batches no larger than the fastest per image (a larger batch must "
          "be 5% faster per image to be used).");
ABSL_FLAG(absl::Duration, max_queue_delay, absl::Milliseconds(2),
          "Longest a request waits for others to share its batch.");
ABSL_FLAG(int, max_queue, 64,
          "Requests that may wait for the model; beyond it, "
          "RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_image_bytes, 16 << 20,
          "Largest encoded image accepted, in bytes.");
ABSL_FLAG(int64_t, max_pixels, 40'000'000,
          "Largest width x height accepted, read from the image header "
          "before decoding.");
ABSL_FLAG(std::string, cache_dir, "/tmp/kennel-inference-cache",
          "Local cache of model files by digest, so restarts and repeated "
          "versions do not download again. It also remembers the last "
          "version that served --model, which a restart serves first, so it "
          "serves while the registry is unreachable or offers a version "
          "that cannot serve.");

namespace {

using kennel::inference::ModelCandidate;

int Usage(const std::string& message) {
  LOG(ERROR) << message;
  return 2;
}

absl::StatusOr<std::vector<float>> ParseFloats(const std::string& flag,
                                               const std::string& text) {
  std::vector<float> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    float v;
    if (!absl::SimpleAtof(absl::StripAsciiWhitespace(part), &v)) {
      return absl::InvalidArgumentError("--" + flag +
                                        ": not a number: " + std::string(part));
    }
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<ModelCandidate> LocalCandidate() {
  ModelCandidate c;
  c.path = absl::GetFlag(FLAGS_model_path);
  c.source = c.path;
  c.name = absl::GetFlag(FLAGS_model_name);
  if (c.name.empty()) {
    std::string base = c.path.substr(c.path.rfind('/') + 1);
    c.name = base.substr(0, base.find('.'));
  }
  if (const std::string labels = absl::GetFlag(FLAGS_labels); !labels.empty()) {
    std::ifstream in(labels);
    if (!in) {
      return absl::InvalidArgumentError("--labels: cannot read " + labels);
    }
    std::string line;
    while (std::getline(in, line)) {
      line = std::string(absl::StripAsciiWhitespace(line));
      if (!line.empty()) c.labels.push_back(line);
    }
  }
  if (absl::GetFlag(FLAGS_input_size) > 0) {
    kennel::v1::Preprocessing spec;
    spec.set_input_size(absl::GetFlag(FLAGS_input_size));
    spec.set_resize(absl::GetFlag(FLAGS_resize));
    const std::string mode = absl::GetFlag(FLAGS_resize_mode);
    if (mode == "stretch") {
      spec.set_resize_mode(kennel::v1::RESIZE_MODE_STRETCH);
    } else if (mode != "crop") {
      return absl::InvalidArgumentError(
          "--resize-mode must be crop or stretch");
    }
    const std::string order = absl::GetFlag(FLAGS_color_order);
    if (order == "bgr") {
      spec.set_color_order(kennel::v1::COLOR_ORDER_BGR);
    } else if (order != "rgb") {
      return absl::InvalidArgumentError("--color-order must be rgb or bgr");
    }
    auto mean = ParseFloats("mean", absl::GetFlag(FLAGS_mean));
    if (!mean.ok()) return mean.status();
    auto sd = ParseFloats("std", absl::GetFlag(FLAGS_std));
    if (!sd.ok()) return sd.status();
    for (float v : *mean) spec.add_mean(v);
    for (float v : *sd) spec.add_std(v);
    c.preprocessing = spec;
  }
  return c;
}

std::vector<std::string> ReadWarmupImages(const std::string& dir) {
  std::vector<std::string> images;
  if (dir.empty()) return images;
  std::vector<std::string> names;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] != '.') names.push_back(e->d_name);
    }
    closedir(d);
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    if (images.size() >= 32) break;
    std::ifstream in(dir + "/" + name, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!ss.str().empty()) images.push_back(ss.str());
  }
  return images;
}

}  // namespace

int main(int argc, char** argv) {
  // libgomp reads OMP_WAIT_POLICY once, as it loads, before main runs. Its
  // default keeps idle OpenMP threads spinning, which takes the cores from
  // the request threads that decode images, and on a busy or CPU-limited
  // node made a ResNet50 forward pass 14x slower here (2.3 s against 0.16 s
  // at load average 10 on 2 cores). Restart once with PASSIVE unless the
  // environment has chosen.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);
    // If exec fails, carry on with the default policy.
  }
  kennel::InitServerProcess(
      argc, argv,
      "serves an image classifier over gRPC.\n"
      "Usage: kennel-inference [--listen=HOST:PORT] "
      "(--registry=HOST:PORT --model=REF | --model-path=FILE [--labels=FILE]) "
      "[--precision=auto|fp32|bf16] [--max-batch-size=N] ...");
  namespace inf = kennel::inference;

  const std::string registry = absl::GetFlag(FLAGS_registry);
  const std::string ref = absl::GetFlag(FLAGS_model);
  const std::string model_path = absl::GetFlag(FLAGS_model_path);
  if (model_path.empty() == ref.empty()) {
    return Usage("give either --model-path=FILE or --registry and --model=REF");
  }
  if (!ref.empty()) {
    if (registry.empty()) return Usage("--model needs --registry=HOST:PORT");
    if (auto parsed = kennel::ParseModelRef(ref); !parsed.ok()) {
      return Usage("--model: " + std::string(parsed.status().message()));
    }
    // An unreadable CA would only show as watch failures retried forever.
    if (const std::string ca = absl::GetFlag(FLAGS_registry_tls_ca);
        !ca.empty() && !std::ifstream(ca)) {
      return Usage("--registry-tls-ca: cannot read " + ca);
    }
  }
  kennel::v1::Precision precision;
  const std::string precision_flag = absl::GetFlag(FLAGS_precision);
  if (precision_flag == "fp32") {
    precision = kennel::v1::PRECISION_FP32;
  } else if (precision_flag == "bf16") {
    precision = kennel::v1::PRECISION_BF16;
  } else if (precision_flag == "auto") {
    precision = kennel::v1::PRECISION_AUTO;
  } else {
    return Usage("--precision must be fp32, bf16 or auto");
  }
  const int max_batch = absl::GetFlag(FLAGS_max_batch_size);
  if (max_batch < 1 || max_batch > 256) {
    return Usage("--max-batch-size must be in 1..256");
  }
  if (absl::GetFlag(FLAGS_max_queue) < 1) {
    return Usage("--max-queue must be at least 1");
  }
  auto auth = kennel::TokenAuthFromFlags();
  if (!auth.ok()) {
    LOG(ERROR) << auth.status();
    return 2;
  }

  LOG(INFO) << "OMP_WAIT_POLICY=" << std::getenv("OMP_WAIT_POLICY");
  inf::InitTorchThreads(kennel::ThreadsFromFlags());
  kennel::Server server(kennel::ServerOptionsFromFlags(
      "kennel-inference", "127.0.0.1:50053", "127.0.0.1:9103"));
  // Not ready until the first model is loaded and warm.
  server.set_initially_serving(false);
  inf::InferenceMetrics metrics(server.metrics().registry());

  inf::TorchModelLoader loader;
  inf::ManagerOptions manager_options;
  manager_options.precision = precision;
  manager_options.bf16_min_agreement = absl::GetFlag(FLAGS_bf16_min_agreement);
  manager_options.warmup_images =
      ReadWarmupImages(absl::GetFlag(FLAGS_warmup_dir));
  manager_options.warmup_batch_sizes = {1, max_batch};
  manager_options.tune_batch_size = absl::GetFlag(FLAGS_tune_batch_size);
  manager_options.max_batch_size = max_batch;
  inf::ModelManager manager(&loader, manager_options, &metrics);
  manager.SetOnPublished(
      [&server](const inf::LoadedModel&) { server.SetServing(true); });

  inf::Batcher::Options batcher_options;
  batcher_options.max_batch_size = max_batch;
  batcher_options.max_queue_delay = absl::GetFlag(FLAGS_max_queue_delay);
  batcher_options.max_queue = absl::GetFlag(FLAGS_max_queue);
  batcher_options.on_worker_start = inf::PrepareThreadForTorch;
  inf::Batcher batcher(batcher_options, &metrics);

  inf::ServiceOptions service_options;
  service_options.source = model_path.empty() ? ref : model_path;
  service_options.max_image_bytes = absl::GetFlag(FLAGS_max_image_bytes);
  service_options.max_pixels = absl::GetFlag(FLAGS_max_pixels);
  service_options.max_concurrent_decodes = kennel::ThreadsFromFlags();
  inf::ClassifierService service(&manager, &batcher, &metrics, service_options);
  server.AddService(&service, "kennel.v1.Classifier");
  server.OnDrain([&service] { service.BeginDrain(); });

  std::unique_ptr<inf::ModelSource> source;
  absl::Status local_failure;
  if (!model_path.empty()) {
    auto candidate = LocalCandidate();
    if (!candidate.ok())
      return Usage(std::string(candidate.status().message()));
    source = std::make_unique<inf::LocalFileSource>(
        *candidate, &manager, inf::PrepareThreadForTorch,
        [&server, &local_failure](const absl::Status& status) {
          if (status.ok()) return;
          // A local file that cannot serve will not get better: exit.
          LOG(ERROR) << status;
          local_failure = status;
          server.Shutdown();
        });
  } else {
    inf::RegistrySource::Options options;
    options.client.address = registry;
    options.client.tls_ca = absl::GetFlag(FLAGS_registry_tls_ca);
    options.ref = ref;
    options.cache_dir = absl::GetFlag(FLAGS_cache_dir);
    options.on_thread_start = inf::PrepareThreadForTorch;
    source = std::make_unique<inf::RegistrySource>(options, &manager);
  }

  if (absl::Status s = server.Start(); !s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  source->Start();
  server.Wait();
  source->Stop();
  batcher.Shutdown();
  return local_failure.ok() ? 0 : 1;
}
