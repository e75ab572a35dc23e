#include "services/trainer/tune_report.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"

namespace kennel::trainer {
namespace {

constexpr char kFont[] =
    "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

double HpValue(const kennel::v1::Hyperparameters& hp, const std::string& name) {
  if (name == "learning_rate") return hp.learning_rate();
  if (name == "weight_decay") return hp.weight_decay();
  if (name == "batch_size") return hp.batch_size();
  if (name == "epochs") return hp.epochs();
  return 0;
}

std::string Escape(const std::string& text) {
  return absl::StrReplaceAll(
      text, {{"&", "&amp;"}, {"<", "&lt;"}, {">", "&gt;"}, {"\"", "&quot;"}});
}

std::string Fmt(double v) {
  if (v == 0) return "0";
  return absl::StrFormat("%.3g", v);
}

std::string Px(double v) { return absl::StrFormat("%.1f", v); }

double Seconds(const google::protobuf::Timestamp& t) {
  return t.seconds() + t.nanos() * 1e-9;
}

// A minimal SVG writer.
class Svg {
 public:
  Svg(double width, double height) : width_(width), height_(height) {}

  void Raw(const std::string& element) { body_ += element + "\n"; }
  void Line(double x1, double y1, double x2, double y2,
            const std::string& stroke, double width = 1,
            const std::string& dash = "") {
    Raw(absl::StrCat(
        "<line x1=\"", Px(x1), "\" y1=\"", Px(y1), "\" x2=\"", Px(x2),
        "\" y2=\"", Px(y2), "\" stroke=\"", stroke, "\" stroke-width=\"",
        Px(width), "\"",
        dash.empty() ? "" : absl::StrCat(" stroke-dasharray=\"", dash, "\""),
        "/>"));
  }
  void Rect(double x, double y, double w, double h, const std::string& fill,
            const std::string& stroke = "none", double stroke_width = 1,
            const std::string& title = "") {
    Raw(absl::StrCat("<rect x=\"", Px(x), "\" y=\"", Px(y), "\" width=\"",
                     Px(std::max(w, 0.0)), "\" height=\"", Px(std::max(h, 0.0)),
                     "\" fill=\"", fill, "\" stroke=\"", stroke,
                     "\" stroke-width=\"", Px(stroke_width), "\">",
                     TitleElement(title), "</rect>"));
  }
  void Circle(double cx, double cy, double r, const std::string& fill,
              const std::string& stroke, const std::string& title = "") {
    Raw(absl::StrCat("<circle class=\"point\" cx=\"", Px(cx), "\" cy=\"",
                     Px(cy), "\" r=\"", Px(r), "\" fill=\"", fill,
                     "\" stroke=\"", stroke, "\" stroke-width=\"1.5\">",
                     TitleElement(title), "</circle>"));
  }
  // An upward triangle: a value off the top of the axis.
  void Triangle(double cx, double cy, double r, const std::string& fill,
                const std::string& title = "") {
    Raw(absl::StrCat("<polygon class=\"point offscale\" points=\"", Px(cx), ",",
                     Px(cy - r), " ", Px(cx - r), ",", Px(cy + r), " ",
                     Px(cx + r), ",", Px(cy + r), "\" fill=\"", fill, "\">",
                     TitleElement(title), "</polygon>"));
  }
  void Polyline(const std::vector<std::pair<double, double>>& points,
                const std::string& stroke, double width = 2,
                const std::string& dash = "") {
    std::vector<std::string> coords;
    for (const auto& [x, y] : points)
      coords.push_back(absl::StrCat(Px(x), ",", Px(y)));
    Raw(absl::StrCat(
        "<polyline points=\"", absl::StrJoin(coords, " "),
        "\" fill=\"none\" stroke=\"", stroke, "\" stroke-width=\"", Px(width),
        "\"",
        dash.empty() ? "" : absl::StrCat(" stroke-dasharray=\"", dash, "\""),
        "/>"));
  }
  void Text(double x, double y, const std::string& text, double size = 11,
            const std::string& anchor = "start", double rotate = 0,
            const std::string& weight = "normal",
            const std::string& fill = "#333") {
    std::string transform;
    if (rotate != 0) {
      transform = absl::StrCat(" transform=\"rotate(", Px(rotate), " ", Px(x),
                               " ", Px(y), ")\"");
    }
    Raw(absl::StrCat("<text x=\"", Px(x), "\" y=\"", Px(y), "\" font-size=\"",
                     Px(size), "\" text-anchor=\"", anchor, "\" font-weight=\"",
                     weight, "\" fill=\"", fill, "\"", transform, ">",
                     Escape(text), "</text>"));
  }
  std::string Finish() const {
    return absl::StrCat(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"",
        Px(width_), "\" height=\"", Px(height_), "\" viewBox=\"0 0 ",
        Px(width_), " ", Px(height_), "\" ", kFont,
        ">\n<rect width=\"100%\" height=\"100%\" "
        "fill=\"white\"/>\n",
        body_, "</svg>\n");
  }

