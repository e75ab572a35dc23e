// kennel models: push, list, inspect, pull, alias and delete model versions
// in kennel-registry, and collect unreferenced blobs.
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/names.h"
#include "common/registry_client.h"
#include "common/status.h"
#include "services/cli/command.h"
#include "services/cli/training_flags.h"

ABSL_FLAG(std::string, file, "",
          "models push: the TorchScript file to upload.");
ABSL_FLAG(std::string, labels, "",
          "models push: text file with one class label per line, in the "
          "order of the model's outputs.");
ABSL_FLAG(int, input_size, 224,
          "models push: side of the square image the model takes.");
ABSL_FLAG(int, resize, 0,
          "models push: shorter side before the centre crop of "
          "--input-size (default input-size * 256 / 224, so 256 for 224).");
ABSL_FLAG(std::string, mean, "0.485,0.456,0.406",
          "models push: per-channel mean on [0,1] pixels (ImageNet's by "
          "default).");
ABSL_FLAG(std::string, std, "0.229,0.224,0.225",
          "models push: per-channel standard deviation (ImageNet's by "
          "default).");
ABSL_FLAG(std::string, color_order, "rgb",
          "models push: channel order the model takes, rgb or bgr.");
ABSL_FLAG(std::string, o, "", "models pull: file to write (same as --output).");
ABSL_FLAG(std::string, output, "", "models pull: file to write.");
ABSL_FLAG(std::string, digest, "",
          "models pull: which component to fetch (default: the model).");
ABSL_FLAG(absl::Duration, grace, absl::Hours(1),
          "models gc: keep unreferenced blobs younger than this.");
ABSL_FLAG(bool, dry_run, false,
          "models gc: report what would be removed, remove nothing.");

namespace kennel::cli {
namespace {

std::string HumanBytes(int64_t bytes) {
  if (bytes < 1000) return absl::StrCat(bytes, " B");
  if (bytes < 1000 * 1000) return absl::StrFormat("%.1f kB", bytes / 1e3);
  if (bytes < int64_t{1000} * 1000 * 1000)
    return absl::StrFormat("%.1f MB", bytes / 1e6);
  return absl::StrFormat("%.2f GB", bytes / 1e9);
}

std::string FormatTime(const google::protobuf::Timestamp& ts) {
  if (ts.seconds() == 0 && ts.nanos() == 0) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S",
                          absl::FromUnixSeconds(ts.seconds()),
                          absl::UTCTimeZone());
}

std::string ShortDigest(const std::string& digest) {
  return digest.size() > 19 ? digest.substr(0, 19) : digest;
}

std::string PrecisionName(v1::Precision precision) {
  switch (precision) {
    case v1::PRECISION_FP32:
      return "fp32";
    case v1::PRECISION_BF16:
      return "bf16";
    default:
      return "auto";
  }
}

// Prints transfer progress to stderr for transfers over a few MB: one
// rewritten line on a terminal, a line per quarter otherwise.
class Progress {
 public:
  explicit Progress(std::string what)
      : what_(std::move(what)), start_(absl::Now()) {}

  void Update(int64_t done, int64_t total) {
    if (total < (4 << 20) || done == 0) return;
    const int quarter = static_cast<int>(done * 4 / total);
    const absl::Time now = absl::Now();
    if (tty_) {
      if (done != total && now - last_ < absl::Milliseconds(100)) return;
    } else if (quarter == last_quarter_) {
      return;
    }
    last_ = now;
    last_quarter_ = quarter;
    const double seconds = std::max(1e-3, absl::ToDoubleSeconds(now - start_));
    std::cerr << (tty_ ? "\r" : "") << what_ << ": " << HumanBytes(done)
              << " / " << HumanBytes(total)
              << absl::StrFormat(" (%.0f MB/s)", done / 1e6 / seconds)
              << (tty_ ? "" : "\n") << std::flush;
    shown_ = true;
  }
  void Done() {
    if (shown_ && tty_) std::cerr << "\n";
  }
  ProgressFn fn() {
    return [this](int64_t done, int64_t total) { Update(done, total); };
  }

