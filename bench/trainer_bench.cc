// trainer_bench: the trainer's compute paths on one data set and backbone,
// each beside its baseline in the same process:
//   raw forward      the backbone on ready tensors (frozen, channels-last),
//                    batch --batch, no decoding: the ceiling for extraction
//   extraction       head mode's feature pass through the real pipeline:
//                    read, hash, decode, preprocess on the decode pool,
//                    forward, write the feature cache (empty cache)
//   cached pass      the same again, every feature now a cache hit
//   head epoch       seconds per epoch of the head trainer on the cached
//                    features, and on a set of the full dogImages size
//   fine-tune        images/s of Finetune() on the first --finetune-images
//                    training images (compare with bench/trainer_bench.py's
//                    Python loop)
// Prints one JSON object. bench/trainer_bench.py drives it.
#include <glog/logging.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/dashed_flags.h"
#include "common/image/image.h"
#include "services/trainer/finetune.h"
#include "services/trainer/train_job.h"

ABSL_FLAG(std::string, data_root, "",
          "Folder holding the data set and backbone.");
ABSL_FLAG(std::string, data, "dogs", "Data set folder under --data-root.");
ABSL_FLAG(std::string, backbone, "resnet50.pt", "Backbone under --data-root.");
ABSL_FLAG(std::string, cache_dir, "", "Empty folder for the feature cache.");
ABSL_FLAG(std::string, precision, "fp32",
          "fp32 or bf16 for the backbone pass.");
ABSL_FLAG(int, threads, 2, "LibTorch threads and decode workers.");
ABSL_FLAG(int, batch, 32, "Batch of the raw forward (extraction uses 32).");
ABSL_FLAG(int, raw_images, 128, "Images through the raw forward.");
ABSL_FLAG(int, rounds, 3,
          "Paired rounds of --raw-images training images, each between two "
          "raw forwards.");
ABSL_FLAG(int, head_epochs, 3, "Head epochs timed.");
ABSL_FLAG(int, head_batch, 64, "Head batch size.");
ABSL_FLAG(int, full_train, 6680, "Training size of the full-size head timing.");
ABSL_FLAG(int, finetune_images, 64, "Training images of the fine-tune timing.");
ABSL_FLAG(int, finetune_batch, 16, "Fine-tune batch size.");

namespace kennel::trainer {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

class QuietContext : public JobContext {
 public:
  const std::string& job_id() const override { return id_; }
  void Emit(kennel::v1::JobEvent event) override {
    if (event.has_log()) LOG(INFO) << event.log();
  }
  bool cancelled() const override { return false; }