 private:
  static std::string TitleElement(const std::string& title) {
    return title.empty() ? ""
                         : absl::StrCat("<title>", Escape(title), "</title>");
  }
  double width_, height_;
  std::string body_;
};

// Maps data values to pixels, linearly or on a log scale, and picks ticks.
struct Axis {
  double lo = 0, hi = 1;  // data range
  bool log = false;
  double p0 = 0, p1 = 1;  // pixel range

  static Axis Fit(std::vector<double> values, bool log, double p0, double p1) {
    Axis a;
    a.log = log;
    a.p0 = p0;
    a.p1 = p1;
    std::vector<double> usable;
    for (double v : values) {
      if (std::isfinite(v) && (!log || v > 0)) usable.push_back(v);
    }
    if (usable.empty()) usable = {log ? 1.0 : 0.0};
    double lo = *std::min_element(usable.begin(), usable.end());
    double hi = *std::max_element(usable.begin(), usable.end());
    if (log) {
      lo = std::log10(lo);
      hi = std::log10(hi);
    }
    if (hi - lo < 1e-12) {
      const double pad = log ? 0.5 : std::max(std::abs(lo) * 0.5, 0.5);
      lo -= pad;
      hi += pad;
    } else {
      const double pad = (hi - lo) * 0.06;
      lo -= pad;
      hi += pad;
    }
    if (log) {
      lo = std::pow(10, lo);
      hi = std::pow(10, hi);
    }
    a.lo = lo;
    a.hi = hi;
    return a;
  }

  double T(double v) const { return log ? std::log10(v) : v; }
  double Map(double v) const {
    const double t = (T(v) - T(lo)) / (T(hi) - T(lo));
    return p0 + t * (p1 - p0);
  }
  bool Contains(double v) const {
    return std::isfinite(v) && (!log || v > 0) && v >= lo && v <= hi;
  }