 private:
  const std::string what_;
  const absl::Time start_;
  const bool tty_ = isatty(2);
  absl::Time last_ = absl::InfinitePast();
  int last_quarter_ = -1;
  bool shown_ = false;
};

absl::StatusOr<std::vector<float>> ParseFloats(const std::string& flag,
                                               const std::string& text) {
  std::vector<float> out;
  for (absl::string_view part :
       absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    float value;
    if (!absl::SimpleAtof(absl::StripAsciiWhitespace(part), &value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", flag, " takes comma-separated numbers, not \"", text, "\""));
    }
    out.push_back(value);
  }
  if (out.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " needs three values, one per channel"));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> ReadLabels(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read labels file " + path);
  std::vector<std::string> labels;
  std::string line;
  while (std::getline(in, line)) {
    std::string label(absl::StripAsciiWhitespace(line));
    if (!label.empty()) labels.push_back(std::move(label));
  }
  if (labels.empty())
    return absl::InvalidArgumentError(path + " holds no labels");
  return labels;
}

absl::StatusOr<v1::PushHeader> HeaderFromFlags(const std::string& name) {
  v1::PushHeader header;
  header.set_name(name);
  v1::ComponentSpec* component = header.add_components();
  component->set_role(v1::COMPONENT_ROLE_MODEL);
  component->set_format("torchscript");
  if (const std::string labels = absl::GetFlag(FLAGS_labels); !labels.empty()) {
    ASSIGN_OR_RETURN(std::vector<std::string> read, ReadLabels(labels));
    for (std::string& label : read) header.add_labels(std::move(label));
  }
  v1::Preprocessing* pre = header.mutable_preprocessing();
  const int input = absl::GetFlag(FLAGS_input_size);
  if (input <= 0 || input > 4096) {
    return absl::InvalidArgumentError(
        "--input-size must be between 1 and 4096");
  }
  int resize = absl::GetFlag(FLAGS_resize);
  if (resize == 0) resize = (input * 256 + 112) / 224;
  if (resize < input) {
    return absl::InvalidArgumentError("--resize must be at least --input-size");
  }
  pre->set_input_size(input);
  pre->set_resize(resize);
  pre->set_resize_mode(v1::RESIZE_MODE_SHORTER_SIDE_THEN_CROP);
  ASSIGN_OR_RETURN(std::vector<float> mean,
                   ParseFloats("mean", absl::GetFlag(FLAGS_mean)));
  ASSIGN_OR_RETURN(std::vector<float> stdev,
                   ParseFloats("std", absl::GetFlag(FLAGS_std)));
  for (float s : stdev) {
    if (s <= 0)
      return absl::InvalidArgumentError("--std values must be positive");
  }
  for (float m : mean) pre->add_mean(m);
  for (float s : stdev) pre->add_std(s);
  const std::string order =
      absl::AsciiStrToLower(absl::GetFlag(FLAGS_color_order));
  if (order == "bgr") {
    pre->set_color_order(v1::COLOR_ORDER_BGR);
  } else if (order != "rgb") {
    return absl::InvalidArgumentError("--color-order is rgb or bgr");
  }
  const std::string precision =
      absl::AsciiStrToLower(absl::GetFlag(FLAGS_precision));
  if (precision == "fp32") {
    header.set_precision(v1::PRECISION_FP32);
  } else if (precision == "bf16") {
    header.set_precision(v1::PRECISION_BF16);
  } else if (precision != "auto") {
    return absl::InvalidArgumentError("--precision is auto, fp32 or bf16");
  }
  for (const std::string& alias : absl::GetFlag(FLAGS_alias)) {
    RETURN_IF_ERROR(ValidateName("alias", alias));
    header.add_aliases(alias);
  }
  return header;
}

