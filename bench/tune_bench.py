#!/usr/bin/python3
"""Tuning benchmark: the original 16-trial search in head mode, against one
backbone pass measured in the same run.

The original workflow ran 16 separate jobs (5 epochs each, over learning
rate, weight decay and batch size), each paying for the ResNet50 pass over
every image. Kennel's Tune pays for it once, through the feature cache, and
trains the 16 heads on the cached features. This program measures, on one
machine and in one run:

  pass        a head-mode Train job of 1 epoch on a cold feature cache; its
              backbone-pass seconds (ProfilerReport.feature_seconds) are the
              cost of one feature-extraction pass
  search      the original search (16 trials x 5 epochs, lr 0.001:0.1 log,
              weight decay 0:1e-5, batch size 64,128,256; TPE, 4 trials at a
              time, no early stopping, as the original ran every trial to the
              end) on a second, cold cache: total wall time
  warm        the same search again on the now warm cache: trials per
              minute; and once more with successive halving on

and reports search / pass (goal: at most 1.3).

The data set is generated: dogImages-sized (6,680 / 835 / 836 JPEGs of 640x480
in 133 classes) at --scale 1; smaller scales keep every class and shrink the
splits (2 CPU cores run ResNet50 at roughly 15-70 images/s, so the full set
takes minutes per pass). The backbone is torchvision's ResNet50 exported by
tools/export_backbone.py (ImageNet weights when they can be downloaded,
random weights otherwise; the cost is the same).

Run: /usr/bin/python3 bench/tune_bench.py [--build-dir build] [--scale 0.25]
         [--precision auto|fp32|bf16] [--threads 2] [--workdir DIR] [--json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.abspath(os.path.join(HERE, ".."))

DOG_SPLITS = {"train": 6680, "valid": 835, "test": 836}
CLASSES = 133


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", "--build-dir", dest="build", default=os.path.join(SOURCE, "build"))
    p.add_argument("--workdir", default="", help="keeps the generated set and backbone between runs")
    p.add_argument("--scale", type=float, default=1.0, help="share of the dogImages split sizes")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    return p.parse_args()


ARGS = parse_args()
os.environ.setdefault("KENNEL_BUILD_DIR", os.path.abspath(ARGS.build))
os.environ.setdefault("KENNEL_SOURCE_DIR", SOURCE)
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
import kennel_testlib as kt  # noqa: E402
from kennel.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc  # noqa: E402

PRECISION = {"auto": common_pb2.PRECISION_AUTO, "fp32": common_pb2.PRECISION_FP32,
             "bf16": common_pb2.PRECISION_BF16}


def log(*a):
    if not ARGS.json:
        print(time.strftime("%H:%M:%S"), *a, flush=True)


def generate(root, scale):
    """A dogImages-shaped set of photo-sized JPEGs whose classes differ in
    colour and texture, so the heads have something to learn."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    # Fresh noise per image costs more than the JPEG encode; shifted copies
    # of a few noise fields keep every image different.
    bank = [rng.normal(0, 25, size=(480, 640, 3)).astype(np.float32) for _ in range(8)]
    for split, full in DOG_SPLITS.items():
        n = max(CLASSES, int(round(full * scale)))
        for i in range(n):
            c = i % CLASSES
            folder = os.path.join(root, split, f"{c + 1:03d}.Breed_{c + 1:03d}")
            os.makedirs(folder, exist_ok=True)
            crng = np.random.default_rng(c)
            base = crng.uniform(40, 215, size=3)
            freq = crng.uniform(0.005, 0.05, size=2)
            wave = 40 * np.sin(xx * freq[0] + yy * freq[1] + rng.uniform(0, 6.28))
            noise = np.roll(bank[i % len(bank)], int(rng.integers(0, 640)), axis=1)
            img = base[None, None, :] + wave[..., None] + noise
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{split}_{i:05d}.jpg"), quality=85)
    with open(os.path.join(root, "DONE"), "w") as f:
        f.write(str(scale))


def space(request):
    r = request.space.add(name="learning_rate")
    r.continuous.min, r.continuous.max, r.continuous.scale = 0.001, 0.1, trainer_pb2.SCALE_LOG
    r = request.space.add(name="weight_decay")
    r.continuous.min, r.continuous.max = 0.0, 1e-5
    r = request.space.add(name="batch_size")
    r.categorical.values.extend([64, 128, 256])
    return request


def run(stub, call, request):
    start = time.time()
    events = list(getattr(stub, call)(request, timeout=7200))
    wall = time.time() - start
    failed = [e.failed.message for e in events if e.HasField("failed")]
    if failed:
        raise RuntimeError(f"{call} failed: {failed[0]}")
    profiler = [e.profiler for e in events if e.HasField("profiler")][-1]
    done = [e.completed for e in events if e.HasField("completed")][0]
    return wall, profiler, done, events


def spec(message):
    message.spec.data = "dogs"
    message.spec.backbone = "resnet50.pt"
    message.spec.precision = PRECISION[ARGS.precision]


def search(seed, early_stopping):
    r = trainer_pb2.TuneRequest(max_trials=ARGS.trials, max_parallel_trials=ARGS.parallel,
                                strategy=trainer_pb2.SEARCH_STRATEGY_TPE, seed=seed,
                                early_stopping=early_stopping)
    spec(r)
    r.base.epochs = 5
    return space(r)


