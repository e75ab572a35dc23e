#include "services/trainer/job_manager.h"

#include <glog/logging.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;
using kennel::v1::Job;
using kennel::v1::JobEvent;
using kennel::v1::JobState;

constexpr char kJobFile[] = "job.pb";
constexpr char kEventsFile[] = "events.pb";

absl::Time ToTime(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

std::string NewJobId() {
  std::random_device random;
  return absl::StrCat(
      "job-",
      absl::FormatTime("%Y%m%d-%H%M%S", absl::Now(), absl::UTCTimeZone()), "-",
      absl::StrFormat("%04x", static_cast<unsigned>(random() & 0xffff)));
}

bool WriteFileAtomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), bytes.size());
    out.close();
    if (!out) return false;
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  return !ec;
}

std::string Framed(const JobEvent& event) {
  std::string out;
  google::protobuf::io::StringOutputStream stream(&out);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.WriteVarint32(static_cast<uint32_t>(event.ByteSizeLong()));
  event.SerializeToCodedStream(&coded);
  return out;
}

// Reads length-prefixed events; stops at the first incomplete record (a crash
// during an append) and reports where the good records end.
std::vector<JobEvent> ReadEvents(const std::string& path, size_t* good_bytes) {
  std::vector<JobEvent> events;
  *good_bytes = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) return events;
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string data = buffer.str();
  google::protobuf::io::CodedInputStream coded(
      reinterpret_cast<const uint8_t*>(data.data()), data.size());
  coded.SetTotalBytesLimit(std::numeric_limits<int>::max());
  while (true) {
    uint32_t size;
    if (!coded.ReadVarint32(&size)) break;
    auto limit = coded.PushLimit(size);
    JobEvent event;
    if (!event.ParseFromCodedStream(&coded) || !coded.ConsumedEntireMessage() ||
        coded.BytesUntilLimit() != 0) {
      break;
    }
    coded.PopLimit(limit);
    events.push_back(std::move(event));
    *good_bytes = coded.CurrentPosition();
  }
  return events;
}

}  // namespace

void SetTimestamp(absl::Time time, google::protobuf::Timestamp* out) {
  const int64_t nanos = absl::ToUnixNanos(time);
  out->set_seconds(nanos / 1000000000);
  out->set_nanos(static_cast<int32_t>(nanos % 1000000000));
}

bool IsTerminal(JobState state) {
  return state == kennel::v1::JOB_STATE_SUCCEEDED ||
         state == kennel::v1::JOB_STATE_FAILED ||
         state == kennel::v1::JOB_STATE_CANCELLED;
}

void JobContext::Log(const std::string& line, int trial) {
  JobEvent event;
  event.set_log(line);
  event.set_trial(trial);
  Emit(std::move(event));
}

struct JobManager::JobRecord {
  absl::Mutex mu;
  Job job ABSL_GUARDED_BY(mu);
  std::vector<JobEvent> events ABSL_GUARDED_BY(mu);
  // Set when watchers must let go (shutdown).
  bool closing ABSL_GUARDED_BY(mu) = false;
  // Constant after Submit/load.
  std::string id;
  std::string dir;  // empty: not persisted
  JobFn run;        // cleared once the job starts
  std::atomic<bool> cancel_requested{false};
  std::atomic<bool> shutdown_requested{false};
};

class JobManager::Context : public JobContext {
 public:
  Context(JobManager* manager, std::shared_ptr<JobRecord> record)
      : manager_(manager), record_(std::move(record)) {}
  const std::string& job_id() const override { return record_->id; }
  void Emit(JobEvent event) override {
    manager_->AppendEvent(*record_, std::move(event));
  }
  bool cancelled() const override {
    return record_->cancel_requested.load() ||
           record_->shutdown_requested.load();
  }

 private:
  JobManager* manager_;
  std::shared_ptr<JobRecord> record_;
};