std::vector<std::string> VersionRow(const v1::ModelVersion& v) {
  int64_t size = 0;
  for (const auto& c : v.components()) size += c.size();
  return {absl::StrCat(v.version()),
          FormatTime(v.created_at()),
          HumanBytes(size),
          v.components().empty() ? "-" : ShortDigest(v.components(0).digest()),
          PrecisionName(v.precision()),
          v.metrics().measured()
              ? absl::StrFormat("%.4f", v.metrics().valid_accuracy())
              : "-",
          v.aliases().empty() ? "-" : absl::StrJoin(v.aliases(), ",")};
}

// Refuses a file that cannot be TorchScript before anything is sent:
// torch.jit.save writes a zip archive, which starts with a local file header.
// (The registry stores any bytes; inference is what loads them.)
absl::Status CheckLooksLikeTorchScript(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::OkStatus();  // the push reports why it cannot read it
  char magic[4] = {};
  in.read(magic, sizeof(magic));
  if (in.gcount() == 4 &&
      std::string(magic, 4) == std::string("PK\x03\x04", 4)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      path,
      " is not a TorchScript file: torch.jit.save writes a zip archive, and "
      "this file does not start like one; nothing was pushed"));
}

int Push(RegistryClient& client, const std::vector<std::string>& args) {
  if (args.size() != 1)
    return UsageError("models push takes one NAME; see --help");
  const std::string file = absl::GetFlag(FLAGS_file);
  if (file.empty()) return UsageError("models push needs --file MODEL.pt");
  if (absl::Status s = ValidateName("model name", args[0]); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  auto header = HeaderFromFlags(args[0]);
  if (!header.ok()) return UsageError(std::string(header.status().message()));
  if (absl::Status s = CheckLooksLikeTorchScript(file); !s.ok()) {
    return Fail(s);
  }
  Progress progress("pushing " + args[0]);
  auto version = client.PushFiles(*header, {file}, progress.fn());
  progress.Done();
  if (!version.ok()) return Fail(version.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(*version) << "\n";
  } else {
    const auto& c = version->components(0);
    std::cout << "pushed " << version->name() << ":" << version->version()
              << " (" << HumanBytes(c.size()) << ", " << c.digest() << ")";
    if (!version->aliases().empty()) {
      std::cout << ", aliases " << absl::StrJoin(version->aliases(), ",");
    }
    std::cout << "\n";
  }
  return kExitOk;
}

int List(RegistryClient& client, const std::vector<std::string>& args) {
  if (args.size() > 1) return UsageError("models ls takes at most one NAME");
  if (args.empty()) {
    auto models = client.ListModels();
    if (!models.ok()) return Fail(models.status());
    if (absl::GetFlag(FLAGS_json)) {
      std::cout << ToJson(*models) << "\n";
      return kExitOk;
    }
    std::vector<std::vector<std::string>> rows = {
        {"NAME", "LATEST", "VERSIONS", "UPDATED", "ALIASES"}};
    for (const auto& m : models->models()) {
      std::vector<std::string> aliases;
      for (const auto& a : m.aliases())
        aliases.push_back(absl::StrCat(a.alias(), "=", a.version()));
      rows.push_back({m.name(), absl::StrCat(m.latest_version()),
                      absl::StrCat(m.version_count()),
                      FormatTime(m.updated_at()),
                      aliases.empty() ? "-" : absl::StrJoin(aliases, ",")});
    }
    std::cout << Table(rows);
    return kExitOk;
  }
  v1::ListVersionsResponse all;
  std::string token;
  do {
    auto page = client.ListVersions(args[0], 1000, token);
    if (!page.ok()) return Fail(page.status());
    for (auto& v : *page->mutable_versions())
      *all.add_versions() = std::move(v);
    token = page->next_page_token();
  } while (!token.empty());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(all) << "\n";
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows = {{"VERSION", "CREATED (UTC)",
                                                 "SIZE", "DIGEST", "PRECISION",
                                                 "VALID_ACC", "ALIASES"}};
  for (const auto& v : all.versions()) rows.push_back(VersionRow(v));
  std::cout << Table(rows);
  return kExitOk;
}

int Show(RegistryClient& client, const std::vector<std::string>& args) {
  if (args.size() != 1) return UsageError("models show takes one REF");
  auto v = client.GetModel(args[0]);
  if (!v.ok()) return Fail(v.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(*v) << "\n";
    return kExitOk;
  }
  const auto& pre = v->preprocessing();
  std::vector<std::vector<std::string>> rows = {
      {"name:", v->name()},
      {"version:", absl::StrCat(v->version())},
      {"created:", FormatTime(v->created_at()) + " UTC"},
      {"aliases:",
       v->aliases().empty() ? "-" : absl::StrJoin(v->aliases(), ", ")},
      {"precision:", PrecisionName(v->precision())},
      {"labels:",
       absl::StrCat(
           v->labels_size(), v->labels().empty() ? "" : " (",
           absl::StrJoin(v->labels().begin(),
                         v->labels().begin() + std::min(5, v->labels_size()),
                         ", "),
           v->labels_size() > 5 ? ", ..." : "",
           v->labels().empty() ? "" : ")")},
      {"preprocessing:",
       absl::StrFormat(
           "%s %d%s, mean [%s], std [%s], %s",
           pre.resize_mode() == v1::RESIZE_MODE_STRETCH ? "stretch to"
                                                        : "centre crop",
           pre.input_size(),
           pre.resize_mode() == v1::RESIZE_MODE_STRETCH
               ? ""
               : absl::StrCat(" of shorter side ", pre.resize()),
           absl::StrJoin(pre.mean(), ", "), absl::StrJoin(pre.std(), ", "),
           pre.color_order() == v1::COLOR_ORDER_BGR ? "BGR" : "RGB")}};
  if (v->metrics().measured()) {
    rows.push_back(
        {"metrics:",
         absl::StrFormat(
             "valid loss %.4f, valid accuracy %.4f, test accuracy %.4f",
             v->metrics().valid_loss(), v->metrics().valid_accuracy(),
             v->metrics().test_accuracy())});
  }
  if (!v->lineage().job_id().empty()) {
    const auto& l = v->lineage();
    rows.push_back(
        {"lineage:",
         absl::StrFormat("job %s, lr %g, weight decay %g, batch %d, "
                         "%d epochs, data %s",
                         l.job_id(), l.hyperparameters().learning_rate(),
                         l.hyperparameters().weight_decay(),
                         l.hyperparameters().batch_size(),
                         l.hyperparameters().epochs(), l.dataset_uri())});
  }
  if (!v->description().empty())
    rows.push_back({"description:", v->description()});
  std::cout << Table(rows) << "\n";
  std::vector<std::vector<std::string>> components = {
      {"ROLE", "FORMAT", "SIZE", "DIGEST"}};
  for (const auto& c : v->components()) {
    std::string role = v1::ComponentRole_Name(c.role());
    role = absl::AsciiStrToLower(role.substr(role.rfind('_') + 1));
    components.push_back({role, c.format(), HumanBytes(c.size()), c.digest()});
  }
  std::cout << Table(components);
  return kExitOk;
}

int Pull(RegistryClient& client, const std::vector<std::string>& args) {
  if (args.size() != 1) return UsageError("models pull takes one REF");
  std::string output = absl::GetFlag(FLAGS_o);
  if (output.empty()) output = absl::GetFlag(FLAGS_output);
  if (output.empty()) return UsageError("models pull needs -o FILE");
  auto v = client.GetModel(args[0]);
  if (!v.ok()) return Fail(v.status());
  const v1::Component* chosen = nullptr;
  const std::string digest = absl::GetFlag(FLAGS_digest);
  for (const auto& c : v->components()) {
    if (!digest.empty()
            ? c.digest() == digest
            : (chosen == nullptr || c.role() == v1::COMPONENT_ROLE_MODEL)) {
      if (chosen == nullptr || chosen->role() != v1::COMPONENT_ROLE_MODEL)
        chosen = &c;
    }
  }
  if (chosen == nullptr) {
    return Fail(absl::NotFoundError(absl::StrCat(
        v->name(), ":", v->version(), " has no component ", digest)));
  }
  const std::string pinned = absl::StrCat(v->name(), ":", v->version());
  Progress progress("pulling " + pinned);
  absl::Status status =
      client.PullComponent(pinned, chosen->digest(), output, progress.fn());
  progress.Done();
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(*chosen) << "\n";
  } else {
    std::cout << "pulled " << pinned << " to " << output << " ("
              << HumanBytes(chosen->size()) << ", " << chosen->digest()
              << ")\n";
  }
  return kExitOk;
}

