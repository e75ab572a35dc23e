// The Trainer gRPC service: the edge between clients and the job manager.
// Train and Tune validate the request through the backend (a bad request
// gets INVALID_ARGUMENT and no job), submit the job, and stream its events;
// WatchJob re-attaches to any job from a sequence number. A client that goes
// away ends its stream only, never the job. No LibTorch here.
//
// Streams are served on gRPC's synchronous threads: each waits on the job's
// event log (polling about every 200 ms for a departed client) rather than
// inside a callback.
#ifndef KENNEL_SERVICES_TRAINER_TRAINER_SERVICE_H_
#define KENNEL_SERVICES_TRAINER_TRAINER_SERVICE_H_

#include "common/auth.h"
#include "kennel/v1/trainer.grpc.pb.h"
#include "services/trainer/job_manager.h"
#include "services/trainer/trainer_backend.h"

namespace kennel::trainer {

// Thread-safe; the manager, backend and auth must outlive it.
class TrainerService final : public kennel::v1::Trainer::Service {
 public:
  TrainerService(JobManager* jobs, TrainerBackend* backend,
                 const TokenAuth* auth);

  grpc::Status Train(grpc::ServerContext* context,
                     const kennel::v1::TrainRequest* request,
                     grpc::ServerWriter<kennel::v1::JobEvent>* writer) override;
  grpc::Status Tune(grpc::ServerContext* context,
                    const kennel::v1::TuneRequest* request,
                    grpc::ServerWriter<kennel::v1::JobEvent>* writer) override;
  grpc::Status WatchJob(
      grpc::ServerContext* context, const kennel::v1::WatchJobRequest* request,
      grpc::ServerWriter<kennel::v1::JobEvent>* writer) override;
  grpc::Status GetJob(grpc::ServerContext* context,
                      const kennel::v1::GetJobRequest* request,
                      kennel::v1::Job* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context,
                        const kennel::v1::ListJobsRequest* request,
                        kennel::v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext* context,
                         const kennel::v1::CancelJobRequest* request,
                         kennel::v1::Job* response) override;

 private:
  grpc::Status Stream(grpc::ServerContext* context, const std::string& job_id,
                      int64_t after_sequence,
                      grpc::ServerWriter<kennel::v1::JobEvent>* writer);

  JobManager* const jobs_;
  TrainerBackend* const backend_;
  const TokenAuth* const auth_;
};

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TRAINER_SERVICE_H_
