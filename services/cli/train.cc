// kennel train / kennel jobs: start a training job and follow it with a live
// line per epoch; list, inspect, follow and cancel jobs.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/grpc_status.h"
#include "kennel/v1/trainer.grpc.pb.h"
#include "services/cli/command.h"
#include "services/cli/training_flags.h"

ABSL_FLAG(std::vector<std::string>, rule, {},
          "train: rule settings, each NAME[:KEY=VALUE...][:warn|stop|off], "
          "e.g. loss_not_decreasing:num_steps=2:stop (comma-separated or "
          "repeated).");
ABSL_FLAG(double, max_bad_image_share, 0,
          "train: fail the job when more than this share of a split's images "
          "cannot be read (default 0.01).");
ABSL_FLAG(std::string, description, "",
          "train: free text stored with the job and the model.");
ABSL_FLAG(double, unaugmented_share, 0,
          "train: fine-tune mode, share of training images used without "
          "augmentation in each epoch, in [0, 1) (default 0: all augmented).");
ABSL_FLAG(bool, detach, false,
          "train: print the job id and return once the job is accepted; "
          "follow it later with `kennel jobs watch`.");
ABSL_FLAG(int64_t, after, 0,
          "jobs watch: replay only events after this sequence number.");
ABSL_DECLARE_FLAG(int, limit);

namespace kennel::cli {
namespace {

std::string CompactJson(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

std::string PrecisionName(kennel::v1::Precision p) {
  switch (p) {
    case kennel::v1::PRECISION_FP32:
      return "fp32";
    case kennel::v1::PRECISION_BF16:
      return "bf16";
    default:
      return "auto";
  }
}

std::string StateName(kennel::v1::JobState state) {
  std::string name = kennel::v1::JobState_Name(state);
  if (absl::StartsWith(name, "JOB_STATE_")) name = name.substr(10);
  return absl::AsciiStrToLower(name);
}

std::string FormatTime(const google::protobuf::Timestamp& ts) {
  if (ts.seconds() == 0 && ts.nanos() == 0) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S",
                          absl::FromUnixSeconds(ts.seconds()),
                          absl::LocalTimeZone());
}

// Prints job events as lines for people, or as JSON lines with --json.
class EventPrinter {
 public:
  explicit EventPrinter(bool json) : json_(json) {}