int Alias(RegistryClient& client, const std::vector<std::string>& args) {
  if (args.size() != 3)
    return UsageError("models alias takes NAME ALIAS VERSION");
  int64_t version = 0;
  if (!absl::SimpleAtoi(args[2], &version) || version <= 0) {
    return UsageError("VERSION must be a positive number, not \"" + args[2] +
                      "\"");
  }
  auto alias = client.SetAlias(args[0], args[1], version);
  if (!alias.ok()) return Fail(alias.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(*alias) << "\n";
  } else {
    std::cout << alias->name() << "@" << alias->alias() << " -> "
              << alias->version() << "\n";
  }
  return kExitOk;
}

int Unalias(RegistryClient& client, const std::vector<std::string>& args) {
  if (args.size() != 2) return UsageError("models unalias takes NAME ALIAS");
  absl::Status status = client.DeleteAlias(args[0], args[1]);
  if (!status.ok()) return Fail(status);
  if (!absl::GetFlag(FLAGS_json))
    std::cout << "removed " << args[0] << "@" << args[1] << "\n";
  return kExitOk;
}

int Remove(RegistryClient& client, const std::vector<std::string>& args) {
  if (args.size() != 1) return UsageError("models rm takes NAME:VERSION");
  auto ref = ParseModelRef(args[0]);
  if (!ref.ok() || ref->version <= 0) {
    return UsageError("models rm takes NAME:VERSION (e.g. dogs:3), not \"" +
                      args[0] + "\"");
  }
  absl::Status status = client.DeleteVersion(ref->name, ref->version);
  if (!status.ok()) return Fail(status);
  if (!absl::GetFlag(FLAGS_json))
    std::cout << "deleted " << ref->ToString() << "\n";
  return kExitOk;
}