JobManager::JobManager(JobManagerOptions options)
    : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(
    JobManagerOptions options) {
  if (options.max_concurrent_jobs < 1) {
    return absl::InvalidArgumentError("--max-concurrent-jobs must be >= 1");
  }
  if (!options.jobs_dir.empty()) {
    std::error_code ec;
    fs::create_directories(options.jobs_dir, ec);
    if (ec) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot create --jobs-dir ", options.jobs_dir, ": ", ec.message()));
    }
  }
  std::unique_ptr<JobManager> manager(new JobManager(std::move(options)));
  if (absl::Status s = manager->LoadHistory(); !s.ok()) return s;
  for (int i = 0; i < manager->options_.max_concurrent_jobs; ++i) {
    manager->workers_.emplace_back([m = manager.get()] { m->WorkerLoop(); });
  }
  return manager;
}

JobManager::~JobManager() { Shutdown(); }

absl::Status JobManager::LoadHistory() {
  if (options_.jobs_dir.empty()) return absl::OkStatus();
  std::error_code ec;
  int loaded = 0, interrupted = 0;
  for (const auto& entry : fs::directory_iterator(options_.jobs_dir, ec)) {
    const std::string dir = entry.path().string();
    std::ifstream in(dir + "/" + kJobFile, std::ios::binary);
    if (!in) continue;
    auto record = std::make_shared<JobRecord>();
    Job job;
    if (!job.ParseFromIstream(&in)) {
      LOG(WARNING) << "skipping unreadable job record " << dir;
      continue;
    }
    size_t good_bytes = 0;
    std::vector<JobEvent> events =
        ReadEvents(dir + "/" + kEventsFile, &good_bytes);
    fs::resize_file(dir + "/" + kEventsFile, good_bytes, ec);
    record->id = job.id();
    record->dir = dir;
    const JobState was = job.state();
    {
      absl::MutexLock lock(&record->mu);
      job.set_event_count(static_cast<int64_t>(events.size()));
      record->job = std::move(job);
      record->events = std::move(events);
    }
    ++loaded;
    {
      absl::MutexLock lock(&mu_);
      jobs_[record->id] = record;
    }
    if (!IsTerminal(was)) {
      ++interrupted;
      const std::string message = absl::StrCat(
          "kennel-trainer stopped while this job was ",
          was == kennel::v1::JOB_STATE_RUNNING ? "running" : "queued",
          "; it was marked failed when the trainer restarted at ",
          absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", absl::Now(),
                           absl::UTCTimeZone()),
          ". Start it again.");
      JobEvent failed;
      failed.mutable_failed()->set_code(
          static_cast<int>(absl::StatusCode::kAborted));
      failed.mutable_failed()->set_message(message);
      Finish(record, kennel::v1::JOB_STATE_FAILED, message, {failed});
    }
  }
  if (loaded > 0) {
    LOG(INFO) << "loaded " << loaded << " job(s) from " << options_.jobs_dir
              << "; " << interrupted << " interrupted job(s) marked failed";
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> JobManager::Submit(Job job, JobFn run) {
  auto record = std::make_shared<JobRecord>();
  record->run = std::move(run);
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) {
      return absl::UnavailableError("kennel-trainer is shutting down");
    }
    std::string id = NewJobId();
    while (jobs_.count(id)) id = NewJobId();
    record->id = id;
    if (!options_.jobs_dir.empty()) {
      record->dir = options_.jobs_dir + "/" + id;
      std::error_code ec;
      fs::create_directories(record->dir, ec);
      if (ec) {
        return absl::InternalError(
            absl::StrCat("cannot create ", record->dir, ": ", ec.message()));
      }
    }
    job.set_id(id);
    job.set_state(kennel::v1::JOB_STATE_QUEUED);
    SetTimestamp(absl::Now(), job.mutable_created_at());
    {
      absl::MutexLock record_lock(&record->mu);
      record->job = std::move(job);
    }
    PersistJob(*record);
    const int ahead = running_ + static_cast<int>(queue_.size());
    jobs_[id] = record;
    queue_.push_back(record);
    // The first event names the job at once, so a client can re-attach
    // even before the job has produced anything.
    JobEvent event;
    if (ahead >= options_.max_concurrent_jobs) {
      event.set_log(absl::StrCat("job ", id, " queued behind ",
                                 ahead - options_.max_concurrent_jobs + 1,
                                 " job(s); --max-concurrent-jobs is ",
                                 options_.max_concurrent_jobs));
    } else {
      event.set_log(absl::StrCat("job ", id, " accepted"));
    }
    AppendEvent(*record, std::move(event));
  }
  return record->id;
}