  void Print(const kennel::v1::JobEvent& event) {
    if (json_) {
      std::cout << CompactJson(event) << std::endl;
      return;
    }
    const std::string trial =
        event.trial() > 0 ? absl::StrCat("[trial ", event.trial(), "] ") : "";
    switch (event.event_case()) {
      case kennel::v1::JobEvent::kLog:
        std::cout << trial << event.log() << std::endl;
        break;
      case kennel::v1::JobEvent::kStarted: {
        const auto& s = event.started();
        std::string counts;
        for (const auto& split : s.splits()) {
          if (!counts.empty()) counts += ", ";
          absl::StrAppend(&counts, split.split(), " ", split.images());
        }
        std::cout << absl::StrFormat(
                         "started: %d classes; images %s; %s, %s; backbone "
                         "%s",
                         s.classes_size(), counts, s.device(),
                         PrecisionName(s.precision()),
                         s.backbone_digest().substr(0, 19))
                  << std::endl;
        break;
      }
      case kennel::v1::JobEvent::kProgress: {
        const auto& p = event.progress();
        std::cout << absl::StrFormat("%s%s %d/%d (%.0f/s)", trial, p.phase(),
                                     p.done(), p.total(), p.items_per_second())
                  << std::endl;
        break;
      }
      case kennel::v1::JobEvent::kEpoch: {
        const auto& e = event.epoch();
        std::cout << absl::StrFormat(
                         "%sepoch %2d/%d  train loss %.4f acc %.3f | valid "
                         "loss %.4f acc %.3f | %.0f img/s, data wait %.0f%%, "
                         "%.1f s",
                         trial, e.epoch(), e.epochs(), e.train_loss(),
                         e.train_accuracy(), e.valid_loss(), e.valid_accuracy(),
                         e.images_per_second(), 100 * e.data_wait_share(),
                         e.seconds())
                  << std::endl;
        break;
      }
      case kennel::v1::JobEvent::kRule: {
        const auto& r = event.rule();
        std::cout << absl::StrFormat(
                         "%sRULE %s (%s) at epoch %d: %s", trial, r.rule(),
                         r.action() == kennel::v1::RULE_ACTION_STOP ? "stop"
                                                                    : "warn",
                         r.epoch(), r.message())
                  << std::endl;
        break;
      }
      case kennel::v1::JobEvent::kProfiler: {
        const auto& p = event.profiler();
        std::cout << absl::StrFormat(
                         "profile: data %.1f s, forward %.1f s, backward %.1f "
                         "s, optimiser %.1f s, features %.1f s, total %.1f s; "
                         "%.0f img/s; CPU %.0f%%; peak RSS %d MiB",
                         p.data_seconds(), p.forward_seconds(),
                         p.backward_seconds(), p.optimizer_seconds(),
                         p.feature_seconds(), p.total_seconds(),
                         p.images_per_second(), 100 * p.cpu_utilization(),
                         p.peak_rss_bytes() >> 20)
                  << std::endl;
        for (const std::string& finding : p.findings()) {
          std::cout << "  - " << finding << std::endl;
        }
        break;
      }
      case kennel::v1::JobEvent::kCompleted: {
        const auto& c = event.completed();
        std::cout << absl::StrFormat(
                         "completed in %.1f s: test accuracy %.4f (loss "
                         "%.4f), valid accuracy %.4f; %s",
                         c.seconds(), c.metrics().test_accuracy(),
                         c.metrics().test_loss(), c.metrics().valid_accuracy(),
                         c.model_ref().empty() ? std::string("not registered")
                                               : "registered " + c.model_ref())
                  << std::endl;
        break;
      }
      case kennel::v1::JobEvent::kFailed:
        std::cout << "failed: "
                  << absl::StatusCodeToString(
                         static_cast<absl::StatusCode>(event.failed().code()))
                  << ": " << event.failed().message() << std::endl;
        break;
      case kennel::v1::JobEvent::kCancelled:
        std::cout << "cancelled: " << event.cancelled().message() << std::endl;
        break;
      default:
        // Tuning events are printed by `kennel tune`; here they are kept
        // short.
        std::cout << trial << CompactJson(event) << std::endl;
        break;
    }
  }

