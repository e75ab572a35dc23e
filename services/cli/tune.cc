// kennel tune: starts a hyperparameter search on the trainer, follows it with
// a live leaderboard, and draws its report.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/grpc_status.h"
#include "kennel/v1/trainer.grpc.pb.h"
#include "services/cli/command.h"
#include "services/cli/training_flags.h"
#include "services/trainer/search_space.h"
#include "services/trainer/tune_report.h"

ABSL_FLAG(int, trials, 16, "tune: most trials to run.");
ABSL_FLAG(int, parallel, 1, "tune: trials that train at once.");
ABSL_FLAG(std::string, strategy, "random", "tune: random, grid or tpe.");
ABSL_FLAG(std::string, objective, "valid_loss",
          "tune: valid_loss (minimised) or valid_accuracy (maximised).");
ABSL_FLAG(bool, no_early_stopping, false,
          "tune: run every trial to its last epoch instead of stopping poor "
          "ones by successive halving.");
ABSL_FLAG(int, eta, 3,
          "tune: successive halving rate (rungs at 1, eta, eta^2... epochs).");
ABSL_FLAG(std::string, report, "",
          "tune: write loss_vs_parameters.svg, best_trial_loss.svg, "
          "timeline.svg and trials.csv into this folder when the job ends.");
ABSL_FLAG(std::string, job, "",
          "tune: follow (and report on) this existing tuning job instead of "
          "starting one.");
ABSL_FLAG(int, leaderboard_rows, 5, "tune: rows of the live leaderboard.");

namespace kennel::cli {
namespace {

using kennel::v1::JobEvent;

std::string Num(double v) { return absl::StrFormat("%.4g", v); }

std::string HpLine(const kennel::v1::Hyperparameters& hp) {
  return absl::StrCat("lr=", Num(hp.learning_rate()),
                      " wd=", Num(hp.weight_decay()), " bs=", hp.batch_size(),
                      " epochs=", hp.epochs());
}

absl::StatusOr<kennel::v1::TuneRequest> RequestFromFlags() {
  kennel::v1::TuneRequest request;
  auto spec = JobSpecFromFlags();
  if (!spec.ok()) return spec.status();
  *request.mutable_spec() = *std::move(spec);
  auto mode = TrainModeFromFlags();
  if (!mode.ok()) return mode.status();

  kennel::v1::Hyperparameters* base = request.mutable_base();
  base->set_mode(*mode);
  base->set_seed(absl::GetFlag(FLAGS_seed));
  base->set_learning_rate(kDefaultLearningRate);
  base->set_weight_decay(kDefaultWeightDecay);
  base->set_batch_size(kDefaultBatchSize);
  base->set_epochs(kDefaultEpochs);
  struct Param {
    const char* name;
    const char* flag;
    std::string text;
  };
  const Param params[] = {
      {"learning_rate", "lr", absl::GetFlag(FLAGS_lr)},
      {"weight_decay", "weight-decay", absl::GetFlag(FLAGS_weight_decay)},
      {"batch_size", "batch-size", absl::GetFlag(FLAGS_batch_size)},
      {"epochs", "epochs", absl::GetFlag(FLAGS_epochs)}};
  for (const Param& p : params) {
    if (p.text.empty()) continue;
    auto parsed = trainer::ParseParameterFlag(p.name, p.flag, p.text);
    if (!parsed.ok()) return parsed.status();
    if (!parsed->fixed) {
      *request.add_space() = parsed->range;
      continue;
    }
    const std::string name = p.name;
    if (name == "learning_rate") base->set_learning_rate(parsed->value);
    if (name == "weight_decay") base->set_weight_decay(parsed->value);
    if (name == "batch_size")
      base->set_batch_size(static_cast<int>(parsed->value));
    if (name == "epochs") base->set_epochs(static_cast<int>(parsed->value));
  }

  const std::string strategy = absl::GetFlag(FLAGS_strategy);
  if (strategy == "random") {
    request.set_strategy(kennel::v1::SEARCH_STRATEGY_RANDOM);
  } else if (strategy == "grid") {
    request.set_strategy(kennel::v1::SEARCH_STRATEGY_GRID);
  } else if (strategy == "tpe") {
    request.set_strategy(kennel::v1::SEARCH_STRATEGY_TPE);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--strategy=", strategy, ": use random, grid or tpe"));
  }
  const std::string objective = absl::GetFlag(FLAGS_objective);
  if (objective == "valid_loss" || objective == "valid-loss") {
    request.set_objective(kennel::v1::OBJECTIVE_VALID_LOSS);
  } else if (objective == "valid_accuracy" || objective == "valid-accuracy") {
    request.set_objective(kennel::v1::OBJECTIVE_VALID_ACCURACY);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--objective=", objective, ": use valid_loss or valid_accuracy"));
  }
  if (absl::GetFlag(FLAGS_trials) < 1) {
    return absl::InvalidArgumentError("--trials must be at least 1");
  }
  if (absl::GetFlag(FLAGS_parallel) < 1) {
    return absl::InvalidArgumentError("--parallel must be at least 1");
  }
  request.set_max_trials(absl::GetFlag(FLAGS_trials));
  request.set_max_parallel_trials(absl::GetFlag(FLAGS_parallel));
  request.set_seed(absl::GetFlag(FLAGS_seed));
  request.set_early_stopping(!absl::GetFlag(FLAGS_no_early_stopping));
  request.set_eta(absl::GetFlag(FLAGS_eta));
  // The trainer checks all of this too; checking here first makes a typo a
  // usage error instead of a round trip.
  auto options = trainer::TuneOptionsFromRequest(request);
  if (!options.ok()) return options.status();
  return request;
}

// Prints events as they come and keeps them for the report.
class Printer {
 public:
  Printer(bool json, int rows) : json_(json), rows_(rows) {}