  std::vector<double> Ticks() const {
    std::vector<double> ticks;
    if (log) {
      const int d0 = static_cast<int>(std::floor(std::log10(lo)));
      const int d1 = static_cast<int>(std::ceil(std::log10(hi)));
      // Label 1, 2 and 5 of each decade when the axis spans few decades.
      const bool fine = std::log10(hi / lo) <= 2.5;
      for (int d = d0; d <= d1; ++d) {
        for (double m :
             fine ? std::vector<double>{1, 2, 5} : std::vector<double>{1}) {
          const double v = m * std::pow(10, d);
          if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push_back(v);
        }
      }
      return ticks;
    }
    const double range = hi - lo;
    const double raw = range / 5;
    const double mag = std::pow(10, std::floor(std::log10(raw)));
    double step = mag;
    for (double m : {1.0, 2.0, 5.0, 10.0}) {
      if (m * mag >= raw) {
        step = m * mag;
        break;
      }
    }
    for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9;
         v += step) {
      ticks.push_back(std::abs(v) < step * 1e-9 ? 0 : v);
    }
    return ticks;
  }
};

const char* StateColor(const std::string& state) {
  if (state == "finished") return "#3b75af";
  if (state == "stopped") return "#ef8636";
  if (state == "failed") return "#c53a32";
  if (state == "cancelled") return "#9a9a9a";
  return "#8fbbd9";  // running
}

std::string PrettyName(const std::string& name) {
  if (name == "learning_rate") return "learning rate";
  if (name == "weight_decay") return "weight decay";
  if (name == "batch_size") return "batch size";
  return name;
}

std::string TrialSummary(const ReportTrial& t, const TuneReportData& data) {
  std::vector<std::string> parts = {absl::StrCat("trial ", t.trial)};
  for (const ReportParam& p : data.params) {
    parts.push_back(
        absl::StrCat(p.name, "=", Fmt(HpValue(t.hyperparameters, p.name))));
  }
  if (!t.epochs.empty()) {
    parts.push_back(
        absl::StrFormat("valid_loss=%.4g", t.epochs.back().valid_loss()));
    parts.push_back(absl::StrFormat("valid_accuracy=%.4g",
                                    t.epochs.back().valid_accuracy()));
  }
  parts.push_back(absl::StrCat(t.epochs.size(), " epochs, ", t.state));
  return absl::StrJoin(parts, " ");
}

// Draws the frame, ticks and labels of one plot area.
void DrawAxes(Svg& svg, const Axis& x, const Axis& y, const std::string& xlabel,
              const std::string& ylabel,
              const std::vector<double>* categories) {
  const double left = x.p0, right = x.p1, top = y.p1, bottom = y.p0;
  svg.Rect(left, top, right - left, bottom - top, "#fafafa", "#bbbbbb");
  for (double v : y.Ticks()) {
    const double py = y.Map(v);
    svg.Line(left, py, right, py, "#e4e4e4");
    svg.Text(left - 6, py + 4, Fmt(v), 10, "end");
  }
  if (categories != nullptr) {
    const size_t n = categories->size();
    for (size_t i = 0; i < n; ++i) {
      const double px = left + (i + 0.5) / n * (right - left);
      svg.Line(px, bottom, px, bottom + 4, "#888888");
      svg.Text(px, bottom + 16, Fmt((*categories)[i]), 10, "middle");
    }
  } else {
    for (double v : x.Ticks()) {
      const double px = x.Map(v);
      svg.Line(px, top, px, bottom, "#e4e4e4");
      svg.Line(px, bottom, px, bottom + 4, "#888888");
      svg.Text(px, bottom + 16, Fmt(v), 10, "middle");
    }
  }
  svg.Text((left + right) / 2, bottom + 34, xlabel, 12, "middle");
  svg.Text(left - 44, (top + bottom) / 2, ylabel, 12, "middle", -90);
}

const ReportTrial* FindTrial(const TuneReportData& data, int trial) {
  for (const ReportTrial& t : data.trials) {
    if (t.trial == trial) return &t;
  }
  return nullptr;
}

std::string Csv(const std::string& field) {
  if (field.find_first_of(",\"\n") == std::string::npos) return field;
  return absl::StrCat("\"", absl::StrReplaceAll(field, {{"\"", "\"\""}}), "\"");
}

std::string CsvNum(double v) {
  if (std::isnan(v)) return "nan";
  return absl::StrFormat("%.9g", v);
}

}  // namespace

