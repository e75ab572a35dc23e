#!/usr/bin/python3
"""Proof of kennel-trainer's tuning on real images (Fashion-MNIST).

What it shows, on the real binaries:
  1. A 16-trial search (head mode, the small CNN backbone from the transfer
     setting: trained on Fashion-MNIST classes 0-4, frozen, heads trained on
     classes 5-9) finds hyperparameters whose test accuracy is at least that
     of the default hyperparameters (lr 0.001, weight decay 0, batch size 64,
     5 epochs). Both figures are printed.
  2. TPE against random search on the same budget (16 trials) and seeds:
     how many trials each needs to reach a given validation loss, and the
     best validation loss after 16 trials, averaged over the seeds, in two
     settings (sequential without early stopping; 4 at a time with
     successive halving). Reported as measured, whichever wins.
  3. Determinism: the same seed gives the same trials (hyperparameters,
     epochs run, early stops, losses) when the search runs again.

Run (after building; about 10 minutes on 2 cores, most of it training the
backbone):
  /usr/bin/python3 tests/proofs/tune_fashion_mnist.py [--build build]
      [--workdir DIR] [--seeds 5] [--backbone-epochs 2] [--backbone FILE.pt]

--backbone skips the backbone training and uses a feature extractor written
by tools/export_backbone.py. The summary is printed and written to
WORKDIR/summary.json; the search's pictures go to WORKDIR/report/.
Exit status: 0 when the tuned test accuracy is at least the default's and
the repeated search is identical, 1 otherwise.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.abspath(os.path.join(HERE, "..", ".."))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", "--build-dir", dest="build", default=os.path.join(SOURCE, "build"))
    p.add_argument("--workdir", default="")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--backbone-epochs", type=int, default=2)
    p.add_argument("--backbone", default="", help="use this backbone file instead of training one")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


ARGS = parse_args()
os.environ.setdefault("KENNEL_BUILD_DIR", os.path.abspath(ARGS.build))
os.environ.setdefault("KENNEL_SOURCE_DIR", SOURCE)
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
import kennel_testlib as kt  # noqa: E402
from kennel.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc  # noqa: E402


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def run_job(stub, call, request):
    """Runs Train or Tune to the end; returns its events."""
    events = list(getattr(stub, call)(request, timeout=3600))
    failed = [e.failed for e in events if e.HasField("failed")]
    if failed:
        raise RuntimeError(f"{call} failed: {failed[0].message}")
    return events


def completed(events):
    return [e.completed for e in events if e.HasField("completed")][0]


def space(request):
    r = request.space.add(name="learning_rate")
    r.continuous.min, r.continuous.max, r.continuous.scale = 0.001, 0.1, trainer_pb2.SCALE_LOG
    r = request.space.add(name="weight_decay")
    r.continuous.min, r.continuous.max = 0.0, 1e-5
    r = request.space.add(name="batch_size")
    r.categorical.values.extend([64, 128, 256])
    return request


def tune_request(data, backbone, strategy, seed, parallel, early_stopping, trials):
    r = trainer_pb2.TuneRequest(max_trials=trials, max_parallel_trials=parallel,
                                strategy=strategy, seed=seed, early_stopping=early_stopping)
    r.spec.data, r.spec.backbone = data, backbone
    r.spec.precision = common_pb2.PRECISION_FP32
    r.base.epochs = 5
    return space(r)


def trials_of(events):
    """trial -> (hyperparameters, epochs_run, stopped_early, valid_loss)."""
    out = {}
    for e in events:
        if e.HasField("trial_finished"):
            f = e.trial_finished
            h = f.hyperparameters
            out[e.trial] = ((h.learning_rate, h.weight_decay, h.batch_size), f.epochs_run,
                            f.stopped_early, f.failed, f.metrics.valid_loss)
    return out


def best_finished_curve(trials, count):
    """Best validation loss among trials 1..k that ran all their epochs, k = 1..count."""
    best, curve = float("inf"), []
    for k in range(1, count + 1):
        t = trials.get(k)
        if t and not t[2] and not t[3]:
            best = min(best, t[4])
        curve.append(best)
    return curve


def trials_to(curve, target):
    for k, v in enumerate(curve, 1):
        if v <= target:
            return k
    return len(curve) + 1  # not reached within the budget


def main():
    work = ARGS.workdir or tempfile.mkdtemp(prefix="kennel-tune-proof-")
    root = os.path.join(work, "root")
    os.makedirs(root, exist_ok=True)
    summary = {"workdir": work}
    t0 = time.time()

    for name, classes in (("fm04", "0,1,2,3,4"), ("fm59", "5,6,7,8,9")):
        if not os.path.isdir(os.path.join(root, name)):
            log(f"writing Fashion-MNIST classes {classes} to {name}/")
            kt.kennel("dataset", "fashion-mnist", os.path.join(root, name), "--classes", classes,
                      check=True, timeout=600)

    registry = kt.Service("registry", f"--storage=file://{work}/store", workdir=work,
                          metrics=False).start()
    trainer = kt.Service("trainer", f"--data-root={root}", f"--cache-dir={work}/cache",
                         f"--jobs-dir={work}/jobs", f"--registry={registry.addr}",
                         f"--threads={ARGS.threads}", workdir=work, metrics=False).start()
    stub = trainer_pb2_grpc.TrainerStub(kt.channel(trainer.addr))
    try:
        # 1. The backbone: a small CNN trained on classes 0-4, then frozen.
        backbone = "small_cnn_fm04.pt"
        if ARGS.backbone:
            shutil.copy(ARGS.backbone, os.path.join(root, backbone))
            if os.path.exists(ARGS.backbone + ".json"):
                shutil.copy(ARGS.backbone + ".json", os.path.join(root, backbone + ".json"))
            summary["backbone"] = {"from": ARGS.backbone}
        else:
            subprocess.run([kt.PYTHON, os.path.join(SOURCE, "tools", "export_backbone.py"),
                            "--arch", "small_cnn", "--weights", "random", "--seed", "1",
                            "--out", os.path.join(root, "small_cnn_random.pt")],
                           check=True, capture_output=True, timeout=300)
            log(f"training the backbone: fine-tune on classes 0-4, {ARGS.backbone_epochs} epochs")
            r = trainer_pb2.TrainRequest()
            r.spec.data, r.spec.backbone = "fm04", "small_cnn_random.pt"
            r.spec.precision = common_pb2.PRECISION_FP32
            h = r.hyperparameters
            h.mode, h.learning_rate, h.batch_size, h.epochs, h.seed = (
                common_pb2.TRAIN_MODE_FINETUNE, 0.003, 128, ARGS.backbone_epochs, 1)
            events = run_job(stub, "Train", r)
            done = completed(events)
            path = [re.search(r"classifier written to (\S+)", e.log).group(1)
                    for e in events if e.HasField("log") and "classifier written to" in e.log][0]
            subprocess.run([kt.PYTHON, os.path.join(SOURCE, "tools", "export_backbone.py"),
                            "--arch", "small_cnn", "--from-classifier", path,
                            "--out", os.path.join(root, backbone)],
                           check=True, capture_output=True, timeout=300)
            summary["backbone"] = {"trained_on": "classes 0-4", "epochs": ARGS.backbone_epochs,
                                   "test_accuracy_classes_0_4": done.metrics.test_accuracy,
                                   "seconds": done.seconds}
            log(f"backbone test accuracy on classes 0-4: {done.metrics.test_accuracy:.4f}")

        # 2. Defaults: one head, default hyperparameters (this also fills the
        # feature cache every search below reads).
        r = trainer_pb2.TrainRequest()
        r.spec.data, r.spec.backbone = "fm59", backbone
        r.spec.precision = common_pb2.PRECISION_FP32
        h = r.hyperparameters
        h.learning_rate, h.weight_decay, h.batch_size, h.epochs = 0.001, 0, 64, 5
        default = completed(run_job(stub, "Train", r))
        summary["defaults"] = {"hyperparameters": {"learning_rate": 0.001, "weight_decay": 0,
                                                   "batch_size": 64, "epochs": 5},
                               "valid_loss": default.metrics.valid_loss,
                               "test_accuracy": default.metrics.test_accuracy}
        log(f"defaults: test accuracy {default.metrics.test_accuracy:.4f}")

        # 3. The search, through the CLI as a person runs it.
        report = os.path.join(work, "report")
        cli = kt.kennel("tune", "--data", "fm59", "--backbone", backbone, "--precision", "fp32",
                        "--trials", ARGS.trials, "--parallel", 4, "--strategy", "tpe",
                        "--lr", "0.001:0.1:log", "--weight-decay", "0:1e-5",
                        "--batch-size", "64,128,256", "--epochs", 5, "--seed", 1,
                        "--register-as", "fashion-5-9", "--alias", "tuned",
                        "--report", report, addr=trainer.addr, timeout=3600)
        if cli.returncode != 0:
            raise RuntimeError(f"kennel tune failed:\n{cli.stdout}\n{cli.stderr}")
        job = stub.ListJobs(trainer_pb2.ListJobsRequest(limit=1), timeout=30).jobs[0]
        events = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.id), timeout=60))
        best = completed(events)
        bh = best.hyperparameters
        summary["search"] = {
            "job": job.id, "trials": ARGS.trials, "parallel": 4, "strategy": "tpe",
            "best_trial": best.best_trial,
            "hyperparameters": {"learning_rate": bh.learning_rate, "weight_decay": bh.weight_decay,
                                "batch_size": bh.batch_size, "epochs": bh.epochs},
            "valid_loss": best.metrics.valid_loss, "test_accuracy": best.metrics.test_accuracy,
            "model_ref": best.model_ref, "seconds": best.seconds, "report": report}
        log(f"search: best trial {best.best_trial} test accuracy {best.metrics.test_accuracy:.4f} "
            f"({best.seconds:.1f} s, registered {best.model_ref})")

        # 4. TPE against random search, same seeds and budget.
        comparison = {}
        for setting, parallel, early in (("sequential, no early stopping", 1, False),
                                         ("4 at a time, successive halving", 4, True)):
            runs = {"random": [], "tpe": []}
            for seed in range(1, ARGS.seeds + 1):
                for name, strategy in (("random", trainer_pb2.SEARCH_STRATEGY_RANDOM),
                                       ("tpe", trainer_pb2.SEARCH_STRATEGY_TPE)):
                    ev = run_job(stub, "Tune", tune_request("fm59", backbone, strategy, seed,
                                                            parallel, early, ARGS.trials))
                    runs[name].append(trials_of(ev))
                log(f"{setting}: seed {seed} done")
            finished = sorted(t[4] for rs in runs.values() for r in rs for t in r.values()
                              if not t[2] and not t[3])
            # The target: a validation loss only the best fifth of all the
            # finished trials (both strategies, every seed) reached.
            target = finished[max(0, len(finished) // 5 - 1)]
            result = {"target_valid_loss": target}
            for name, rs in runs.items():
                curves = [best_finished_curve(r, ARGS.trials) for r in rs]
                to_target = [trials_to(c, target) for c in curves]
                result[name] = {
                    "trials_to_target_per_seed": to_target,
                    "mean_trials_to_target": statistics.mean(to_target),
                    "reached": sum(1 for k in to_target if k <= ARGS.trials),
                    "best_valid_loss_per_seed": [c[-1] for c in curves],
                    "mean_best_valid_loss": statistics.mean(c[-1] for c in curves),
                }
            comparison[setting] = result
            log(f"{setting}: target {target:.4f}; trials to reach it, mean over "
                f"{ARGS.seeds} seeds: random {result['random']['mean_trials_to_target']:.2f}, "
                f"tpe {result['tpe']['mean_trials_to_target']:.2f} "
                f"(unreached counted as {ARGS.trials + 1})")
        summary["tpe_vs_random"] = comparison

        # 5. Determinism: the first comparison search again.
        again = run_job(stub, "Tune", tune_request("fm59", backbone, trainer_pb2.SEARCH_STRATEGY_TPE,
                                                   1, 4, True, ARGS.trials))
        first = run_job(stub, "Tune", tune_request("fm59", backbone, trainer_pb2.SEARCH_STRATEGY_TPE,
                                                   1, 4, True, ARGS.trials))
        summary["determinism"] = {"identical": trials_of(again) == trials_of(first)}
    finally:
        trainer.stop()
        registry.stop()

    summary["total_seconds"] = time.time() - t0
    ok = (summary["search"]["test_accuracy"] >= summary["defaults"]["test_accuracy"]
          and summary["determinism"]["identical"])
    summary["pass"] = ok
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    print(f"\ndefaults test accuracy {summary['defaults']['test_accuracy']:.4f}; "
          f"tuned {summary['search']['test_accuracy']:.4f}; "
          f"determinism {'holds' if summary['determinism']['identical'] else 'BROKEN'}; "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