 private:
  const bool json_;
};

struct Followed {
  std::string job_id;
  int64_t last_sequence = 0;
  // The final event seen: completed, failed or cancelled.
  kennel::v1::JobEvent::EventCase end = kennel::v1::JobEvent::EVENT_NOT_SET;
};

absl::Status Drain(grpc::ClientReader<kennel::v1::JobEvent>* reader,
                   EventPrinter& printer, Followed* followed) {
  kennel::v1::JobEvent event;
  while (reader->Read(&event)) {
    if (followed->job_id.empty()) followed->job_id = event.job_id();
    if (event.sequence() <= followed->last_sequence) continue;
    followed->last_sequence = event.sequence();
    printer.Print(event);
    if (event.has_completed() || event.has_failed() || event.has_cancelled()) {
      // A cancelled job that kept a result reports completed, then
      // cancelled; the last one wins.
      followed->end = event.event_case();
    }
  }
  return FromGrpcStatus(reader->Finish());
}

// Follows a job with WatchJob, re-attaching with a back-off when the stream
// breaks (a trainer restart, a network blip), until the job has ended.
absl::Status Follow(kennel::v1::Trainer::Stub& stub,
                    const ClientOptions& options, EventPrinter& printer,
                    Followed* followed) {
  absl::Duration backoff = absl::Milliseconds(200);
  int failures = 0;
  while (true) {
    grpc::ClientContext context;
    PrepareContext(options, &context, absl::InfiniteDuration());
    kennel::v1::WatchJobRequest request;
    request.set_job_id(followed->job_id);
    request.set_after_sequence(followed->last_sequence);
    auto reader = stub.WatchJob(&context, request);
    const int64_t before = followed->last_sequence;
    absl::Status status = Drain(reader.get(), printer, followed);
    if (status.ok()) return absl::OkStatus();
    if (status.code() != absl::StatusCode::kUnavailable) return status;
    failures = followed->last_sequence > before ? 0 : failures + 1;
    if (failures > 20) return status;
    std::cerr << "kennel: lost the trainer (" << status.message()
              << "); re-attaching to job " << followed->job_id << std::endl;
    std::this_thread::sleep_for(absl::ToChronoMilliseconds(backoff));
    backoff = std::min(backoff * 2, absl::Seconds(5));
  }
}

int ExitFor(const Followed& followed) {
  return followed.end == kennel::v1::JobEvent::kCompleted ? kExitOk
                                                          : kExitFailed;
}

absl::StatusOr<double> NumberFlag(const std::string& name,
                                  const std::string& value, double fallback) {
  if (value.empty()) return fallback;
  double out;
  if (!absl::SimpleAtod(value, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, "=", value,
                     " is not a number (ranges and sets are for kennel tune)"));
  }
  return out;
}

// NAME[:KEY=VALUE...][:warn|stop|off]
absl::StatusOr<kennel::v1::RuleConfig> ParseRule(const std::string& text) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  kennel::v1::RuleConfig rule;
  rule.set_name(parts[0]);
  if (rule.name().empty()) {
    return absl::InvalidArgumentError("--rule needs a rule name");
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    if (part == "warn") {
      rule.set_action(kennel::v1::RULE_ACTION_WARN);
    } else if (part == "stop") {
      rule.set_action(kennel::v1::RULE_ACTION_STOP);
    } else if (part == "off") {
      rule.set_disabled(true);
    } else {
      std::vector<std::string> kv = absl::StrSplit(part, '=');
      double value;
      if (kv.size() != 2 || !absl::SimpleAtod(kv[1], &value)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--rule ", text, ": \"", part,
                         "\" is not KEY=NUMBER, warn, stop or off"));
      }
      (*rule.mutable_params())[kv[0]] = value;
    }
  }
  return rule;
}

absl::StatusOr<kennel::v1::TrainRequest> RequestFromFlags() {
  kennel::v1::TrainRequest request;
  auto spec = JobSpecFromFlags();
  if (!spec.ok()) return spec.status();
  *request.mutable_spec() = *std::move(spec);
  for (const std::string& text : absl::GetFlag(FLAGS_rule)) {
    if (text.empty()) continue;
    auto rule = ParseRule(text);
    if (!rule.ok()) return rule.status();
    *request.mutable_spec()->add_rules() = *std::move(rule);
  }
  request.mutable_spec()->set_max_bad_image_share(
      absl::GetFlag(FLAGS_max_bad_image_share));
  request.mutable_spec()->set_description(absl::GetFlag(FLAGS_description));

  kennel::v1::Hyperparameters* h = request.mutable_hyperparameters();
  auto mode = TrainModeFromFlags();
  if (!mode.ok()) return mode.status();
  h->set_mode(*mode);
  auto lr = NumberFlag("lr", absl::GetFlag(FLAGS_lr), kDefaultLearningRate);
  if (!lr.ok()) return lr.status();
  h->set_learning_rate(*lr);
  auto wd = NumberFlag("weight-decay", absl::GetFlag(FLAGS_weight_decay),
                       kDefaultWeightDecay);
  if (!wd.ok()) return wd.status();
  h->set_weight_decay(*wd);
  auto batch = NumberFlag("batch-size", absl::GetFlag(FLAGS_batch_size),
                          kDefaultBatchSize);
  if (!batch.ok()) return batch.status();
  auto epochs =
      NumberFlag("epochs", absl::GetFlag(FLAGS_epochs), kDefaultEpochs);
  if (!epochs.ok()) return epochs.status();
  if (*batch != std::floor(*batch) || *epochs != std::floor(*epochs)) {
    return absl::InvalidArgumentError(
        "--batch-size and --epochs take whole numbers");
  }
  h->set_batch_size(static_cast<int>(*batch));
  h->set_epochs(static_cast<int>(*epochs));
  h->set_seed(absl::GetFlag(FLAGS_seed));
  h->set_unaugmented_share(absl::GetFlag(FLAGS_unaugmented_share));
  return request;
}