int Collect(RegistryClient& client, const std::vector<std::string>& args) {
  if (!args.empty()) return UsageError("models gc takes no arguments");
  const absl::Duration grace = absl::GetFlag(FLAGS_grace);
  if (grace < absl::Seconds(1))
    return UsageError("--grace must be at least 1s");
  const bool dry_run = absl::GetFlag(FLAGS_dry_run);
  auto result = client.GarbageCollect(absl::ToInt64Seconds(grace), dry_run);
  if (!result.ok()) return Fail(result.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(*result) << "\n";
  } else {
    std::cout << (dry_run ? "would remove " : "removed ")
              << result->removed_digests_size() << " unreferenced blobs ("
              << HumanBytes(result->removed_bytes()) << "); kept "
              << result->kept_blobs() << "\n";
  }
  return kExitOk;
}

int RunModels(const std::vector<std::string>& args) {
  if (args.empty())
    return UsageError("models needs a subcommand; see kennel models --help");
  auto options = ClientOptionsFromFlags(kRegistryAddr);
  if (!options.ok()) return Fail(options.status());
  const std::string sub = args[0];
  // A sweep reads every manifest and lists every blob: on a large bucket it
  // outlasts the usual 30 s. One stopped by its deadline keeps what it
  // removed, but it should not stop for want of a longer default.
  if (sub == "gc") {
    const absl::CommandLineFlag* timeout = absl::FindCommandLineFlag("timeout");
    if (timeout != nullptr &&
        timeout->CurrentValue() == timeout->DefaultValue()) {
      options->timeout = std::max(options->timeout, absl::Minutes(10));
    }
  }
  RegistryClient client(*options);
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (sub == "push") return Push(client, rest);
  if (sub == "ls" || sub == "list") return List(client, rest);
  if (sub == "show") return Show(client, rest);
  if (sub == "pull") return Pull(client, rest);
  if (sub == "alias") return Alias(client, rest);
  if (sub == "unalias") return Unalias(client, rest);
  if (sub == "rm") return Remove(client, rest);
  if (sub == "gc") return Collect(client, rest);
  return UsageError("unknown models subcommand \"" + sub +
                    "\"; see kennel models --help");
}

