// kennel-head-trace: exports what a reference implementation needs to replay
// Kennel's head training step for step: the cached features of a data set
// (read through the same feature cache the trainer fills), the seeded initial
// weights, the batch order of every epoch, and the losses Kennel's head
// trainer reached. The parity test replays this in Python PyTorch.
//
// Output files in --out: {train,valid}_features.f32 ([N, F] float32),
// {train,valid}_labels.i64, init_weight.f32 ([C, F]), init_bias.f32,
// orders.i64 ([epochs, N]), final_weight.f32, final_bias.f32 and
// result.json (sizes, hyperparameters, per-step and per-epoch losses, cache
// hits and misses).
#include <glog/logging.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/dashed_flags.h"
#include "services/trainer/train_job.h"

ABSL_FLAG(std::string, data_root, "",
          "Folder the data and backbone lie under.");
ABSL_FLAG(std::string, data, "", "Data set folder under --data-root.");
ABSL_FLAG(std::string, backbone, "", "Backbone file under --data-root.");
ABSL_FLAG(std::string, cache_dir, "",
          "The trainer's --cache-dir, whose features/ cache is read.");
ABSL_FLAG(std::string, precision, "fp32", "fp32, bf16 or auto.");
ABSL_FLAG(double, lr, 0.01, "Adam learning rate.");
ABSL_FLAG(double, weight_decay, 0, "Adam weight decay.");
ABSL_FLAG(int, batch_size, 32, "Batch size.");
ABSL_FLAG(int, epochs, 3, "Epochs.");
ABSL_FLAG(uint64_t, seed, 0, "Seed.");
ABSL_FLAG(int, threads, 2, "LibTorch threads.");
ABSL_FLAG(std::string, out, "", "Folder to write the trace into.");

namespace kennel::trainer {
namespace {

class LocalContext : public JobContext {
 public:
  const std::string& job_id() const override { return id_; }
  void Emit(kennel::v1::JobEvent event) override {
    if (event.has_log()) std::cerr << event.log() << "\n";
  }
  bool cancelled() const override { return false; }

 private:
  std::string id_ = "head-trace";
};

bool WriteTensor(const std::string& path, const torch::Tensor& t) {
  torch::Tensor c = t.contiguous();
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(c.data_ptr()),
            c.numel() * c.element_size());
  return out.good();
}

template <typename T>
bool WriteVector(const std::string& path, const std::vector<T>& v) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  return out.good();
}

int Run() {
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::cerr << "kennel-head-trace: --out is required\n";
    return 2;
  }
  std::filesystem::create_directories(out);
  SetComputeThreads(absl::GetFlag(FLAGS_threads));
  TrainerOptions options;
  options.data_root = absl::GetFlag(FLAGS_data_root);
  options.cache_dir = absl::GetFlag(FLAGS_cache_dir);
  options.device = "cpu";
  options.threads = absl::GetFlag(FLAGS_threads);

  kennel::v1::JobSpec spec;
  spec.set_data(absl::GetFlag(FLAGS_data));
  spec.set_backbone(absl::GetFlag(FLAGS_backbone));
  const std::string precision = absl::GetFlag(FLAGS_precision);
  spec.set_precision(precision == "bf16"   ? kennel::v1::PRECISION_BF16
                     : precision == "auto" ? kennel::v1::PRECISION_AUTO
                                           : kennel::v1::PRECISION_FP32);
  auto prepared = PrepareSpec(spec, options);
  if (!prepared.ok()) {
    std::cerr << "kennel-head-trace: " << prepared.status() << "\n";
    return 1;
  }
  LocalContext context;
  auto resolved = ResolvePrecision(*prepared, context);
  if (!resolved.ok()) {
    std::cerr << "kennel-head-trace: " << resolved.status() << "\n";
    return 1;
  }
  auto extraction = ExtractFeatures(*prepared, *resolved, options, context);
  if (!extraction.ok()) {
    std::cerr << "kennel-head-trace: " << extraction.status() << "\n";
    return 1;
  }
  HeadConfig config;
  config.learning_rate = absl::GetFlag(FLAGS_lr);
  config.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  config.batch_size = absl::GetFlag(FLAGS_batch_size);
  config.epochs = absl::GetFlag(FLAGS_epochs);
  config.seed = absl::GetFlag(FLAGS_seed);
  HeadTrainer trainer(extraction->features);
  HeadTrace trace;
  auto run = trainer.Train(config, nullptr, nullptr, &trace);
  if (!run.ok()) {
    std::cerr << "kennel-head-trace: " << run.status() << "\n";
    return 1;
  }
  const FeatureSet& data = *extraction->features;
  bool ok = WriteTensor(out + "/train_features.f32", data.train.features) &&
            WriteTensor(out + "/train_labels.i64", data.train.labels) &&
            WriteTensor(out + "/valid_features.f32", data.valid.features) &&
            WriteTensor(out + "/valid_labels.i64", data.valid.labels) &&
            WriteTensor(out + "/init_weight.f32", trace.initial.weight) &&
            WriteTensor(out + "/init_bias.f32", trace.initial.bias) &&
            WriteTensor(out + "/final_weight.f32", run->weights.weight) &&
            WriteTensor(out + "/final_bias.f32", run->weights.bias);
  std::vector<int64_t> orders;
  for (const auto& order : trace.epoch_orders) {
    orders.insert(orders.end(), order.begin(), order.end());
  }
  ok = ok && WriteVector(out + "/orders.i64", orders);
  std::vector<std::string> steps, epochs, valid;
  for (double loss : trace.step_losses)
    steps.push_back(absl::StrFormat("%.17g", loss));
  for (const EpochStats& e : run->epochs) {
    epochs.push_back(absl::StrFormat("%.17g", e.train_loss));
    valid.push_back(absl::StrFormat("%.17g", e.valid_loss));
  }
  std::ofstream json(out + "/result.json");
  json << "{\"train_size\": " << data.train.size()
       << ", \"valid_size\": " << data.valid.size()
       << ", \"feature_dim\": " << data.feature_dim
       << ", \"num_classes\": " << data.num_classes
       << ", \"epochs\": " << config.epochs
       << ", \"batch_size\": " << config.batch_size << ", \"learning_rate\": "
       << absl::StrFormat("%.17g", config.learning_rate)
       << ", \"weight_decay\": "
       << absl::StrFormat("%.17g", config.weight_decay) << ", \"precision\": \""
       << kennel::v1::Precision_Name(*resolved)
       << "\", \"cache_hits\": " << extraction->cache_hits
       << ", \"cache_misses\": " << extraction->cache_misses
       << ", \"step_losses\": [" << absl::StrJoin(steps, ", ")
       << "], \"epoch_train_loss\": [" << absl::StrJoin(epochs, ", ")
       << "], \"epoch_valid_loss\": [" << absl::StrJoin(valid, ", ") << "]}\n";
  ok = ok && json.good();
  if (!ok) {
    std::cerr << "kennel-head-trace: cannot write " << out << "\n";
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kennel::trainer

int main(int argc, char** argv) {
  kennel::AcceptDashedFlags(argc, argv);
  absl::SetProgramUsageMessage(
      "kennel-head-trace --data-root DIR --data NAME --backbone FILE "
      "--cache-dir DIR --out DIR [--lr X --batch-size N --epochs N --seed N]");
  absl::ParseCommandLine(argc, argv);
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  return kennel::trainer::Run();
}