  void Print(const JobEvent& e) {
    if (json_) {
      std::string line;
      google::protobuf::util::JsonPrintOptions options;
      options.preserve_proto_field_names = true;
      (void)google::protobuf::util::MessageToJsonString(e, &line, options);
      std::cout << line << std::endl;
      return;
    }
    const std::string trial = absl::StrFormat("trial %2d", e.trial());
    switch (e.event_case()) {
      case JobEvent::kStarted:
        std::cout << "job " << e.job_id() << " started on "
                  << e.started().device() << ": " << e.started().classes_size()
                  << " classes";
        for (const auto& split : e.started().splits()) {
          std::cout << ", " << split.split() << " " << split.images();
        }
        std::cout << std::endl;
        break;
      case JobEvent::kLog:
        std::cout << (e.trial() ? trial + " " : "") << e.log() << std::endl;
        break;
      case JobEvent::kProgress: {
        const auto& p = e.progress();
        // One line per tenth, not per batch.
        const int64_t step = std::max<int64_t>(1, p.total() / 10);
        if (p.done() == p.total() || p.done() / step != last_progress_ / step) {
          std::cout << absl::StrFormat("%s: %d/%d (%.1f/s)", p.phase(),
                                       p.done(), p.total(),
                                       p.items_per_second())
                    << std::endl;
        }
        last_progress_ = p.done();
        break;
      }
      case JobEvent::kTrialStarted:
        std::cout << trial << " started   "
                  << HpLine(e.trial_started().hyperparameters()) << std::endl;
        break;
      case JobEvent::kEpoch: {
        const auto& ep = e.epoch();
        std::cout
            << (e.trial() ? trial : std::string("job     "))
            << absl::StrFormat(
                   " epoch %d/%d  train %.4f  valid %.4f  acc %.4f  %.0f img/s",
                   ep.epoch(), ep.epochs(), ep.train_loss(), ep.valid_loss(),
                   ep.valid_accuracy(), ep.images_per_second())
            << std::endl;
        break;
      }
      case JobEvent::kRule:
        std::cout << (e.trial() ? trial + " " : "") << "rule "
                  << e.rule().rule() << ": " << e.rule().message() << std::endl;
        break;
      case JobEvent::kTrialFinished: {
        const auto& f = e.trial_finished();
        std::string what = f.failed()          ? "failed  "
                           : f.stopped_early() ? "stopped "
                                               : "finished";
        std::cout << trial << " " << what
                  << absl::StrFormat(
                         "  valid_loss %.4f  acc %.4f  %d epochs  %.1f s",
                         f.metrics().valid_loss(), f.metrics().valid_accuracy(),
                         f.epochs_run(), f.seconds());
        if (!f.reason().empty()) std::cout << "  (" << f.reason() << ")";
        std::cout << std::endl;
        break;
      }
      case JobEvent::kLeaderboard:
        PrintLeaderboard(e.leaderboard(), rows_);
        break;
      case JobEvent::kProfiler:
        break;
      case JobEvent::kCompleted: {
        const auto& c = e.completed();
        std::cout
            << "\nbest trial " << c.best_trial() << ": "
            << HpLine(c.hyperparameters()) << "\n"
            << absl::StrFormat(
                   "  valid_loss %.4f  valid_accuracy %.4f  test_loss %.4f  "
                   "test_accuracy %.4f",
                   c.metrics().valid_loss(), c.metrics().valid_accuracy(),
                   c.metrics().test_loss(), c.metrics().test_accuracy())
            << "\n  search took " << Num(c.seconds()) << " s" << std::endl;
        if (!c.model_ref().empty())
          std::cout << "registered " << c.model_ref() << std::endl;
        break;
      }
      case JobEvent::kFailed:
        std::cout << "job failed: " << e.failed().message() << std::endl;
        break;
      case JobEvent::kCancelled:
        std::cout << "job cancelled: " << e.cancelled().message() << std::endl;
        break;
      default:
        break;
    }
  }

