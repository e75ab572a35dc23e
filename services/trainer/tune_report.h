// Pictures and a table of a tuning job, made from its event stream: the
// validation loss against each tuned parameter (one panel each, log axes
// for log-scale parameters), train and validation loss per epoch of the best
// trial, the trials' timeline, and a CSV of every trial. The SVG is written
// by hand so the CLI needs no plotting library.
#ifndef KENNEL_SERVICES_TRAINER_TUNE_REPORT_H_
#define KENNEL_SERVICES_TRAINER_TUNE_REPORT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kennel/v1/trainer.pb.h"

namespace kennel::trainer {

struct ReportTrial {
  int trial = 0;
  kennel::v1::Hyperparameters hyperparameters;
  std::vector<kennel::v1::EpochEnd> epochs;
  // "running", "finished", "stopped", "failed" or "cancelled".
  std::string state = "running";
  std::string reason;
  kennel::v1::ModelMetrics metrics;
  double seconds = 0;
  // Seconds since the job's first trial started; negative when unknown.
  double start = -1;
  double end = -1;
};

struct ReportParam {
  // "learning_rate", "weight_decay", "batch_size" or "epochs".
  std::string name;
  bool log = false;
  // Plotted at evenly spaced positions, one per value.
  bool categorical = false;
  std::vector<double> values;
};

struct TuneReportData {
  // By trial number.
  std::vector<ReportTrial> trials;
  // The tuned parameters, one panel each.
  std::vector<ReportParam> params;
  // 0 when no trial has a result.
  int best_trial = 0;
  kennel::v1::Objective objective = kennel::v1::OBJECTIVE_VALID_LOSS;
  std::string model_ref;
  std::string job_id;
};

// Gathers the trials from a tuning job's events. `request`, when given,
// names the tuned parameters and their scales; without it they are the
// hyperparameters that vary between trials, on a log axis when they are
// positive and span a factor of 20 or more. The best trial is the one the
// job reported as completed, else the best that finished.
TuneReportData CollectTuneReport(
    const std::vector<kennel::v1::JobEvent>& events,
    const kennel::v1::TuneRequest* request);

std::string LossVsParametersSvg(const TuneReportData& data);
std::string BestTrialLossSvg(const TuneReportData& data);
std::string TimelineSvg(const TuneReportData& data);
std::string TrialsCsv(const TuneReportData& data);

// Writes loss_vs_parameters.svg, best_trial_loss.svg, timeline.svg and
// trials.csv into `dir` (created when missing); returns the paths written.
absl::StatusOr<std::vector<std::string>> WriteTuneReport(
    const TuneReportData& data, const std::string& dir);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TUNE_REPORT_H_
