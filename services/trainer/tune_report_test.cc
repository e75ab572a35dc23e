#include "services/trainer/tune_report.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <pugixml.hpp>
#include <sstream>

#include "absl/strings/str_split.h"

namespace kennel::trainer {
namespace {

using ::testing::HasSubstr;

kennel::v1::TuneRequest Request() {
  kennel::v1::TuneRequest request;
  auto* lr = request.add_space();
  lr->set_name("learning_rate");
  lr->mutable_continuous()->set_min(0.001);
  lr->mutable_continuous()->set_max(0.1);
  lr->mutable_continuous()->set_scale(kennel::v1::SCALE_LOG);
  auto* wd = request.add_space();
  wd->set_name("weight_decay");
  wd->mutable_continuous()->set_min(0);
  wd->mutable_continuous()->set_max(1e-5);
  auto* bs = request.add_space();
  bs->set_name("batch_size");
  for (double v : {64, 128, 256}) bs->mutable_categorical()->add_values(v);
  return request;
}

void At(kennel::v1::JobEvent* e, double seconds) {
  e->mutable_time()->set_seconds(1700000000 + static_cast<int64_t>(seconds));
  e->mutable_time()->set_nanos(
      static_cast<int32_t>((seconds - std::floor(seconds)) * 1e9));
}

// Six trials: 1-3 and 5 finish, 4 is stopped early (its reason has a comma
// and markup), 6 fails. Trial 3 is best and the job completed with it.
std::vector<kennel::v1::JobEvent> Events() {
  std::vector<kennel::v1::JobEvent> events;
  int seq = 0;
  auto add = [&](int trial, double t) {
    events.emplace_back();
    events.back().set_job_id("job-1");
    events.back().set_sequence(++seq);
    events.back().set_trial(trial);
    At(&events.back(), t);
    return &events.back();
  };
  const double lrs[] = {0.001, 0.004, 0.01, 0.05, 0.02, 0.1};
  const double wds[] = {0, 2e-6, 5e-6, 1e-5, 7e-6, 1e-6};
  const int bss[] = {64, 128, 256, 64, 128, 256};
  const double finals[] = {0.9, 0.6, 0.4, 1.5, 0.5, 0};
  for (int i = 0; i < 6; ++i) {
    const int trial = i + 1;
    const double start = i * 2.0;
    kennel::v1::Hyperparameters hp;
    hp.set_learning_rate(lrs[i]);
    hp.set_weight_decay(wds[i]);
    hp.set_batch_size(bss[i]);
    hp.set_epochs(3);
    *add(trial, start)->mutable_trial_started()->mutable_hyperparameters() = hp;
    const int epochs = trial == 4 ? 1 : trial == 6 ? 0 : 3;
    for (int e = 1; e <= epochs; ++e) {
      auto* epoch = add(trial, start + e)->mutable_epoch();
      epoch->set_epoch(e);
      epoch->set_epochs(3);
      epoch->set_valid_loss(finals[i] + 0.3 * (3 - e));
      epoch->set_train_loss(finals[i] + 0.2 * (3 - e) - 0.05);
      epoch->set_valid_accuracy(1 - finals[i] / 2);
    }
    auto* f = add(trial, start + epochs + 0.5)->mutable_trial_finished();
    *f->mutable_hyperparameters() = hp;
    f->set_epochs_run(epochs);
    f->set_seconds(epochs + 0.5);
    f->mutable_metrics()->set_valid_loss(finals[i]);
    if (trial == 4) {
      f->set_stopped_early(true);
      f->set_reason("valid_loss 1.5 ranks 3 of 3, <worst>");
    }
    if (trial == 6) {
      f->set_failed(true);
      f->set_reason("out of memory");
    }
    add(0, start + epochs + 0.5)->mutable_leaderboard();
  }
  auto* done = add(0, 20)->mutable_completed();
  done->set_best_trial(3);
  done->set_model_ref("dogs:4");
  return events;
}

pugi::xml_document Parse(const std::string& svg) {
  pugi::xml_document doc;
  pugi::xml_parse_result result = doc.load_string(svg.c_str());
  EXPECT_TRUE(result) << result.description() << "\n" << svg.substr(0, 400);
  EXPECT_STREQ(doc.document_element().name(), "svg");
  return doc;
}

std::vector<std::string> Texts(const pugi::xml_document& doc) {
  std::vector<std::string> out;
  for (auto node : doc.select_nodes("//text"))
    out.push_back(node.node().text().get());
  return out;
}

int CountContaining(const std::vector<std::string>& texts,
                    const std::string& what) {
  int n = 0;
  for (const auto& t : texts) n += t.find(what) != std::string::npos;
  return n;
}

TEST(TuneReportTest, CollectsTrialsStatesTimesAndBest) {
  const kennel::v1::TuneRequest request = Request();
  TuneReportData data = CollectTuneReport(Events(), &request);
  ASSERT_EQ(data.trials.size(), 6u);
  EXPECT_EQ(data.best_trial, 3);
  EXPECT_EQ(data.model_ref, "dogs:4");
  EXPECT_EQ(data.job_id, "job-1");
  EXPECT_EQ(data.trials[0].state, "finished");
  EXPECT_EQ(data.trials[3].state, "stopped");
  EXPECT_EQ(data.trials[5].state, "failed");
  EXPECT_DOUBLE_EQ(data.trials[1].start, 2.0);
  EXPECT_DOUBLE_EQ(data.trials[1].end, 5.5);
  EXPECT_EQ(data.trials[2].epochs.size(), 3u);
  ASSERT_EQ(data.params.size(), 3u);
  EXPECT_TRUE(data.params[0].log);
  EXPECT_FALSE(data.params[1].log);
  EXPECT_TRUE(data.params[2].categorical);
}

TEST(TuneReportTest, InfersTunedParametersWithoutTheRequest) {
  std::vector<kennel::v1::JobEvent> events = Events();
  events.pop_back();  // no completed event: the best is worked out
  TuneReportData data = CollectTuneReport(events, nullptr);
  ASSERT_EQ(data.params.size(), 3u);
  EXPECT_EQ(data.params[0].name, "learning_rate");
  EXPECT_TRUE(data.params[0].log);   // 0.001..0.1 spans a factor of 100
  EXPECT_FALSE(data.params[1].log);  // includes 0
  EXPECT_TRUE(data.params[2].categorical);
  EXPECT_EQ(data.best_trial, 3);
}

TEST(TuneReportTest, LossPanelsOnePerParameterWithLogAxis) {
  const kennel::v1::TuneRequest request = Request();
  TuneReportData data = CollectTuneReport(Events(), &request);
  pugi::xml_document doc = Parse(LossVsParametersSvg(data));
  std::vector<std::string> texts = Texts(doc);
  EXPECT_EQ(CountContaining(texts, "validation loss vs "), 3);
  EXPECT_EQ(
      CountContaining(texts, "validation loss vs learning rate (log scale)"),
      1);
  // Decade ticks on the log axis.
  EXPECT_GE(CountContaining(texts, "0.001"), 1);
  EXPECT_GE(CountContaining(texts, "0.01"), 1);
  // Categorical labels for the batch size.
  EXPECT_EQ(CountContaining(texts, "256"), 1);
  // Five trials have a loss (the failed one has none), in each of 3 panels,
  // plus the legend's 3 circles.
  const size_t points = doc.select_nodes("//circle[@class='point']").size();
  EXPECT_EQ(points, 5u * 3 + 3);
  // The best trial is marked in every panel, and tooltips carry markup safely.
  EXPECT_EQ(CountContaining(texts, "best"), 3 + 1);
  bool escaped = false;
  for (auto node : doc.select_nodes("//title")) {
    escaped |= std::string(node.node().text().get()).find("trial 4") !=
               std::string::npos;
  }
  EXPECT_TRUE(escaped);
}

TEST(TuneReportTest, LogAxisPlacesPointsByLogarithm) {
  const kennel::v1::TuneRequest request = Request();
  TuneReportData data = CollectTuneReport(Events(), &request);
  data.params.resize(1);  // the learning rate only
  pugi::xml_document doc = Parse(LossVsParametersSvg(data));
  // Trials 1, 2, 3 have lr 0.001, 0.004, 0.01: on a log axis the gap from
  // 0.001 to 0.01 is log10(10)/log10(4) times the gap from 0.001 to 0.004.
  std::map<std::string, double> x;
  for (auto node : doc.select_nodes("//circle[@class='point']")) {
    std::string title = node.node().child("title").text().get();
    for (const char* t : {"trial 1 ", "trial 2 ", "trial 3 "}) {
      if (title.rfind(t, 0) == 0)
        x[t] = node.node().attribute("cx").as_double();
    }
  }
  ASSERT_EQ(x.size(), 3u);
  const double ratio =
      (x["trial 3 "] - x["trial 1 "]) / (x["trial 2 "] - x["trial 1 "]);
  EXPECT_NEAR(ratio, 1.0 / std::log10(4.0), 0.02);
}

TEST(TuneReportTest, BestTrialCurvesHaveTrainAndValid) {
  const kennel::v1::TuneRequest request = Request();
  TuneReportData data = CollectTuneReport(Events(), &request);
  pugi::xml_document doc = Parse(BestTrialLossSvg(data));
  std::vector<std::string> texts = Texts(doc);
  EXPECT_EQ(CountContaining(texts, "Best trial (3)"), 1);
  EXPECT_EQ(CountContaining(texts, "train loss"), 1);
  EXPECT_EQ(CountContaining(texts, "valid loss"), 1);
  auto lines = doc.select_nodes("//polyline");
  ASSERT_EQ(lines.size(), 2u);
  for (auto line : lines) {
    std::vector<std::string> pts =
        absl::StrSplit(line.node().attribute("points").value(), ' ');
    EXPECT_EQ(pts.size(), 3u);
  }
  TuneReportData empty;
  Parse(BestTrialLossSvg(empty));
}

TEST(TuneReportTest, TimelineHasABarPerTrialAndMarksTheBest) {
  const kennel::v1::TuneRequest request = Request();
  TuneReportData data = CollectTuneReport(Events(), &request);
  pugi::xml_document doc = Parse(TimelineSvg(data));
  int bars = 0, outlined = 0;
  double best_x = -1, best_w = -1;
  for (auto node : doc.select_nodes("//rect[title]")) {
    ++bars;
    if (std::string(node.node().attribute("stroke").value()) == "#000000") {
      ++outlined;
      best_x = node.node().attribute("x").as_double();
      best_w = node.node().attribute("width").as_double();
    }
  }
  EXPECT_EQ(bars, 6);
  EXPECT_EQ(outlined, 1);
  // Trial 3 runs from 4 s to 7.5 s and trial 1 starts at 0 s, so the best
  // bar's width is 3.5/4 of its distance from trial 1's start.
  double first_x = -1;
  for (auto node : doc.select_nodes("//rect[title]")) {
    if (std::string(node.node().child("title").text().get())
            .rfind("trial 1 ", 0) == 0) {
      first_x = node.node().attribute("x").as_double();
    }
  }
  EXPECT_NEAR(best_w / (best_x - first_x), 3.5 / 4.0, 0.02);
}

TEST(TuneReportTest, CsvHasEveryTrialAndQuotesReasons) {
  const kennel::v1::TuneRequest request = Request();
  TuneReportData data = CollectTuneReport(Events(), &request);
  const std::string csv = TrialsCsv(data);
  std::vector<std::string> lines = absl::StrSplit(csv, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 7u);
  EXPECT_THAT(lines[0],
              HasSubstr("trial,state,learning_rate,weight_decay,batch_size"));
  EXPECT_THAT(lines[3], HasSubstr("3,finished,0.01,5e-06,256,3,3,"));
  EXPECT_THAT(lines[3], HasSubstr(",true,"));  // best
  EXPECT_THAT(lines[4], HasSubstr("\"valid_loss 1.5 ranks 3 of 3, <worst>\""));
  EXPECT_THAT(lines[6], HasSubstr("6,failed,"));
  EXPECT_THAT(lines[6], HasSubstr("out of memory"));
}

TEST(TuneReportTest, WritesFourFiles) {
  const kennel::v1::TuneRequest request = Request();
  TuneReportData data = CollectTuneReport(Events(), &request);
  const std::string dir =
      (std::filesystem::temp_directory_path() /
       ("tune_report_test_" + std::to_string(::getpid())) / "sub")
          .string();
  auto written = WriteTuneReport(data, dir);
  ASSERT_TRUE(written.ok()) << written.status();
  ASSERT_EQ(written->size(), 4u);
  for (const std::string& path : *written) {
    EXPECT_GT(std::filesystem::file_size(path), 100u) << path;
  }
  std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
  EXPECT_FALSE(WriteTuneReport(data, "/proc/no/such/dir").ok());
}

}  // namespace
}  // namespace kennel::trainer