  static void PrintLeaderboard(const kennel::v1::Leaderboard& board, int rows) {
    std::vector<std::vector<std::string>> table = {
        {"  rank", "trial", "state", "lr", "weight_decay", "batch", "epochs",
         "valid_loss", "valid_acc"}};
    for (int i = 0; i < board.entries_size() && (rows <= 0 || i < rows); ++i) {
      const auto& entry = board.entries(i);
      const auto& hp = entry.hyperparameters();
      table.push_back(
          {absl::StrCat("  ", i + 1), absl::StrCat(entry.trial()),
           entry.state(), Num(hp.learning_rate()), Num(hp.weight_decay()),
           absl::StrCat(hp.batch_size()),
           absl::StrCat(entry.epochs_run(), "/", hp.epochs()),
           absl::StrFormat("%.4f", entry.metrics().valid_loss()),
           absl::StrFormat("%.4f", entry.metrics().valid_accuracy())});
    }
    std::cout << Table(table) << std::flush;
  }

 private:
  const bool json_;
  const int rows_;
  int64_t last_progress_ = 0;
};

struct Followed {
  std::string job_id;
  std::vector<JobEvent> events;
  bool ended = false;
};

// Reads a stream of job events into `out` until it ends; returns its status.
absl::Status Drain(grpc::ClientReader<JobEvent>* reader, Printer& printer,
                   Followed* out) {
  JobEvent event;
  while (reader->Read(&event)) {
    if (out->job_id.empty()) out->job_id = event.job_id();
    if (!out->events.empty() &&
        event.sequence() <= out->events.back().sequence()) {
      continue;  // replayed after a re-attach
    }
    printer.Print(event);
    // A cancelled search completes (registering its best trial) and then
    // reports the cancel, so reading goes on to the end of the stream.
    out->ended |=
        event.has_completed() || event.has_failed() || event.has_cancelled();
    out->events.push_back(event);
  }
  return FromGrpcStatus(reader->Finish());
}

// Follows a job with WatchJob, re-attaching with a back-off when the stream
// breaks (a trainer restart, a network blip) until the job has ended.
absl::Status Follow(kennel::v1::Trainer::Stub& stub,
                    const ClientOptions& options, Printer& printer,
                    Followed* followed) {
  absl::Duration backoff = absl::Milliseconds(200);
  int failures = 0;
  while (true) {
    grpc::ClientContext context;
    PrepareContext(options, &context, absl::InfiniteDuration());
    kennel::v1::WatchJobRequest request;
    request.set_job_id(followed->job_id);
    request.set_after_sequence(
        followed->events.empty() ? 0 : followed->events.back().sequence());
    auto reader = stub.WatchJob(&context, request);
    const size_t before = followed->events.size();
    absl::Status status = Drain(reader.get(), printer, followed);
    if (status.ok()) return absl::OkStatus();  // the job's stream ended
    if (status.code() != absl::StatusCode::kUnavailable &&
        status.code() != absl::StatusCode::kDeadlineExceeded) {
      return status;
    }
    failures = followed->events.size() > before ? 0 : failures + 1;
    if (failures > 20) return status;
    std::cerr << "kennel: lost the trainer (" << status.message()
              << "); re-attaching to job " << followed->job_id << std::endl;
    std::this_thread::sleep_for(absl::ToChronoMilliseconds(backoff));
    backoff = std::min(backoff * 2, absl::Seconds(5));
  }
}

// The report folder is made and checked before a search starts, so that a
// search is not run for an hour and then fail to write its report.
absl::Status CheckReportFolder(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create report folder ", dir, ": ", ec.message(),
                     "; nothing was started"));
  }
  if (access(dir.c_str(), W_OK) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot write to report folder ", dir, ": ",
                     std::strerror(errno), "; nothing was started"));
  }
  return absl::OkStatus();
}