absl::StatusOr<std::unique_ptr<kennel::v1::Trainer::Stub>> Stub(
    ClientOptions* options) {
  auto parsed = ClientOptionsFromFlags(kTrainerAddr);
  if (!parsed.ok()) return parsed.status();
  *options = *std::move(parsed);
  auto channel = MakeChannel(*options);
  if (!channel.ok()) return channel.status();
  return kennel::v1::Trainer::NewStub(*channel);
}

int RunTrain(const std::vector<std::string>& args) {
  if (!args.empty()) {
    return UsageError("train takes no arguments; see kennel train --help");
  }
  auto request = RequestFromFlags();
  if (!request.ok()) return UsageError(std::string(request.status().message()));
  ClientOptions options;
  auto stub = Stub(&options);
  if (!stub.ok()) return Fail(stub.status());
  EventPrinter printer(absl::GetFlag(FLAGS_json));
  Followed followed;
  grpc::ClientContext context;
  PrepareContext(options, &context, absl::InfiniteDuration());
  auto reader = (*stub)->Train(&context, *request);
  if (absl::GetFlag(FLAGS_detach)) {
    kennel::v1::JobEvent first;
    if (reader->Read(&first)) {
      context.TryCancel();
      reader->Finish();
      if (absl::GetFlag(FLAGS_json)) {
        std::cout << "{\"job_id\": \"" << first.job_id() << "\"}" << std::endl;
      } else {
        std::cout << first.job_id() << std::endl;
      }
      return kExitOk;
    }
    return Fail(FromGrpcStatus(reader->Finish()));
  }
  absl::Status status = Drain(reader.get(), printer, &followed);
  if (!status.ok()) {
    // Refused before a job existed: nothing to follow.
    if (followed.job_id.empty()) return Fail(status);
    std::cerr << "kennel: the stream of job " << followed.job_id << " broke ("
              << status.message() << "); re-attaching" << std::endl;
  }
  if (followed.end == kennel::v1::JobEvent::EVENT_NOT_SET) {
    if (absl::Status s = Follow(**stub, options, printer, &followed); !s.ok()) {
      return Fail(s);
    }
  }
  return ExitFor(followed);
}

std::string Accuracy(const kennel::v1::Job& job) {
  if (!job.metrics().metrics().measured()) return "-";
  return absl::StrFormat("%.4f", job.metrics().metrics().test_accuracy());
}

int JobsList(kennel::v1::Trainer::Stub& stub, const ClientOptions& options) {
  grpc::ClientContext context;
  PrepareContext(options, &context);
  kennel::v1::ListJobsRequest request;
  request.set_limit(absl::GetFlag(FLAGS_limit));
  kennel::v1::ListJobsResponse response;
  grpc::Status status = stub.ListJobs(&context, request, &response);
  if (!status.ok()) return Fail(FromGrpcStatus(status));
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(response) << "\n";
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows = {
      {"JOB", "KIND", "STATE", "CREATED", "MODEL", "TEST ACC", "MESSAGE"}};
  for (const kennel::v1::Job& job : response.jobs()) {
    std::string message = job.message();
    if (message.size() > 60) message = message.substr(0, 57) + "...";
    rows.push_back({job.id(),
                    job.kind() == kennel::v1::JOB_KIND_TUNE ? "tune" : "train",
                    StateName(job.state()), FormatTime(job.created_at()),
                    job.model_ref().empty() ? "-" : job.model_ref(),
                    Accuracy(job), message.empty() ? "-" : message});
  }
  std::cout << Table(rows);
  return kExitOk;
}