std::shared_ptr<JobManager::JobRecord> JobManager::Find(
    const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : it->second;
}

absl::StatusOr<Job> JobManager::Get(const std::string& id) const {
  std::shared_ptr<JobRecord> record = Find(id);
  if (!record) {
    return absl::NotFoundError(absl::StrCat("no job \"", id, "\""));
  }
  absl::MutexLock lock(&record->mu);
  return record->job;
}

std::vector<Job> JobManager::List(int limit) const {
  if (limit <= 0) limit = 50;
  std::vector<std::shared_ptr<JobRecord>> records;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, record] : jobs_) records.push_back(record);
  }
  std::vector<Job> jobs;
  for (const auto& record : records) {
    absl::MutexLock lock(&record->mu);
    jobs.push_back(record->job);
  }
  std::sort(jobs.begin(), jobs.end(), [](const Job& a, const Job& b) {
    const absl::Time ta = ToTime(a.created_at()), tb = ToTime(b.created_at());
    return ta != tb ? ta > tb : a.id() > b.id();
  });
  if (static_cast<int>(jobs.size()) > limit) jobs.resize(limit);
  return jobs;
}

absl::StatusOr<Job> JobManager::Cancel(const std::string& id) {
  std::shared_ptr<JobRecord> record;
  bool was_queued = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) {
      return absl::NotFoundError(absl::StrCat("no job \"", id, "\""));
    }
    record = it->second;
    auto q = std::find(queue_.begin(), queue_.end(), record);
    if (q != queue_.end()) {
      queue_.erase(q);
      was_queued = true;
    }
  }
  record->cancel_requested = true;
  if (was_queued) {
    JobEvent cancelled;
    cancelled.mutable_cancelled()->set_message("cancelled before it started");
    Finish(record, kennel::v1::JOB_STATE_CANCELLED,
           "cancelled before it started", {cancelled});
  } else {
    absl::MutexLock lock(&record->mu);
    if (!IsTerminal(record->job.state())) {
      LOG(INFO) << "job " << id << ": cancel requested";
    }
  }
  absl::MutexLock lock(&record->mu);
  return record->job;
}

void JobManager::AppendEvent(JobRecord& record, JobEvent event) {
  Job snapshot;
  JobEvent appended;
  {
    absl::MutexLock lock(&record.mu);
    appended = AppendEventLocked(record, std::move(event));
    if (options_.observer) snapshot = record.job;
  }
  if (options_.observer) options_.observer->JobEvent(snapshot, appended);
}

JobEvent JobManager::AppendEventLocked(JobRecord& record, JobEvent event) {
  event.set_job_id(record.id);
  event.set_sequence(static_cast<int64_t>(record.events.size()) + 1);
  SetTimestamp(absl::Now(), event.mutable_time());
  if (!record.dir.empty()) {
    std::ofstream out(record.dir + "/" + kEventsFile,
                      std::ios::binary | std::ios::app);
    const std::string framed = Framed(event);
    out.write(framed.data(), framed.size());
    if (!out) {
      LOG(WARNING) << "job " << record.id << ": cannot append event to "
                   << record.dir;
    }
  }
  record.events.push_back(event);
  record.job.set_event_count(static_cast<int64_t>(record.events.size()));
  return event;
}