TuneReportData CollectTuneReport(
    const std::vector<kennel::v1::JobEvent>& events,
    const kennel::v1::TuneRequest* request) {
  TuneReportData data;
  std::map<int, ReportTrial> trials;
  double origin = -1;
  int completed_best = 0;
  for (const auto& event : events) {
    if (data.job_id.empty()) data.job_id = event.job_id();
    const int trial = event.trial();
    const double time = event.has_time() ? Seconds(event.time()) : -1;
    switch (event.event_case()) {
      case kennel::v1::JobEvent::kTrialStarted: {
        ReportTrial& t = trials[trial];
        t.trial = trial;
        t.hyperparameters = event.trial_started().hyperparameters();
        if (time >= 0) {
          if (origin < 0 || time < origin) origin = time;
          t.start = time;
        }
        break;
      }
      case kennel::v1::JobEvent::kEpoch: {
        if (trial == 0) break;
        ReportTrial& t = trials[trial];
        t.trial = trial;
        t.epochs.push_back(event.epoch());
        break;
      }
      case kennel::v1::JobEvent::kTrialFinished: {
        ReportTrial& t = trials[trial];
        const auto& f = event.trial_finished();
        t.trial = trial;
        if (t.hyperparameters.ByteSizeLong() == 0)
          t.hyperparameters = f.hyperparameters();
        t.metrics = f.metrics();
        t.reason = f.reason();
        t.seconds = f.seconds();
        t.state = f.failed()          ? "failed"
                  : f.stopped_early() ? "stopped"
                                      : "finished";
        // Neither failed nor stopped, yet short of its epochs: interrupted by
        // a cancelled job.
        const int planned = t.epochs.empty() ? t.hyperparameters.epochs()
                                             : t.epochs.back().epochs();
        if (t.state == "finished" &&
            (f.epochs_run() == 0 || f.epochs_run() < planned)) {
          t.state = "cancelled";
        }
        if (time >= 0) t.end = time;
        break;
      }
      case kennel::v1::JobEvent::kCompleted:
        completed_best = event.completed().best_trial();
        data.model_ref = event.completed().model_ref();
        break;
      default:
        break;
    }
  }
  for (auto& [number, t] : trials) {
    if (origin >= 0) {
      if (t.start >= 0) t.start -= origin;
      if (t.end >= 0) t.end -= origin;
    }
    if (t.end < 0 && t.start >= 0 && t.seconds > 0) t.end = t.start + t.seconds;
    data.trials.push_back(t);
  }

  if (request != nullptr) {
    data.objective = request->objective();
    for (const auto& range : request->space()) {
      ReportParam p;
      p.name = range.name();
      if (range.has_continuous())
        p.log = range.continuous().scale() == kennel::v1::SCALE_LOG;
      if (range.has_integer())
        p.log = range.integer().scale() == kennel::v1::SCALE_LOG;
      if (range.has_categorical()) {
        p.categorical = true;
        p.values.assign(range.categorical().values().begin(),
                        range.categorical().values().end());
        std::sort(p.values.begin(), p.values.end());
      }
      data.params.push_back(p);
    }
  } else {
    for (const char* name :
         {"learning_rate", "weight_decay", "batch_size", "epochs"}) {
      std::set<double> seen;
      for (const ReportTrial& t : data.trials)
        seen.insert(HpValue(t.hyperparameters, name));
      if (seen.size() < 2) continue;
      ReportParam p;
      p.name = name;
      const bool integer =
          std::string(name) == "batch_size" || std::string(name) == "epochs";
      if (integer && seen.size() <= 8) {
        p.categorical = true;
        p.values.assign(seen.begin(), seen.end());
      } else if (*seen.begin() > 0 && *seen.rbegin() / *seen.begin() >= 20) {
        p.log = true;
      }
      data.params.push_back(p);
    }
  }

  if (completed_best != 0 && FindTrial(data, completed_best) != nullptr) {
    data.best_trial = completed_best;
  } else {
    // The best trial that ran all its epochs, else the best stopped one.
    for (const char* wanted : {"finished", "stopped"}) {
      double best_cost = 0;
      for (const ReportTrial& t : data.trials) {
        if (t.state != wanted || t.epochs.empty()) continue;
        const double cost =
            data.objective == kennel::v1::OBJECTIVE_VALID_ACCURACY
                ? -t.epochs.back().valid_accuracy()
                : t.epochs.back().valid_loss();
        if (!std::isfinite(cost)) continue;
        if (data.best_trial == 0 || cost < best_cost) {
          data.best_trial = t.trial;
          best_cost = cost;
        }
      }
      if (data.best_trial != 0) break;
    }
  }
  return data;
}