int JobsShow(kennel::v1::Trainer::Stub& stub, const ClientOptions& options,
             const std::string& id) {
  grpc::ClientContext context;
  PrepareContext(options, &context);
  kennel::v1::GetJobRequest request;
  request.set_job_id(id);
  kennel::v1::Job job;
  grpc::Status status = stub.GetJob(&context, request, &job);
  if (!status.ok()) return Fail(FromGrpcStatus(status));
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(job) << "\n";
    return kExitOk;
  }
  const kennel::v1::Hyperparameters& h = job.kind() == kennel::v1::JOB_KIND_TUNE
                                             ? job.tune().base()
                                             : job.train().hyperparameters();
  const kennel::v1::JobSpec& spec = job.kind() == kennel::v1::JOB_KIND_TUNE
                                        ? job.tune().spec()
                                        : job.train().spec();
  const auto& m = job.metrics().metrics();
  std::vector<std::vector<std::string>> rows = {
      {"job", job.id()},
      {"kind", job.kind() == kennel::v1::JOB_KIND_TUNE ? "tune" : "train"},
      {"state", StateName(job.state())},
      {"created", FormatTime(job.created_at())},
      {"started", FormatTime(job.started_at())},
      {"finished", FormatTime(job.finished_at())},
      {"data", spec.data()},
      {"backbone", spec.backbone()},
      {"mode",
       h.mode() == kennel::v1::TRAIN_MODE_FINETUNE ? "finetune" : "head"},
      {"hyperparameters",
       absl::StrFormat("lr %g, weight decay %g, batch %d, epochs %d, seed %d",
                       h.learning_rate(), h.weight_decay(), h.batch_size(),
                       h.epochs(), h.seed())},
      {"model", job.model_ref().empty() ? "-" : job.model_ref()},
      {"metrics",
       m.measured()
           ? absl::StrFormat("train loss %.4f, valid loss %.4f acc %.4f, test "
                             "loss %.4f acc %.4f",
                             m.train_loss(), m.valid_loss(), m.valid_accuracy(),
                             m.test_loss(), m.test_accuracy())
           : "-"},
      {"events", absl::StrCat(job.event_count())},
      {"message", job.message().empty() ? "-" : job.message()},
  };
  std::cout << Table(rows);
  return kExitOk;
}

int JobsCancel(kennel::v1::Trainer::Stub& stub, const ClientOptions& options,
               const std::string& id) {
  grpc::ClientContext context;
  PrepareContext(options, &context);
  kennel::v1::CancelJobRequest request;
  request.set_job_id(id);
  kennel::v1::Job job;
  grpc::Status status = stub.CancelJob(&context, request, &job);
  if (!status.ok()) return Fail(FromGrpcStatus(status));
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(job) << "\n";
  } else {
    const bool ended = job.state() != kennel::v1::JOB_STATE_RUNNING &&
                       job.state() != kennel::v1::JOB_STATE_QUEUED;
    std::cout << job.id() << " " << StateName(job.state())
              << (job.state() == kennel::v1::JOB_STATE_RUNNING
                      ? " (stops at its next step)"
                      : "")
              << (ended ? " (it had already ended; nothing was cancelled)" : "")
              << "\n";
  }
  return kExitOk;
}

int RunJobs(const std::vector<std::string>& args) {
  if (args.empty()) {
    return UsageError("usage: kennel jobs ls|show|watch|cancel [JOB]");
  }
  const std::string& verb = args[0];
  const bool needs_id = verb == "show" || verb == "watch" || verb == "cancel";
  if (verb != "ls" && !needs_id) {
    return UsageError("unknown jobs command \"" + verb +
                      "\"; use ls, show, watch or cancel");
  }
  if (needs_id && args.size() != 2) {
    return UsageError("usage: kennel jobs " + verb + " JOB");
  }
  if (!needs_id && args.size() != 1) {
    return UsageError("usage: kennel jobs ls");
  }
  ClientOptions options;
  auto stub = Stub(&options);
  if (!stub.ok()) return Fail(stub.status());
  if (verb == "ls") return JobsList(**stub, options);
  if (verb == "show") return JobsShow(**stub, options, args[1]);
  if (verb == "cancel") return JobsCancel(**stub, options, args[1]);
  EventPrinter printer(absl::GetFlag(FLAGS_json));
  Followed followed;
  followed.job_id = args[1];
  followed.last_sequence = absl::GetFlag(FLAGS_after);
  if (absl::Status s = Follow(**stub, options, printer, &followed); !s.ok()) {
    return Fail(s);
  }
  if (followed.end == kennel::v1::JobEvent::EVENT_NOT_SET) {
    // Replayed from after the end: the job's state says how it went.
    return JobsShow(**stub, options, followed.job_id) == kExitOk ? kExitOk
                                                                 : kExitFailed;
  }
  return ExitFor(followed);
}