void JobManager::PersistJob(const JobRecord& record) {
  if (record.dir.empty()) return;
  std::string bytes;
  {
    absl::MutexLock lock(&const_cast<JobRecord&>(record).mu);
    record.job.SerializeToString(&bytes);
  }
  if (!WriteFileAtomically(record.dir + "/" + kJobFile, bytes)) {
    LOG(WARNING) << "job " << record.id << ": cannot write " << record.dir;
  }
}

void JobManager::Finish(const std::shared_ptr<JobRecord>& record,
                        JobState state, const std::string& message,
                        std::vector<JobEvent> terminal_events) {
  const absl::Time now = absl::Now();
  auto finish = [&](Job& job) {
    job.set_state(state);
    if (!message.empty()) job.set_message(message);
    SetTimestamp(now, job.mutable_finished_at());
  };
  Job snapshot;
  {
    absl::MutexLock lock(&record->mu);
    snapshot = record->job;
  }
  finish(snapshot);
  // Metrics first, so that whoever sees the job end also sees it counted.
  if (options_.observer) options_.observer->JobFinished(snapshot);
  std::vector<JobEvent> appended;
  {
    // The terminal events and the terminal state appear together: a watcher
    // that sees the state has every event, and GetJob after the last event
    // shows the final state.
    absl::MutexLock lock(&record->mu);
    for (JobEvent& event : terminal_events) {
      appended.push_back(AppendEventLocked(*record, std::move(event)));
    }
    finish(record->job);
    snapshot = record->job;
  }
  if (options_.observer) {
    for (const JobEvent& event : appended) {
      options_.observer->JobEvent(snapshot, event);
    }
  }
  PersistJob(*record);
  LOG(INFO) << "job " << record->id << " " << kennel::v1::JobState_Name(state)
            << (message.empty() ? "" : ": ") << message;
}

void JobManager::WorkerLoop() {
  while (true) {
    std::shared_ptr<JobRecord> record;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](JobManager* m) ABSL_EXCLUSIVE_LOCKS_REQUIRED(m->mu_) {
            return m->shutdown_ || !m->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // shutdown
      record = queue_.front();
      queue_.pop_front();
      ++running_;
    }
    RunJob(record);
    absl::MutexLock lock(&mu_);
    --running_;
  }
}

void JobManager::RunJob(const std::shared_ptr<JobRecord>& record) {
  Job snapshot;
  {
    absl::MutexLock lock(&record->mu);
    record->job.set_state(kennel::v1::JOB_STATE_RUNNING);
    SetTimestamp(absl::Now(), record->job.mutable_started_at());
    snapshot = record->job;
  }
  PersistJob(*record);
  if (options_.observer) options_.observer->JobStarted(snapshot);
  LOG(INFO) << "job " << record->id << " started";

  Context context(this, record);
  JobFn run = std::move(record->run);
  record->run = nullptr;
  absl::StatusOr<kennel::v1::JobCompleted> result;
  try {
    result = run(context);
  } catch (const std::exception& e) {
    // Job code returns statuses; this is the last line that keeps one bad
    // job from taking the trainer and every other job down with it.
    result = absl::InternalError(absl::StrCat("unexpected error: ", e.what()));
  }

  if (record->shutdown_requested.load() && !result.ok()) {
    const std::string message =
        "kennel-trainer shut down while the job was running";
    JobEvent failed;
    failed.mutable_failed()->set_code(
        static_cast<int>(absl::StatusCode::kUnavailable));
    failed.mutable_failed()->set_message(message);
    Finish(record, kennel::v1::JOB_STATE_FAILED, message, {failed});
    return;
  }
  const bool cancel = record->cancel_requested.load();
  if (result.ok()) {
    JobEvent completed;
    *completed.mutable_completed() = *result;
    {
      absl::MutexLock lock(&record->mu);
      record->job.set_model_ref(result->model_ref());
      *record->job.mutable_metrics()->mutable_metrics() = result->metrics();
      *record->job.mutable_metrics()->mutable_hyperparameters() =
          result->hyperparameters();
    }
    if (cancel) {
      JobEvent cancelled;
      cancelled.mutable_cancelled()->set_message(
          "cancelled; the best result so far was kept");
      Finish(record, kennel::v1::JOB_STATE_CANCELLED,
             "cancelled; the best result so far was kept",
             {completed, cancelled});
    } else {
      Finish(record, kennel::v1::JOB_STATE_SUCCEEDED, "", {completed});
    }
    return;
  }
  if (cancel && result.status().code() == absl::StatusCode::kCancelled) {
    const std::string message = result.status().message().empty()
                                    ? "cancelled"
                                    : std::string(result.status().message());
    JobEvent cancelled;
    cancelled.mutable_cancelled()->set_message(message);
    Finish(record, kennel::v1::JOB_STATE_CANCELLED, message, {cancelled});
    return;
  }
  const std::string message(result.status().message());
  JobEvent failed;
  failed.mutable_failed()->set_code(static_cast<int>(result.status().code()));
  failed.mutable_failed()->set_message(message);
  Finish(record, kennel::v1::JOB_STATE_FAILED, message, {failed});
}

