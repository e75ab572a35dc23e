#include "services/trainer/trainer_service.h"

#include <glog/logging.h>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"

namespace kennel::trainer {

TrainerService::TrainerService(JobManager* jobs, TrainerBackend* backend,
                               const TokenAuth* auth)
    : jobs_(jobs), backend_(backend), auth_(auth) {}

grpc::Status TrainerService::Stream(
    grpc::ServerContext* context, const std::string& job_id,
    int64_t after_sequence, grpc::ServerWriter<kennel::v1::JobEvent>* writer) {
  absl::Status status = jobs_->Watch(
      job_id, after_sequence,
      [writer](const kennel::v1::JobEvent& event) {
        // False when the client has gone; the job carries on.
        return writer->Write(event);
      },
      [context] { return context->IsCancelled(); });
  return ToGrpcStatus(status);
}

grpc::Status TrainerService::Train(
    grpc::ServerContext* context, const kennel::v1::TrainRequest* request,
    grpc::ServerWriter<kennel::v1::JobEvent>* writer) {
  if (absl::Status s = auth_->Check(*context); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<JobFn> run = backend_->PrepareTrain(*request);
  if (!run.ok()) return ToGrpcStatus(run.status());
  kennel::v1::Job job;
  job.set_kind(kennel::v1::JOB_KIND_TRAIN);
  *job.mutable_train() = *request;
  absl::StatusOr<std::string> id =
      jobs_->Submit(std::move(job), *std::move(run));
  if (!id.ok()) return ToGrpcStatus(id.status());
  context->AddInitialMetadata("kennel-job-id", *id);
  return Stream(context, *id, 0, writer);
}

grpc::Status TrainerService::Tune(
    grpc::ServerContext* context, const kennel::v1::TuneRequest* request,
    grpc::ServerWriter<kennel::v1::JobEvent>* writer) {
  if (absl::Status s = auth_->Check(*context); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<JobFn> run = backend_->PrepareTune(*request);
  if (!run.ok()) return ToGrpcStatus(run.status());
  kennel::v1::Job job;
  job.set_kind(kennel::v1::JOB_KIND_TUNE);
  *job.mutable_tune() = *request;
  absl::StatusOr<std::string> id =
      jobs_->Submit(std::move(job), *std::move(run));
  if (!id.ok()) return ToGrpcStatus(id.status());
  context->AddInitialMetadata("kennel-job-id", *id);
  return Stream(context, *id, 0, writer);
}

grpc::Status TrainerService::WatchJob(
    grpc::ServerContext* context, const kennel::v1::WatchJobRequest* request,
    grpc::ServerWriter<kennel::v1::JobEvent>* writer) {
  if (request->job_id().empty()) {
    return ToGrpcStatus(absl::InvalidArgumentError("job_id is empty"));
  }
  if (request->after_sequence() < 0) {
    return ToGrpcStatus(
        absl::InvalidArgumentError("after_sequence must be >= 0"));
  }
  return Stream(context, request->job_id(), request->after_sequence(), writer);
}

grpc::Status TrainerService::GetJob(grpc::ServerContext* context,
                                    const kennel::v1::GetJobRequest* request,
                                    kennel::v1::Job* response) {
  absl::StatusOr<kennel::v1::Job> job = jobs_->Get(request->job_id());
  if (!job.ok()) return ToGrpcStatus(job.status());
  *response = *std::move(job);
  return grpc::Status::OK;
}

grpc::Status TrainerService::ListJobs(
    grpc::ServerContext* context, const kennel::v1::ListJobsRequest* request,
    kennel::v1::ListJobsResponse* response) {
  if (request->limit() < 0) {
    return ToGrpcStatus(absl::InvalidArgumentError("limit must be >= 0"));
  }
  for (kennel::v1::Job& job : jobs_->List(request->limit())) {
    *response->add_jobs() = std::move(job);
  }
  return grpc::Status::OK;
}

grpc::Status TrainerService::CancelJob(
    grpc::ServerContext* context, const kennel::v1::CancelJobRequest* request,
    kennel::v1::Job* response) {
  if (absl::Status s = auth_->Check(*context); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<kennel::v1::Job> job = jobs_->Cancel(request->job_id());
  if (!job.ok()) return ToGrpcStatus(job.status());
  *response = *std::move(job);
  return grpc::Status::OK;
}

}  // namespace kennel::trainer