std::string LossVsParametersSvg(const TuneReportData& data) {
  constexpr double kPanelW = 380, kPanelH = 320, kMarginL = 66, kMarginR = 16,
                   kMarginT = 40, kMarginB = 52, kHeader = 44;
  const size_t n = std::max<size_t>(1, data.params.size());
  const size_t cols = std::min<size_t>(n, 3);
  const size_t rows = (n + cols - 1) / cols;
  Svg svg(cols * kPanelW, kHeader + rows * kPanelH + 24);
  svg.Text(12, 26, "Validation loss against each tuned hyperparameter", 16,
           "start", 0, "bold");

  // One y range for every panel, so the panels compare. Values far above the
  // typical loss (a diverged trial) are drawn as triangles on the top edge.
  std::vector<double> losses;
  for (const ReportTrial& t : data.trials) {
    if (!t.epochs.empty() && std::isfinite(t.epochs.back().valid_loss())) {
      losses.push_back(t.epochs.back().valid_loss());
    }
  }
  std::vector<double> sorted = losses;
  std::sort(sorted.begin(), sorted.end());
  if (sorted.size() >= 4) {
    const double cap = 10 * sorted[sorted.size() / 2];
    losses.erase(std::remove_if(losses.begin(), losses.end(),
                                [&](double v) { return v > cap; }),
                 losses.end());
  }

  if (data.params.empty()) {
    svg.Text(12, kHeader + 20, "No tuned parameters in this job.", 12);
  }
  for (size_t i = 0; i < data.params.size(); ++i) {
    const ReportParam& p = data.params[i];
    const double ox = (i % cols) * kPanelW, oy = kHeader + (i / cols) * kPanelH;
    const double left = ox + kMarginL, right = ox + kPanelW - kMarginR;
    const double top = oy + kMarginT, bottom = oy + kPanelH - kMarginB;
    std::vector<double> xs;
    for (const ReportTrial& t : data.trials)
      xs.push_back(HpValue(t.hyperparameters, p.name));
    if (p.log) {
      for (double v : p.values) xs.push_back(v);
    }
    const Axis x = Axis::Fit(xs, p.log, left, right);
    const Axis y = Axis::Fit(losses, false, bottom, top);
    std::vector<double> categories = p.values;
    if (p.categorical) {
      for (double v : xs) {
        if (std::find(categories.begin(), categories.end(), v) ==
            categories.end()) {
          categories.push_back(v);
        }
      }
      std::sort(categories.begin(), categories.end());
    }
    svg.Text(ox + kPanelW / 2, oy + 24,
             absl::StrCat("validation loss vs ", PrettyName(p.name),
                          p.log ? " (log scale)" : ""),
             13, "middle", 0, "bold");
    DrawAxes(svg, x, y, absl::StrCat(PrettyName(p.name), p.log ? " (log)" : ""),
             "validation loss", p.categorical ? &categories : nullptr);
    for (const ReportTrial& t : data.trials) {
      if (t.epochs.empty()) continue;
      const double v = HpValue(t.hyperparameters, p.name);
      double px;
      if (p.categorical) {
        const size_t k = std::find(categories.begin(), categories.end(), v) -
                         categories.begin();
        px = left + (k + 0.5) / categories.size() * (right - left);
      } else {
        if (!x.Contains(v)) continue;
        px = x.Map(v);
      }
      const double loss = t.epochs.back().valid_loss();
      const bool best = t.trial == data.best_trial;
      const std::string title = TrialSummary(t, data);
      if (!std::isfinite(loss) || loss > y.hi) {
        svg.Triangle(px, top + 6, 5, "#c53a32", title + " (off the scale)");
        continue;
      }
      const double py = y.Map(loss);
      if (best) {
        svg.Circle(px, py, 7, "#d62728", "#7a0000", title + " (best)");
        svg.Text(px + 9, py - 8, "best", 10, "start", 0, "bold", "#a01010");
      } else if (t.state == "finished") {
        svg.Circle(px, py, 4.5, StateColor(t.state), "#1f4e79", title);
      } else {
        svg.Circle(px, py, 4.5, "white", StateColor(t.state), title);
      }
    }
  }
  // Legend.
  const double ly = kHeader + rows * kPanelH + 8;
  svg.Circle(16, ly, 4.5, StateColor("finished"), "#1f4e79");
  svg.Text(26, ly + 4, "ran all epochs", 10);
  svg.Circle(130, ly, 4.5, "white", StateColor("stopped"));
  svg.Text(140, ly + 4, "stopped early (value when stopped)", 10);
  svg.Circle(340, ly, 7, "#d62728", "#7a0000");
  svg.Text(352, ly + 4, "best trial", 10);
  svg.Triangle(430, ly, 5, "#c53a32");
  svg.Text(440, ly + 4, "off the scale or diverged", 10);
  return svg.Finish();
}

