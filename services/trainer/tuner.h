// Tuning jobs: a hyperparameter search run as one job.
//
// Head mode pays for the backbone once: the features of every image come from
// (or go into) the shared feature cache, then every trial trains a head on
// them, up to max_parallel_trials at once within the trainer's thread budget.
// Fine-tune mode trains every parameter per trial, so its trials queue on the
// device one after another. The search itself (strategies, successive
// halving, determinism) is tune_scheduler.h; this file connects it to the
// trainer's building blocks and registers the best trial's model through the
// same path as Train.
#ifndef KENNEL_SERVICES_TRAINER_TUNER_H_
#define KENNEL_SERVICES_TRAINER_TUNER_H_

#include "absl/status/statusor.h"
#include "kennel/v1/trainer.pb.h"
#include "services/trainer/job_manager.h"
#include "services/trainer/train_job.h"

namespace kennel::trainer {

// Validates the request completely (search space, base hyperparameters,
// data set, backbone, rules, registration target), so a bad request is
// INVALID_ARGUMENT before any job exists, and returns the job to run.
// `options` must outlive the job.
absl::StatusOr<JobFn> PrepareTuneJob(const kennel::v1::TuneRequest& request,
                                     const TrainerOptions* options);

// The base hyperparameters of a search with the trainer's defaults in the
// fields left at zero (learning rate 0.001, batch size 64, 5 epochs).
kennel::v1::Hyperparameters TuneBaseWithDefaults(
    const kennel::v1::Hyperparameters& base);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_TUNER_H_