absl::Status JobManager::Watch(const std::string& id, int64_t after_sequence,
                               const std::function<bool(const JobEvent&)>& sink,
                               const std::function<bool()>& stop) const {
  std::shared_ptr<JobRecord> record = Find(id);
  if (!record) return absl::NotFoundError(absl::StrCat("no job \"", id, "\""));
  size_t next = static_cast<size_t>(std::max<int64_t>(0, after_sequence));
  while (true) {
    std::vector<JobEvent> batch;
    {
      absl::MutexLock lock(&record->mu);
      auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(record->mu) {
        return record->events.size() > next || record->closing ||
               IsTerminal(record->job.state());
      };
      record->mu.AwaitWithTimeout(absl::Condition(&ready),
                                  absl::Milliseconds(200));
      for (; next < record->events.size(); ++next) {
        batch.push_back(record->events[next]);
      }
      if (batch.empty()) {
        if (IsTerminal(record->job.state())) return absl::OkStatus();
        if (record->closing) {
          return absl::UnavailableError(
              "kennel-trainer is shutting down; watch the job again after it "
              "restarts");
        }
      }
    }
    for (const JobEvent& event : batch) {
      if (!sink(event)) return absl::OkStatus();
    }
    if (stop && stop()) return absl::OkStatus();
  }
}

void JobManager::Shutdown() {
  std::vector<std::shared_ptr<JobRecord>> queued;
  std::vector<std::shared_ptr<JobRecord>> all;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_ && workers_.empty()) return;
    shutdown_ = true;
    queued.assign(queue_.begin(), queue_.end());
    queue_.clear();
    for (const auto& [id, record] : jobs_) all.push_back(record);
  }
  for (const auto& record : all) record->shutdown_requested = true;
  for (const auto& record : queued) {
    const std::string message =
        "kennel-trainer shut down before the job started";
    JobEvent failed;
    failed.mutable_failed()->set_code(
        static_cast<int>(absl::StatusCode::kUnavailable));
    failed.mutable_failed()->set_message(message);
    Finish(record, kennel::v1::JOB_STATE_FAILED, message, {failed});
  }
  for (std::thread& worker : workers_) worker.join();
  workers_.clear();
  for (const auto& record : all) {
    absl::MutexLock lock(&record->mu);
    record->closing = true;
  }
}

int JobManager::active_jobs() const {
  absl::MutexLock lock(&mu_);
  return running_ + static_cast<int>(queue_.size());
}

}  // namespace kennel::trainer