std::string BestTrialLossSvg(const TuneReportData& data) {
  constexpr double kW = 640, kH = 400, kL = 70, kR = 20, kT = 56, kB = 56;
  Svg svg(kW, kH);
  const ReportTrial* best = FindTrial(data, data.best_trial);
  if (best == nullptr || best->epochs.empty()) {
    svg.Text(16, 28, "No trial finished, so there is no best trial to show.",
             14);
    return svg.Finish();
  }
  std::vector<std::string> params;
  for (const ReportParam& p : data.params) {
    params.push_back(
        absl::StrCat(p.name, "=", Fmt(HpValue(best->hyperparameters, p.name))));
  }
  svg.Text(12, 24,
           absl::StrCat("Best trial (", best->trial,
                        "): train and validation loss per epoch"),
           16, "start", 0, "bold");
  svg.Text(12, 42, absl::StrJoin(params, "  "), 11);
  std::vector<double> epochs, losses;
  for (const auto& e : best->epochs) {
    epochs.push_back(e.epoch());
    losses.push_back(e.train_loss());
    losses.push_back(e.valid_loss());
  }
  const Axis x = Axis::Fit(epochs, false, kL, kW - kR);
  const Axis y = Axis::Fit(losses, false, kH - kB, kT);
  DrawAxes(svg, x, y, "epoch", "loss (mean cross-entropy)", nullptr);
  struct Series {
    const char* name;
    const char* color;
    double (kennel::v1::EpochEnd::*value)() const;
  };
  const Series series[] = {
      {"train", "#3b75af", &kennel::v1::EpochEnd::train_loss},
      {"valid", "#ef8636", &kennel::v1::EpochEnd::valid_loss}};
  for (size_t s = 0; s < 2; ++s) {
    std::vector<std::pair<double, double>> points;
    for (const auto& e : best->epochs) {
      const double v = (e.*series[s].value)();
      if (!y.Contains(v)) continue;
      points.emplace_back(x.Map(e.epoch()), y.Map(v));
    }
    svg.Polyline(points, series[s].color, 2, s == 1 ? "6,3" : "");
    for (const auto& [px, py] : points) {
      svg.Circle(px, py, 3.5, series[s].color, series[s].color);
    }
    const double lx = kW - kR - 130, ly = kT + 14 + 18 * s;
    svg.Line(lx, ly, lx + 24, ly, series[s].color, 2, s == 1 ? "6,3" : "");
    svg.Text(lx + 30, ly + 4, absl::StrCat(series[s].name, " loss"), 11);
  }
  return svg.Finish();
}

