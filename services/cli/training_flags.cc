#include "services/cli/training_flags.h"

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, data, "",
          "train/tune: data set, a folder under the trainer's --data-root or "
          "s3://bucket/prefix, holding train/ valid/ test/.");
ABSL_FLAG(std::string, backbone, "",
          "train/tune: TorchScript feature extractor, a path under the "
          "trainer's --data-root or an s3:// key.");
ABSL_FLAG(std::string, mode, "head",
          "train/tune: head (frozen backbone, cached features) or finetune.");
ABSL_FLAG(std::string, lr, "",
          "train/tune: Adam learning rate (default 0.001). tune also takes a "
          "set (0.001,0.01) or a range (0.001:0.1:log).");
ABSL_FLAG(std::string, weight_decay, "",
          "train/tune: Adam weight decay (default 0); tune: also a set or "
          "range (0:1e-5).");
ABSL_FLAG(std::string, batch_size, "",
          "train/tune: images per step (default 64); tune: also a set "
          "(64,128,256) or an integer range (32:256:log).");
ABSL_FLAG(std::string, epochs, "",
          "train/tune: passes over the training split (default 5); tune: "
          "also a set or an integer range.");
ABSL_FLAG(uint64_t, seed, 0,
          "train/tune: seeds initialisation, shuffling and augmentation, and "
          "tune's search.");
ABSL_FLAG(std::string, register_as, "",
          "train/tune: register the resulting model under this name.");
ABSL_FLAG(std::vector<std::string>, alias, {},
          "train/tune: point these aliases (comma-separated) at the "
          "registered version.");
ABSL_FLAG(std::string, precision, "auto",
          "train/tune: precision of the backbone pass and the served model: "
          "auto, fp32 or bf16.");
ABSL_FLAG(std::string, device, "",
          "train/tune: auto, cpu or cuda (default: the trainer's).");

namespace kennel::cli {

absl::StatusOr<kennel::v1::JobSpec> JobSpecFromFlags() {
  kennel::v1::JobSpec spec;
  spec.set_data(absl::GetFlag(FLAGS_data));
  spec.set_backbone(absl::GetFlag(FLAGS_backbone));
  if (spec.data().empty()) {
    return absl::InvalidArgumentError(
        "--data is required: a data set folder under the trainer's "
        "--data-root, or s3://bucket/prefix");
  }
  if (spec.backbone().empty()) {
    return absl::InvalidArgumentError(
        "--backbone is required: a TorchScript feature extractor (see "
        "tools/export_backbone.py)");
  }
  const std::string precision = absl::GetFlag(FLAGS_precision);
  if (precision == "auto" || precision.empty()) {
    spec.set_precision(kennel::v1::PRECISION_AUTO);
  } else if (precision == "fp32") {
    spec.set_precision(kennel::v1::PRECISION_FP32);
  } else if (precision == "bf16") {
    spec.set_precision(kennel::v1::PRECISION_BF16);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--precision=", precision, ": use auto, fp32 or bf16"));
  }
  spec.set_device(absl::GetFlag(FLAGS_device));
  spec.set_register_as(absl::GetFlag(FLAGS_register_as));
  for (const std::string& alias : absl::GetFlag(FLAGS_alias)) {
    if (!alias.empty()) spec.add_aliases(alias);
  }
  if (spec.aliases_size() > 0 && spec.register_as().empty()) {
    return absl::InvalidArgumentError(
        "--alias needs --register-as: only a registered model can have an "
        "alias");
  }
  return spec;
}

absl::StatusOr<kennel::v1::TrainMode> TrainModeFromFlags() {
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "head" || mode.empty()) return kennel::v1::TRAIN_MODE_HEAD;
  if (mode == "finetune" || mode == "fine-tune") {
    return kennel::v1::TRAIN_MODE_FINETUNE;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--mode=", mode, ": use head or finetune"));
}

}  // namespace kennel::cli