def start_trainer(work, root, cache):
    return kt.Service("trainer", f"--data-root={root}", f"--cache-dir={cache}",
                      f"--jobs-dir={work}/jobs", f"--threads={ARGS.threads}",
                      workdir=work, metrics=False).start(timeout=120)


def main():
    work = ARGS.workdir or tempfile.mkdtemp(prefix="kennel-tune-bench-")
    root = os.path.join(work, "root")
    data = os.path.join(root, "dogs")
    marker = os.path.join(data, "DONE")
    if not (os.path.exists(marker) and open(marker).read() == str(ARGS.scale)):
        shutil.rmtree(data, ignore_errors=True)
        log(f"generating a dogImages-sized set at scale {ARGS.scale} in {data}")
        generate(data, ARGS.scale)
    backbone = os.path.join(root, "resnet50.pt")
    if not os.path.exists(backbone):
        log("exporting ResNet50")
        out = subprocess.run([kt.PYTHON, os.path.join(SOURCE, "tools", "export_backbone.py"),
                              "--arch", "resnet50", "--out", backbone],
                             check=True, capture_output=True, text=True, timeout=900)
        log(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "exported")
    counts = {s: sum(len(files) for _, _, files in os.walk(os.path.join(data, s)))
              for s in DOG_SPLITS}
    images = sum(counts.values())
    result = {"scale": ARGS.scale, "images": counts, "classes": CLASSES,
              "threads": ARGS.threads, "precision_requested": ARGS.precision,
              "trials": ARGS.trials, "epochs": 5, "parallel": ARGS.parallel,
              "load_average_at_start": os.getloadavg()}

    for cache in ("cache-pass", "cache-search"):
        shutil.rmtree(os.path.join(work, cache), ignore_errors=True)

    # One feature-extraction pass: a head job of one epoch on a cold cache.
    trainer = start_trainer(work, root, os.path.join(work, "cache-pass"))
    try:
        stub = trainer_pb2_grpc.TrainerStub(kt.channel(trainer.addr))
        r = trainer_pb2.TrainRequest()
        spec(r)
        r.hyperparameters.learning_rate, r.hyperparameters.batch_size = 0.001, 64
        r.hyperparameters.epochs = 1
        log(f"one backbone pass over {images} images (cold cache)")
        wall, profiler, _, events = run(stub, "Train", r)
        started = [e.started for e in events if e.HasField("started")][0]
        result["precision"] = common_pb2.Precision.Name(started.precision)
        result["pass"] = {"feature_seconds": profiler.feature_seconds, "job_wall_seconds": wall,
                          "images_per_second": images / profiler.feature_seconds}
        log(f"pass: {profiler.feature_seconds:.1f} s "
            f"({images / profiler.feature_seconds:.1f} images/s, {result['precision']})")
    finally:
        trainer.stop()

    # The search on its own cold cache, then warm.
    trainer = start_trainer(work, root, os.path.join(work, "cache-search"))
    try:
        stub = trainer_pb2_grpc.TrainerStub(kt.channel(trainer.addr))
        log(f"search: {ARGS.trials} trials x 5 epochs, {ARGS.parallel} at a time (cold cache)")
        wall, profiler, done, _ = run(stub, "Tune", search(1, False))
        result["search"] = {"wall_seconds": wall, "feature_seconds": profiler.feature_seconds,
                            "trial_seconds": wall - profiler.feature_seconds,
                            "best_trial": done.best_trial,
                            "best_valid_loss": done.metrics.valid_loss,
                            "best_test_accuracy": done.metrics.test_accuracy}
        result["search_over_pass"] = wall / result["pass"]["feature_seconds"]
        log(f"search: {wall:.1f} s wall ({profiler.feature_seconds:.1f} s of it the backbone "
            f"pass); {result['search_over_pass']:.3f}x one pass (goal <= 1.3)")

        wall, profiler, _, _ = run(stub, "Tune", search(2, False))
        result["warm"] = {"wall_seconds": wall, "feature_load_seconds": profiler.feature_seconds,
                          "trials_per_minute": ARGS.trials / wall * 60}
        log(f"warm cache: {wall:.1f} s, {ARGS.trials / wall * 60:.1f} trials/min "
            f"(reading the cache {profiler.feature_seconds:.1f} s)")
        wall, profiler, done, events = run(stub, "Tune", search(3, True))
        stopped = sum(1 for e in events if e.HasField("trial_finished")
                      and e.trial_finished.stopped_early)
        result["warm_halving"] = {"wall_seconds": wall, "trials_per_minute": ARGS.trials / wall * 60,
                                  "stopped_early": stopped}
        log(f"warm cache with successive halving: {wall:.1f} s, "
            f"{ARGS.trials / wall * 60:.1f} trials/min, {stopped} stopped early")
    finally:
        trainer.stop()

    # The original ran every epoch of every trial through the backbone.
    result["original_backbone_passes"] = ARGS.trials * 5
    result["original_estimate_seconds"] = ARGS.trials * 5 * result["pass"]["feature_seconds"]
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