int RunTune(const std::vector<std::string>& args) {
  if (!args.empty()) {
    return UsageError("tune takes no arguments; see kennel tune --help");
  }
  auto options = ClientOptionsFromFlags(kTrainerAddr);
  if (!options.ok()) return Fail(options.status());
  if (const std::string report = absl::GetFlag(FLAGS_report); !report.empty()) {
    if (absl::Status s = CheckReportFolder(report); !s.ok()) return Fail(s);
  }
  auto channel = MakeChannel(*options);
  if (!channel.ok()) return Fail(channel.status());
  auto stub = kennel::v1::Trainer::NewStub(*channel);
  Printer printer(absl::GetFlag(FLAGS_json),
                  absl::GetFlag(FLAGS_leaderboard_rows));
  Followed followed;
  kennel::v1::TuneRequest request;

  followed.job_id = absl::GetFlag(FLAGS_job);
  if (followed.job_id.empty()) {
    auto built = RequestFromFlags();
    if (!built.ok()) return UsageError(std::string(built.status().message()));
    request = *std::move(built);
    grpc::ClientContext context;
    PrepareContext(*options, &context, absl::InfiniteDuration());
    auto reader = stub->Tune(&context, request);
    absl::Status status = Drain(reader.get(), printer, &followed);
    if (!status.ok()) {
      if (followed.job_id.empty()) return Fail(status);
      std::cerr << "kennel: the stream of job " << followed.job_id << " broke ("
                << status.message() << "); re-attaching" << std::endl;
    }
    if (!status.ok() || !followed.ended) {
      if (absl::Status s = Follow(*stub, *options, printer, &followed);
          !s.ok()) {
        return Fail(s);
      }
    }
  } else {
    if (absl::Status s = Follow(*stub, *options, printer, &followed); !s.ok()) {
      return Fail(s);
    }
    grpc::ClientContext context;
    PrepareContext(*options, &context);
    kennel::v1::GetJobRequest get;
    get.set_job_id(followed.job_id);
    kennel::v1::Job job;
    grpc::Status got = stub->GetJob(&context, get, &job);
    if (!got.ok()) return Fail(FromGrpcStatus(got));
    request = job.tune();
  }

  const std::string report = absl::GetFlag(FLAGS_report);
  if (!report.empty()) {
    trainer::TuneReportData data = trainer::CollectTuneReport(
        followed.events, request.space().empty() ? nullptr : &request);
    auto written = trainer::WriteTuneReport(data, report);
    if (!written.ok()) return Fail(written.status());
    if (!absl::GetFlag(FLAGS_json)) {
      std::cout << "report: " << absl::StrJoin(*written, " ") << std::endl;
    }
  }
  bool completed = false, failed = false;
  for (const JobEvent& e : followed.events) {
    completed |= e.has_completed();
    failed |= e.has_failed() || e.has_cancelled();
  }
  return completed && !failed ? kExitOk : kExitFailed;
}