KENNEL_CLI_COMMAND(
    {"models", "push, list, show, pull, alias and delete registered models",
     "Usage: kennel models SUBCOMMAND [ARGS] [--addr HOST:PORT] [--json]\n"
     "\n"
     "Talks to kennel-registry (default 127.0.0.1:50051). A REF is NAME (the "
     "newest\n"
     "version), NAME:VERSION or NAME@ALIAS. Mutating subcommands (push, "
     "alias,\n"
     "unalias, rm, gc) need the registry's token when it has one "
     "(--token-file).\n"
     "\n"
     "  push NAME --file MODEL.pt [--labels LABELS.txt] [--alias A[,B]]\n"
     "       [--input-size 224 --resize 256 --mean M,M,M --std S,S,S]\n"
     "       [--color-order rgb|bgr] [--precision auto|fp32|bf16]\n"
     "      Uploads a TorchScript file as the next version of NAME. Without\n"
     "      preprocessing flags the model gets ImageNet's: shorter side 256, "
     "centre\n"
     "      crop 224, mean 0.485,0.456,0.406, std 0.229,0.224,0.225, RGB. Only "
     "bytes\n"
     "      the registry lacks are sent. --labels: one class name per line.\n"
     "  ls [NAME]\n"
     "      Lists models, or the versions of NAME (newest first).\n"
     "  show REF\n"
     "      Shows a version's manifest: labels, preprocessing, lineage, "
     "metrics,\n"
     "      components.\n"
     "  pull REF -o FILE [--digest sha256:...]\n"
     "      Downloads the model file (or the component with --digest), checks "
     "its\n"
     "      sha256, and only then puts it at FILE.\n"
     "  alias NAME ALIAS VERSION\n"
     "      Points ALIAS (e.g. production) at VERSION, creating or moving it.\n"
     "  unalias NAME ALIAS\n"
     "      Removes an alias.\n"
     "  rm NAME:VERSION\n"
     "      Deletes a version (refused while an alias points at it). Its "
     "number is\n"
     "      never reused; its blobs go at the next gc.\n"
     "  gc [--grace 1h] [--dry-run]\n"
     "      Removes blobs no version references that are older than --grace.\n"
     "      Its --timeout defaults to 10m; one that runs out keeps what it "
     "removed.\n"
     "\n"
     "Transfers over 4 MB show progress on stderr. Exit status: 0 success, 1 "
     "the\n"
     "registry refused or failed (the status is printed), 2 bad command line.\n"
     "\n"
     "Examples:\n"
     "  kennel models push dogs --file resnet50_dogs.pt --labels breeds.txt "
     "--alias staging\n"
     "  kennel models ls dogs\n"
     "  kennel models alias dogs production 3\n"
     "  kennel models pull dogs@production -o /tmp/model.pt\n",
     &RunModels});

}  // namespace
}  // namespace kennel::cli
