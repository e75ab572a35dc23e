// Jobs that outlive the clients that start them. The manager queues jobs,
// runs at most --max-concurrent-jobs at once on its own threads, records
// every event a job emits (numbered 1, 2, 3...) so that a watcher can attach
// at any time and replay what it missed, stops jobs on request at their next
// step boundary, and keeps the history on disk so that ListJobs and GetJob
// survive a restart. A job that was running or queued when the trainer died
// is marked FAILED, with a message saying so, when the trainer starts again.
//
// On disk, under the jobs folder: <id>/job.pb (the Job message, replaced
// atomically on every state change) and <id>/events.pb (every JobEvent,
// appended as varint-length-prefixed records).
//
// Thread-safe. Lock order: the manager's mu_, then a job's own mutex.
#ifndef KENNEL_SERVICES_TRAINER_JOB_MANAGER_H_
#define KENNEL_SERVICES_TRAINER_JOB_MANAGER_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kennel/v1/trainer.pb.h"

namespace kennel::trainer {

// What a running job sees of the manager. Emit and cancelled() may be called
// from any thread (a tuning job emits from its parallel trials).
class JobContext {
 public:
  virtual ~JobContext() = default;
  virtual const std::string& job_id() const = 0;
  // Records and publishes an event; job_id, sequence and time are filled in.
  virtual void Emit(kennel::v1::JobEvent event) = 0;
  // A line for people ("queued", "downloading data").
  void Log(const std::string& line, int trial = 0);
  // True once the job has been asked to stop (CancelJob or shutdown). Jobs
  // poll it at step boundaries and return a CANCELLED status.
  virtual bool cancelled() const = 0;
};

// Runs one job. OK with the completion event on success (the manager emits
// it and records its model ref and metrics); CANCELLED after noticing
// cancelled(); any other status fails the job with that code and message.
// A job that returns OK after a cancel request (a tuning job keeping its best
// trial) ends CANCELLED with both its completion and the cancel recorded.
using JobFn = std::function<absl::StatusOr<kennel::v1::JobCompleted>(
    JobContext& context)>;

// Told about state changes, for metrics. Called without locks held.
class JobObserver {
 public:
  virtual ~JobObserver() = default;
  virtual void JobStarted(const kennel::v1::Job& job) {}
  virtual void JobFinished(const kennel::v1::Job& job) {}
  // Every event of every job, after it is recorded.
  virtual void JobEvent(const kennel::v1::Job& job,
                        const kennel::v1::JobEvent& event) {}
};

struct JobManagerOptions {
  // Where history is kept; empty keeps it in memory only.
  std::string jobs_dir;
  int max_concurrent_jobs = 1;
  // Not owned; may be null. Must outlive the manager.
  JobObserver* observer = nullptr;
};

class JobManager {
 public:
  // Loads the history under jobs_dir (marking jobs that were running or
  // queued as FAILED) and starts the worker threads.
  static absl::StatusOr<std::unique_ptr<JobManager>> Create(
      JobManagerOptions options);
  ~JobManager();

  JobManager(const JobManager&) = delete;
  JobManager& operator=(const JobManager&) = delete;

  // Records `job` (its kind and request; id, state and times are set here)
  // as QUEUED and queues `run`. Returns the new job's id.
  absl::StatusOr<std::string> Submit(kennel::v1::Job job, JobFn run);

  // NOT_FOUND for an unknown id.
  absl::StatusOr<kennel::v1::Job> Get(const std::string& id) const;
  // Newest first; at most `limit` (50 when <= 0).
  std::vector<kennel::v1::Job> List(int limit) const;
  // Asks a job to stop: a queued job ends CANCELLED at once, a running one
  // at its next step boundary. Returns the job as it is now. A finished job
  // is returned unchanged. NOT_FOUND for an unknown id.
  absl::StatusOr<kennel::v1::Job> Cancel(const std::string& id);

  // Passes the job's events with sequence > after_sequence to `sink`, then
  // follows the job live, returning OK after its last event. Returns early,
  // OK, when `sink` returns false or `stop` returns true (it is polled about
  // every 200 ms, so a departed client is noticed); UNAVAILABLE when the
  // manager shuts down; NOT_FOUND for an unknown id.
  absl::Status Watch(
      const std::string& id, int64_t after_sequence,
      const std::function<bool(const kennel::v1::JobEvent&)>& sink,
      const std::function<bool()>& stop) const;

  // Stops accepting jobs, asks running jobs to stop, fails queued ones,
  // ends watches and joins the workers. Idempotent.
  void Shutdown();

  // Number of jobs queued or running.
  int active_jobs() const;

 private:
  struct JobRecord;
  class Context;

  explicit JobManager(JobManagerOptions options);
  absl::Status LoadHistory();
  void WorkerLoop();
  void RunJob(const std::shared_ptr<JobRecord>& record);
  // Ends a job: sets its state and message, appends its terminal events,
  // persists. The record's mutex must not be held.
  void Finish(const std::shared_ptr<JobRecord>& record,
              kennel::v1::JobState state, const std::string& message,
              std::vector<kennel::v1::JobEvent> terminal_events);
  void AppendEvent(JobRecord& record, kennel::v1::JobEvent event);
  // Appends under the record's mutex (held by the caller); returns the
  // event as recorded.
  kennel::v1::JobEvent AppendEventLocked(JobRecord& record,
                                         kennel::v1::JobEvent event);
  void PersistJob(const JobRecord& record);
  std::shared_ptr<JobRecord> Find(const std::string& id) const;

  const JobManagerOptions options_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<JobRecord>> jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<std::shared_ptr<JobRecord>> queue_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

// Timestamp helpers shared by the trainer.
void SetTimestamp(absl::Time time, google::protobuf::Timestamp* out);
bool IsTerminal(kennel::v1::JobState state);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_JOB_MANAGER_H_