KENNEL_CLI_COMMAND(
    {"train", "train a classifier on an image folder and follow it",
     "Usage: kennel train --data DIR|s3://... --backbone FILE [--mode "
     "head|finetune]\n"
     "                    [--lr X] [--weight-decay X] [--batch-size N] "
     "[--epochs N] [--seed N]\n"
     "                    [--register-as NAME] [--alias A,...] [--precision "
     "auto|fp32|bf16]\n"
     "                    [--rule NAME[:KEY=V...][:warn|stop|off]] "
     "[--detach] [--addr HOST:PORT]\n\n"
     "Starts a training job on kennel-trainer (default 127.0.0.1:50052) and "
     "prints a line\nper epoch (train and valid loss and accuracy, images/s, "
     "share of time waiting for\ndata), rule events and a profiler report, "
     "then the test accuracy and the registered\nmodel ref. --data and "
     "--backbone are paths under the trainer's --data-root.\n\n"
     "Modes: head (default) trains a new linear head on features of the "
     "frozen backbone,\ncomputed once and cached; finetune trains every "
     "parameter, with augmentation.\nLosses are per-sample mean "
     "cross-entropy. Defaults: --lr 0.001, --weight-decay 0,\n--batch-size "
     "64, --epochs 5, --seed 0. Fine-tuning augments every training image "
     "(random\nresized crop and flip) unless --unaugmented-share keeps a "
     "share of them whole\n(useful for small images such as 28x28).\n\n"
     "Rules (all on, warning, by default): loss_not_decreasing "
     "(num_steps=5 epochs,\ndiff_percent=0.1), vanishing_gradient "
     "(threshold=1e-7), overfit (patience=3),\nlow_utilization "
     "(wait_share=0.7). Example: --rule "
     "loss_not_decreasing:num_steps=2:stop\n\n"
     "The job outlives this command: if it is interrupted, `kennel jobs "
     "watch JOB`\nre-attaches. Exit status 0 when the job succeeds, 1 when "
     "it fails or is refused\n(e.g. INVALID_ARGUMENT for a bad data set), 2 "
     "for a bad command line.\n\n"
     "Example:\n  kennel train --data fashion --backbone small_cnn.pt --mode "
     "finetune --lr 0.003 \\\n      --batch-size 128 --epochs 10 "
     "--register-as fashion --alias production\n",
     &RunTrain});

KENNEL_CLI_COMMAND(
    {"jobs", "list, show, follow or cancel training jobs",
     "Usage: kennel jobs ls [--limit N]\n"
     "       kennel jobs show JOB\n"
     "       kennel jobs watch JOB [--after SEQ]\n"
     "       kennel jobs cancel JOB\n\n"
     "ls      jobs, newest first (history survives trainer restarts); "
     "--limit caps\n        the count (default 50)\n"
     "show    one job: state, data, hyperparameters, model and metrics\n"
     "watch   replays the job's events (after --after) and follows it live "
     "until it\n        ends; exits 0 when it succeeded, 1 otherwise\n"
     "cancel  stops the job at its next step boundary (a queued job at "
     "once)\n\n"
     "Talks to kennel-trainer at --addr (default 127.0.0.1:50052); --json "
     "prints JSON.\n",
     &RunJobs});

}  // namespace
}  // namespace kennel::cli