KENNEL_CLI_COMMAND(
    {"tune",
     "search hyperparameters on the trainer and register the best model",
     "Usage: kennel tune --data DIR|s3://... --backbone FILE [--mode "
     "head|finetune]\n"
     "         [--trials 16] [--parallel 4] [--strategy random|grid|tpe]\n"
     "         [--lr 0.001:0.1:log] [--weight-decay 0:1e-5] [--batch-size "
     "64,128,256]\n"
     "         [--epochs 5] [--objective valid_loss|valid_accuracy]\n"
     "         [--no-early-stopping] [--eta 3] [--seed N]\n"
     "         [--register-as NAME [--alias A]] [--report DIR] [--addr "
     "HOST:PORT]\n"
     "       kennel tune --job JOB_ID [--report DIR]\n\n"
     "Starts a Tune job on the trainer (default 127.0.0.1:50052) and follows "
     "it:\n"
     "every trial's start, epochs and end (stopped early, and why), and a\n"
     "leaderboard after each trial; at the end the best trial, its test "
     "figures\n"
     "and the registered model. The job outlives this command: if the "
     "connection\n"
     "drops it re-attaches, and Ctrl-C leaves the job running (kennel jobs "
     "watch\n"
     "or kennel tune --job ID follow it again; kennel jobs cancel ID stops it "
     "and\n"
     "keeps the best finished trial).\n\n"
     "Hyperparameters: a single value is fixed for every trial; a set (a,b,c)\n"
     "or a range (min:max, min:max:log) is searched. Batch size and epochs "
     "take\n"
     "integer ranges. Unset ones use the trainer's defaults (lr 0.001, weight\n"
     "decay 0, batch size 64, 5 epochs).\n\n"
     "Strategies: random; grid (as many levels per range as fit in --trials,\n"
     "sets enumerated); tpe (tree-structured Parzen estimator, which proposes\n"
     "from the results of finished trials). The same --seed and inputs give "
     "the\n"
     "same trials, even with --parallel. Successive halving stops poor trials\n"
     "after 1, eta, eta^2... epochs unless --no-early-stopping.\n\n"
     "--report DIR writes, from the job's events: loss_vs_parameters.svg\n"
     "(validation loss against each tuned parameter, log axes for log "
     "ranges),\n"
     "best_trial_loss.svg (train and validation loss per epoch of the best\n"
     "trial), timeline.svg (one bar per trial) and trials.csv.\n\n"
     "--json prints every event as one JSON line instead.\n"
     "Exit status: 0 when the search completed, 1 when it failed or was\n"
     "cancelled, 2 for a bad command line or search space.\n\n"
     "Example:\n"
     "  kennel tune --data dogImages --backbone backbones/resnet50.pt \\\n"
     "    --trials 16 --parallel 4 --strategy tpe --lr 0.001:0.1:log \\\n"
     "    --weight-decay 0:1e-5 --batch-size 64,128,256 --epochs 5 \\\n"
     "    --register-as dogs --alias candidate --report tune-report\n",
     &RunTune});

}  // namespace
}  // namespace kennel::cli