 private:
  std::string id_ = "bench";
};

int Run() {
  SetComputeThreads(absl::GetFlag(FLAGS_threads));
  TrainerOptions options;
  options.data_root = absl::GetFlag(FLAGS_data_root);
  options.cache_dir = absl::GetFlag(FLAGS_cache_dir);
  options.device = "cpu";
  options.threads = absl::GetFlag(FLAGS_threads);
  kennel::v1::JobSpec spec;
  spec.set_data(absl::GetFlag(FLAGS_data));
  spec.set_backbone(absl::GetFlag(FLAGS_backbone));
  const bool bf16 = absl::GetFlag(FLAGS_precision) == "bf16";
  const kennel::v1::Precision precision =
      bf16 ? kennel::v1::PRECISION_BF16 : kennel::v1::PRECISION_FP32;
  spec.set_precision(precision);
  auto prepared = PrepareSpec(spec, options);
  if (!prepared.ok()) {
    std::cerr << prepared.status() << "\n";
    return 1;
  }
  const int size = prepared->backbone.preprocessing.input_size();
  QuietContext context;

  // Raw forward: random normalised tensors, the same extractor code.
  auto extractor = FeatureExtractor::Create(*prepared->backbone_module,
                                            precision, torch::kCPU);
  if (!extractor.ok()) {
    std::cerr << extractor.status() << "\n";
    return 1;
  }
  const int batch = absl::GetFlag(FLAGS_batch);
  std::vector<float> pixels(static_cast<size_t>(batch) * 3 * size * size);
  torch::Tensor random = torch::randn({batch, 3, size, size});
  std::memcpy(pixels.data(), random.data_ptr<float>(),
              pixels.size() * sizeof(float));
  // TorchScript optimises a frozen graph over its first runs.
  for (int i = 0; i < 3; ++i) {
    (void)(*extractor)->Run(pixels.data(), batch, size);
  }
  const int raw_batches = std::max(1, absl::GetFlag(FLAGS_raw_images) / batch);
  auto raw_forward = [&] {
    auto start = Clock::now();
    for (int i = 0; i < raw_batches; ++i) {
      (void)(*extractor)->Run(pixels.data(), batch, size);
    }
    return raw_batches * batch / Since(start);
  };
  const double raw_before = raw_forward();

  // Paired rounds: a slice of the training images through the pipeline
  // (its own cold cache), between two raw forwards of as many images, so
  // both sides of each ratio see the same load on a shared machine. The
  // extractor's one-off setup is left out of these steady-state rates.
  std::vector<double> round_ratios;
  {
    const int rounds = absl::GetFlag(FLAGS_rounds);
    const size_t per_round = static_cast<size_t>(raw_batches) * batch;
    TrainerOptions round_options = options;
    round_options.cache_dir = options.cache_dir + "/rounds";
    for (int r = 0; r < rounds; ++r) {
      const size_t begin = r * per_round;
      if (begin + per_round > prepared->dataset.train.images.size()) break;
      PreparedSpec slice = *prepared;
      slice.dataset.train.images.assign(
          prepared->dataset.train.images.begin() + begin,
          prepared->dataset.train.images.begin() + begin + per_round);
      slice.dataset.valid.images.clear();
      slice.dataset.test.images.clear();
      const double before = raw_forward();
      auto start = Clock::now();
      auto pass = ExtractFeatures(slice, precision, round_options, context);
      const double seconds = Since(start);
      const double after = raw_forward();
      if (!pass.ok()) {
        std::cerr << pass.status() << "\n";
        return 1;
      }
      const double ips = per_round / (seconds - pass->setup_seconds);
      round_ratios.push_back(ips / ((before + after) / 2));
      LOG(INFO) << absl::StrFormat(
          "round %d: raw %.2f / %.2f img/s, pipeline %.2f img/s (setup %.1f "
          "s), ratio %.3f",
          r, before, after, ips, pass->setup_seconds, round_ratios.back());
    }
  }
  std::vector<double> sorted_ratios = round_ratios;
  std::sort(sorted_ratios.begin(), sorted_ratios.end());
  const double median_ratio =
      sorted_ratios.empty() ? 0 : sorted_ratios[sorted_ratios.size() / 2];

  // Extraction through the pipeline, cold cache, then warm cache.
  auto cold_start = Clock::now();
  auto cold = ExtractFeatures(*prepared, precision, options, context);
  const double cold_seconds = Since(cold_start);
  if (!cold.ok()) {
    std::cerr << cold.status() << "\n";
    return 1;
  }
  const int64_t images = static_cast<int64_t>(cold->content_digests.size());
  // Measured again after the pass, so that a change in the machine's load
  // during the pass shows; the ratio uses the mean.
  const double raw_after = raw_forward();
  const double raw_ips = (raw_before + raw_after) / 2;
  auto warm_start = Clock::now();
  auto warm = ExtractFeatures(*prepared, precision, options, context);
  const double warm_seconds = Since(warm_start);
  if (!warm.ok()) {
    std::cerr << warm.status() << "\n";
    return 1;
  }

  // Head epochs on the cached features, and on a full-size set.
  HeadConfig config;
  config.learning_rate = 1e-3;
  config.batch_size = absl::GetFlag(FLAGS_head_batch);
  config.epochs = absl::GetFlag(FLAGS_head_epochs);
  HeadTrainer trainer(cold->features);
  auto head = trainer.Train(config, nullptr, nullptr);
  double head_epoch = 0;
  for (const EpochStats& e : head->epochs) head_epoch += e.seconds;
  head_epoch /= std::max<size_t>(1, head->epochs.size());
  auto full = std::make_shared<FeatureSet>();
  const int classes = cold->features->num_classes;
  const int dim = cold->features->feature_dim;
  const int full_train = absl::GetFlag(FLAGS_full_train);
  full->num_classes = classes;
  full->feature_dim = dim;
  full->train.features = torch::randn({full_train, dim}).relu();
  full->train.labels = torch::randint(classes, {full_train}, torch::kInt64);
  full->valid.features = torch::randn({full_train / 8, dim}).relu();
  full->valid.labels = torch::randint(classes, {full_train / 8}, torch::kInt64);
  HeadTrainer full_trainer(full);
  auto full_run = full_trainer.Train(config, nullptr, nullptr);
  double full_epoch = 0;
  for (const EpochStats& e : full_run->epochs) full_epoch += e.seconds;
  full_epoch /= std::max<size_t>(1, full_run->epochs.size());

  // Fine-tune on the first images, one epoch, a token validation split.
  Dataset subset = prepared->dataset;
  const size_t n = std::min<size_t>(absl::GetFlag(FLAGS_finetune_images),
                                    subset.train.images.size());
  subset.train.images.resize(n);
  subset.valid.images.resize(std::min<size_t>(8, subset.valid.images.size()));
  FinetuneConfig ft;
  ft.hyper.learning_rate = 1e-4;
  ft.hyper.batch_size = absl::GetFlag(FLAGS_finetune_batch);
  ft.hyper.epochs = 1;
  ft.workers = options.threads;
  ft.prefetch = 2 * options.threads;
  torch::jit::Module module = prepared->backbone_module->deepcopy();
  double finetune_ips = 0, finetune_wait = 0;
  auto tuned = Finetune(
      std::move(module), prepared->backbone, subset, ft,
      [&](const EpochStats& s, double wait) {
        finetune_ips = s.images_per_second;
        finetune_wait = wait;
        return EpochDecision::kContinue;
      },
      nullptr, nullptr);
  if (!tuned.ok()) {
    std::cerr << tuned.status() << "\n";
    return 1;
  }

  std::string ratios;
  for (double r : round_ratios) {
    absl::StrAppend(&ratios, ratios.empty() ? "" : ", ",
                    absl::StrFormat("%.4f", r));
  }
  std::cout << absl::StrFormat(
      "{\"paired_round_ratios\": [%s], \"paired_median_ratio\": %.4f, "
      "\"extraction_setup_seconds\": %.3f, ",
      ratios, median_ratio, cold->setup_seconds);
  std::cout << absl::StrFormat(
      "\"precision\": \"%s\", \"threads\": %d, \"input_size\": %d, "
      "\"feature_dim\": %d, \"classes\": %d, \"raw_forward_batch\": %d, "
      "\"raw_forward_images_per_second\": %.3f, \"raw_forward_before\": %.3f, "
      "\"raw_forward_after\": %.3f, "
      "\"extraction_images\": %d, "
      "\"extraction_seconds\": %.3f, \"extraction_images_per_second\": %.3f, "
      "\"extraction_over_raw\": %.4f, \"cached_pass_seconds\": %.3f, "
      "\"cached_pass_images_per_second\": %.1f, \"cache_hits_second_pass\": "
      "%d, \"head_train_size\": %d, \"head_epoch_seconds\": %.5f, "
      "\"head_full_train_size\": %d, \"head_full_epoch_seconds\": %.5f, "
      "\"head_batch\": %d, \"finetune_images\": %d, \"finetune_batch\": %d, "
      "\"finetune_images_per_second\": %.3f, \"finetune_data_wait_share\": "
      "%.4f}\n",
      absl::GetFlag(FLAGS_precision), options.threads, size, dim, classes,
      batch, raw_ips, raw_before, raw_after, images, cold_seconds,
      images / cold_seconds, images / cold_seconds / raw_ips, warm_seconds,
      images / warm_seconds, warm->cache_hits, cold->features->train.size(),
      head_epoch, full_train, full_epoch, config.batch_size, n,
      ft.hyper.batch_size, finetune_ips, finetune_wait);
  return 0;
}

}  // namespace
}  // namespace kennel::trainer

int main(int argc, char** argv) {
  kennel::AcceptDashedFlags(argc, argv);
  absl::ParseCommandLine(argc, argv);
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  return kennel::trainer::Run();
}
