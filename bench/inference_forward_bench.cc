// The raw forward pass of a TorchScript classifier through the inference
// service's own loader (frozen, channels-last, fp32 or bf16), at several
// batch sizes: the ceiling that served throughput is measured against.
// Prints one JSON object per batch size.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "services/inference/model_loader.h"

ABSL_FLAG(std::string, model, "", "TorchScript classifier file.");
ABSL_FLAG(std::string, precision, "fp32", "fp32 or bf16.");
ABSL_FLAG(std::string, batch_sizes, "1,4,8,16", "Batch sizes to time.");
ABSL_FLAG(int, size, 224, "Input side in pixels.");
ABSL_FLAG(double, seconds, 8, "Timed seconds per batch size.");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads; 0: every core.");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  namespace inf = kennel::inference;
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  inf::InitTorchThreads(threads);
  inf::PrepareThreadForTorch();

  inf::TorchModelLoader loader;
  auto opened = loader.Open(absl::GetFlag(FLAGS_model));
  if (!opened.ok()) {
    std::cerr << opened.status() << "\n";
    return 1;
  }
  std::unique_ptr<inf::Model> model = std::move(opened->model);
  const std::string precision = absl::GetFlag(FLAGS_precision);
  if (precision == "bf16") {
    auto bf16 = model->ToBf16();
    if (!bf16.ok()) {
      std::cerr << bf16.status() << "\n";
      return 1;
    }
    model = *std::move(bf16);
  } else if (precision != "fp32") {
    std::cerr << "--precision must be fp32 or bf16\n";
    return 2;
  }
  const int size = absl::GetFlag(FLAGS_size);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (absl::string_view b :
       absl::StrSplit(absl::GetFlag(FLAGS_batch_sizes), ',')) {
    int batch = 0;
    if (!absl::SimpleAtoi(b, &batch) || batch < 1) {
      std::cerr << "bad batch size " << b << "\n";
      return 2;
    }
    std::vector<float> input(static_cast<size_t>(batch) * 3 * size * size);
    for (float& v : input) v = normal(rng);
    // Two passes select kernels for this shape before timing.
    for (int i = 0; i < 2; ++i) {
      if (auto out = model->Forward(input.data(), batch, size); !out.ok()) {
        std::cerr << out.status() << "\n";
        return 1;
      }
    }
    const absl::Time start = absl::Now();
    const absl::Duration budget = absl::Seconds(absl::GetFlag(FLAGS_seconds));
    int images = 0;
    int passes = 0;
    while (absl::Now() - start < budget || passes < 2) {
      if (!model->Forward(input.data(), batch, size).ok()) return 1;
      images += batch;
      ++passes;
    }
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    std::cout << absl::StrFormat(
                     "{\"precision\": \"%s\", \"batch\": %d, \"threads\": %d, "
                     "\"images_per_second\": %.2f, \"ms_per_batch\": %.2f}",
                     precision, batch, threads, images / seconds,
                     1000 * seconds / passes)
              << std::endl;
  }
  return 0;
}