std::string TimelineSvg(const TuneReportData& data) {
  constexpr double kW = 760, kL = 60, kR = 130, kT = 56, kRow = 20, kB = 56;
  const double height =
      kT + kRow * std::max<size_t>(1, data.trials.size()) + kB;
  Svg svg(kW, height);
  svg.Text(12, 24, "Trial timeline", 16, "start", 0, "bold");
  svg.Text(12, 42,
           "one bar per trial, from its start to its end; colour: how it ended",
           11);
  std::vector<double> times = {0};
  for (const ReportTrial& t : data.trials) {
    if (t.end >= 0) times.push_back(t.end);
    if (t.start >= 0) times.push_back(t.start);
  }
  Axis x = Axis::Fit(times, false, kL, kW - kR);
  x.lo = 0;
  const double bottom = kT + kRow * std::max<size_t>(1, data.trials.size());
  for (double v : x.Ticks()) {
    if (v < 0) continue;
    const double px = x.Map(v);
    svg.Line(px, kT, px, bottom, "#e4e4e4");
    svg.Text(px, bottom + 16, Fmt(v), 10, "middle");
  }
  svg.Text((kL + kW - kR) / 2, bottom + 34,
           "seconds since the first trial started", 12, "middle");
  for (size_t i = 0; i < data.trials.size(); ++i) {
    const ReportTrial& t = data.trials[i];
    const double y = kT + i * kRow;
    svg.Text(kL - 8, y + kRow * 0.7, absl::StrCat("#", t.trial), 10, "end");
    if (t.start < 0) continue;
    const double end = t.end >= 0 ? t.end : t.start;
    const bool best = t.trial == data.best_trial;
    svg.Rect(x.Map(t.start), y + 3, std::max(x.Map(end) - x.Map(t.start), 1.5),
             kRow - 6, StateColor(t.state), best ? "#000000" : "none",
             best ? 2 : 1, TrialSummary(t, data));
    std::string label = absl::StrCat(t.state, ", ", t.epochs.size(), " ep");
    if (!t.epochs.empty()) {
      label = absl::StrCat(Fmt(t.epochs.back().valid_loss()), " (", label, ")");
    }
    if (best) label += " best";
    svg.Text(x.Map(end) + 4, y + kRow * 0.7, label, 9);
  }
  double lx = kL;
  for (const char* state :
       {"finished", "stopped", "failed", "cancelled", "running"}) {
    svg.Rect(lx, height - 16, 12, 10, StateColor(state));
    svg.Text(lx + 16, height - 7, state, 10);
    lx += 90;
  }
  return svg.Finish();
}

std::string TrialsCsv(const TuneReportData& data) {
  std::string out =
      "trial,state,learning_rate,weight_decay,batch_size,epochs,epochs_run,"
      "train_loss,valid_loss,valid_accuracy,test_loss,test_accuracy,"
      "stopped_early,best,seconds,start_seconds,end_seconds,reason\n";
  for (const ReportTrial& t : data.trials) {
    const auto& hp = t.hyperparameters;
    const bool has = !t.epochs.empty();
    const auto* last = has ? &t.epochs.back() : nullptr;
    const bool tested =
        t.metrics.test_loss() != 0 || t.metrics.test_accuracy() != 0;
    std::vector<std::string> cells = {
        absl::StrCat(t.trial),
        t.state,
        CsvNum(hp.learning_rate()),
        CsvNum(hp.weight_decay()),
        absl::StrCat(hp.batch_size()),
        absl::StrCat(hp.epochs()),
        absl::StrCat(t.epochs.size()),
        has ? CsvNum(last->train_loss()) : "",
        has ? CsvNum(last->valid_loss()) : "",
        has ? CsvNum(last->valid_accuracy()) : "",
        tested ? CsvNum(t.metrics.test_loss()) : "",
        tested ? CsvNum(t.metrics.test_accuracy()) : "",
        t.state == "stopped" ? "true" : "false",
        t.trial == data.best_trial ? "true" : "false",
        CsvNum(t.seconds),
        t.start >= 0 ? CsvNum(t.start) : "",
        t.end >= 0 ? CsvNum(t.end) : "",
        Csv(t.reason)};
    out += absl::StrJoin(cells, ",") + "\n";
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> WriteTuneReport(
    const TuneReportData& data, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot create report folder ", dir, ": ", ec.message()));
  }
  const std::pair<const char*, std::string> files[] = {
      {"loss_vs_parameters.svg", LossVsParametersSvg(data)},
      {"best_trial_loss.svg", BestTrialLossSvg(data)},
      {"timeline.svg", TimelineSvg(data)},
      {"trials.csv", TrialsCsv(data)}};
  std::vector<std::string> written;
  for (const auto& [name, content] : files) {
    const std::string path = (std::filesystem::path(dir) / name).string();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << content;
    out.close();
    if (!out) {
      return absl::InternalError(absl::StrCat("cannot write ", path));
    }
    written.push_back(path);
  }
  return written;
}

}  // namespace kennel::trainer
