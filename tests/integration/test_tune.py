"""Tune on the real binaries: a small Fashion-MNIST set in head mode on a
small CNN backbone, with a real registry.

What is checked: bad search spaces are refused before any job exists; a
search streams trial events, registers its best trial (lineage and alias)
and draws its report; the same seed gives the same trials (with real head
training, parallel trials and successive halving) and the second search
reads every feature from the cache; a cancelled search keeps and registers
its best finished trial; a search outlives a client that goes away."""

import csv
import os
import subprocess
import tempfile
import unittest
import xml.etree.ElementTree as ET

import kennel_testlib as kt

import grpc
from kennel.v1 import common_pb2, registry_pb2, registry_pb2_grpc, trainer_pb2, trainer_pb2_grpc

PER_CLASS = 30  # images per class and split: 300 per split


def space(request, lr=(0.001, 0.1), wd=(0.0, 1e-5), batch_sizes=(16, 32, 64)):
    r = request.space.add(name="learning_rate")
    r.continuous.min, r.continuous.max = lr
    r.continuous.scale = trainer_pb2.SCALE_LOG
    r = request.space.add(name="weight_decay")
    r.continuous.min, r.continuous.max = wd
    r = request.space.add(name="batch_size")
    r.categorical.values.extend(batch_sizes)
    return request


def trial_sequence(events):
    """Per trial: hyperparameters, epochs run, stopped or not, final losses."""
    out = {}
    for e in events:
        if e.HasField("trial_finished"):
            f = e.trial_finished
            h = f.hyperparameters
            out[e.trial] = (h.learning_rate, h.weight_decay, h.batch_size, h.epochs,
                            f.epochs_run, f.stopped_early, f.failed,
                            round(f.metrics.valid_loss, 5))
    return out


class TuneTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-tune-")
        root = os.path.join(cls.tmp, "root")
        os.makedirs(root)
        kt.kennel("dataset", "fashion-mnist", os.path.join(root, "fm"),
                  "--limit", PER_CLASS, check=True, timeout=120)
        subprocess.run([kt.PYTHON, os.path.join(kt.SOURCE_DIR, "tools", "export_backbone.py"),
                        "--arch", "small_cnn", "--weights", "random", "--seed", "1",
                        "--out", os.path.join(root, "small_cnn.pt")],
                       check=True, capture_output=True, timeout=300)
        cls.registry = kt.Service("registry", f"--storage=file://{cls.tmp}/store",
                                  workdir=cls.tmp, metrics=False).start()
        args = [f"--data-root={root}", f"--cache-dir={cls.tmp}/cache",
                f"--jobs-dir={cls.tmp}/jobs", f"--registry={cls.registry.addr}",
                "--threads=2"]
        cls.trainer = kt.Service("trainer", *args, workdir=cls.tmp)
        try:
            cls.trainer.start(timeout=60)
            cls.has_metrics = True
        except RuntimeError:
            # Without /metrics the tuning metrics check is skipped; the rest
            # runs the same.
            cls.trainer = kt.Service("trainer", *args, workdir=cls.tmp, metrics=False)
            cls.trainer.start(timeout=60)
            cls.has_metrics = False
        cls.channel = kt.channel(cls.trainer.addr)
        cls.stub = trainer_pb2_grpc.TrainerStub(cls.channel)
        cls.registry_stub = registry_pb2_grpc.ModelRegistryStub(
            kt.channel(cls.registry.addr))

    @classmethod
    def tearDownClass(cls):
        cls.trainer.stop()
        cls.registry.stop()

    def request(self, trials=6, parallel=2, strategy=trainer_pb2.SEARCH_STRATEGY_TPE,
                seed=7, epochs=4, early_stopping=True):
        r = trainer_pb2.TuneRequest(max_trials=trials, max_parallel_trials=parallel,
                                    strategy=strategy, seed=seed,
                                    early_stopping=early_stopping)
        r.spec.data = "fm"
        r.spec.backbone = "small_cnn.pt"
        r.spec.precision = common_pb2.PRECISION_FP32
        r.base.epochs = epochs
        return space(r)

    def tune(self, request, timeout=240):
        return list(self.stub.Tune(request, timeout=timeout))

    def job_count(self):
        return len(self.stub.ListJobs(trainer_pb2.ListJobsRequest(limit=1000), timeout=30).jobs)

    def test_bad_search_spaces_are_refused_and_leave_no_job(self):
        before = self.job_count()
        cases = {}
        r = self.request(); r.space[0].continuous.min = 0.5
        cases["min 0.5 is greater than max"] = r
        r = self.request(); r.space[0].continuous.min = 0
        cases["log scale needs min > 0"] = r
        r = self.request(); r.space[1].continuous.max = 0
        cases["is empty"] = r
        r = self.request(); del r.space[2].categorical.values[:]
        cases["the categorical set is empty"] = r
        r = self.request(); r.strategy = 9
        cases["unknown search strategy 9"] = r
        r = self.request(trials=0)
        cases["max_trials must be at least 1"] = r
        r = self.request(); r.space.add(name="momentum").continuous.max = 1
        cases["unknown parameter \"momentum\""] = r
        r = self.request(); r.spec.data = "no-such-set"
        cases["no-such-set"] = r
        for message, request in cases.items():
            with self.subTest(message):
                with self.assertRaises(grpc.RpcError) as caught:
                    self.tune(request)
                self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
                self.assertIn(message, caught.exception.details())
        self.assertEqual(self.job_count(), before)

    def test_trial_counts_below_one_are_usage_errors(self):
        for flag in ("--trials", "--parallel"):
            r = kt.kennel("tune", "--data", "fm", "--backbone", "small_cnn.pt", flag, "0",
                          addr=self.trainer.addr)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(f"{flag} must be at least 1", r.stderr)

    def test_a_report_folder_that_cannot_be_written_starts_nothing(self):
        before = self.job_count()
        blocker = os.path.join(tempfile.mkdtemp(prefix="kennel-tune-report-"), "file")
        with open(blocker, "w") as f:
            f.write("a file where the report folder would go\n")
        r = kt.kennel("tune", "--data", "fm", "--backbone", "small_cnn.pt",
                      "--report", os.path.join(blocker, "report"), addr=self.trainer.addr)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("cannot create report folder", r.stderr)
        self.assertIn("nothing was started", r.stderr)
        self.assertEqual(self.job_count(), before)

    def test_head_search_registers_the_best_trial_and_draws_the_report(self):
        report = os.path.join(self.tmp, "report")
        result = kt.kennel(
            "tune", "--data", "fm", "--backbone", "small_cnn.pt", "--trials", 6,
            "--parallel", 2, "--strategy", "tpe", "--lr", "0.001:0.1:log",
            "--weight-decay", "0:1e-5", "--batch-size", "16,32,64", "--epochs", 4,
            "--seed", 3, "--precision", "fp32", "--register-as", "fm-tuned",
            "--alias", "candidate", "--report", report, addr=self.trainer.addr,
            timeout=240)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        out = result.stdout
        self.assertIn("trial  1 started", out)
        self.assertIn("rank", out)  # the live leaderboard
        self.assertRegex(out, r"best trial \d+: lr=")
        self.assertIn("registered fm-tuned:", out)

        jobs = self.stub.ListJobs(trainer_pb2.ListJobsRequest(limit=1), timeout=30).jobs
        job = jobs[0]
        self.assertEqual(job.kind, trainer_pb2.JOB_KIND_TUNE)
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_SUCCEEDED)
        self.assertEqual(job.tune.max_trials, 6)
        events = list(self.stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.id),
                                         timeout=60))
        started = [e for e in events if e.HasField("trial_started")]
        finished = [e for e in events if e.HasField("trial_finished")]
        epochs = [e for e in events if e.HasField("epoch")]
        self.assertEqual(sorted(e.trial for e in started), list(range(1, 7)))
        self.assertEqual(sorted(e.trial for e in finished), list(range(1, 7)))
        self.assertTrue(all(e.trial > 0 for e in epochs))
        self.assertEqual(len(epochs), sum(e.trial_finished.epochs_run for e in finished))
        self.assertTrue(any(e.HasField("leaderboard") for e in events))
        completed = [e for e in events if e.HasField("completed")][0].completed
        self.assertIn(completed.best_trial, range(1, 7))
        self.assertEqual(completed.model_ref, job.model_ref)
        self.assertGreater(completed.metrics.test_accuracy, 0.1)
        best = [e.trial_finished for e in finished if e.trial == completed.best_trial][0]
        self.assertEqual(completed.hyperparameters.learning_rate,
                         best.hyperparameters.learning_rate)
        # The best is the lowest validation loss among trials that ran all
        # their epochs.
        full = [e.trial_finished for e in finished
                if not e.trial_finished.stopped_early and not e.trial_finished.failed]
        self.assertEqual(best.metrics.valid_loss, min(f.metrics.valid_loss for f in full))

        model = self.registry_stub.GetModel(
            registry_pb2.GetModelRequest(ref="fm-tuned@candidate"), timeout=30)
        self.assertEqual(f"{model.name}:{model.version}", completed.model_ref)
        self.assertEqual(model.lineage.trial, completed.best_trial)
        self.assertEqual(model.lineage.job_id, job.id)
        self.assertAlmostEqual(model.lineage.hyperparameters.learning_rate,
                               completed.hyperparameters.learning_rate)
        self.assertAlmostEqual(model.metrics.test_accuracy, completed.metrics.test_accuracy)

        names = sorted(os.listdir(report))
        self.assertEqual(names, ["best_trial_loss.svg", "loss_vs_parameters.svg",
                                 "timeline.svg", "trials.csv"])
        for name in names:
            if name.endswith(".svg"):
                root = ET.parse(os.path.join(report, name)).getroot()
                self.assertTrue(root.tag.endswith("svg"), name)
        panels = ET.parse(os.path.join(report, "loss_vs_parameters.svg")).getroot()
        titles = [t.text for t in panels.iter("{http://www.w3.org/2000/svg}text")
                  if t.text and t.text.startswith("validation loss vs")]
        self.assertEqual(len(titles), 3)
        self.assertIn("validation loss vs learning rate (log scale)", titles)
        with open(os.path.join(report, "trials.csv")) as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(len(rows), 6)
        self.assertEqual([r["trial"] for r in rows if r["best"] == "true"],
                         [str(completed.best_trial)])

    def test_metrics_follow_the_search(self):
        if not self.has_metrics:
            self.skipTest("this kennel-trainer could not serve /metrics")
        request = self.request(trials=4, seed=11)
        events = self.tune(request)
        job_id = events[0].job_id
        text = self.trainer.scrape()
        lines = [l for l in text.splitlines() if f'job="{job_id}"' in l]
        trials = sum(float(l.rsplit(" ", 1)[1]) for l in lines
                     if l.startswith("kennel_tune_trials_total"))
        self.assertEqual(trials, 4)
        self.assertTrue(any(l.startswith("kennel_tune_best_objective") for l in lines))
        self.assertTrue(any(l.startswith("kennel_tune_trial_objective") and 'trial="4"' in l
                            for l in lines))
        self.assertTrue(any(l.startswith("kennel_trainer_valid_loss") and 'trial="1"' in l
                            for l in lines))

    def test_same_seed_same_trials_and_the_cache_pays_the_backbone_once(self):
        request = self.request(trials=8, parallel=3, seed=21)
        first = self.tune(request)
        second = self.tune(request)
        a, b = trial_sequence(first), trial_sequence(second)
        self.assertEqual(len(a), 8)
        self.assertEqual(a, b)
        self.assertTrue(any(t[5] for t in a.values()), "halving stopped no trial")
        other = self.request(trials=8, parallel=3, seed=22)
        self.assertNotEqual(trial_sequence(self.tune(other)), a)
        profiler = [e.profiler for e in second if e.HasField("profiler")][0]
        self.assertEqual(profiler.feature_cache_misses, 0)
        self.assertEqual(profiler.feature_cache_hits, 900)

    def test_cancel_keeps_and_registers_the_best_finished_trial(self):
        request = self.request(trials=12, parallel=1,
                               strategy=trainer_pb2.SEARCH_STRATEGY_RANDOM,
                               epochs=40, early_stopping=False)
        del request.space[2:]
        request.base.batch_size = 4  # slow trials, so the cancel lands mid-search
        request.spec.register_as = "fm-cancelled"
        events = []
        for e in self.stub.Tune(request, timeout=240):
            events.append(e)
            if e.HasField("trial_finished") and e.trial == 1:
                self.stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=e.job_id),
                                    timeout=30)
        job = self.stub.GetJob(trainer_pb2.GetJobRequest(job_id=events[0].job_id),
                               timeout=30)
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_CANCELLED)
        started = [e for e in events if e.HasField("trial_started")]
        self.assertLess(len(started), 12)
        completed = [e.completed for e in events if e.HasField("completed")]
        self.assertEqual(len(completed), 1, "a cancelled search still completes its best trial")
        best = completed[0].best_trial
        finished = {e.trial: e.trial_finished for e in events if e.HasField("trial_finished")}
        self.assertEqual(finished[best].epochs_run, 40)
        self.assertTrue(completed[0].model_ref.startswith("fm-cancelled:"))
        self.assertEqual(job.model_ref, completed[0].model_ref)
        self.assertTrue(any(e.HasField("cancelled") for e in events))

    def test_finetune_trials_queue_and_the_best_is_tested(self):
        request = self.request(trials=2, parallel=2, seed=3, epochs=1, early_stopping=False)
        request.base.mode = common_pb2.TRAIN_MODE_FINETUNE
        events = self.tune(request)
        self.assertTrue(any(e.HasField("log") and "one at a time" in e.log for e in events))
        # Queued: the second trial starts after the first has finished.
        order = [(e.trial, e.WhichOneof("event")) for e in events
                 if e.HasField("trial_started") or e.HasField("trial_finished")]
        self.assertEqual(order, [(1, "trial_started"), (1, "trial_finished"),
                                 (2, "trial_started"), (2, "trial_finished")])
        done = [e.completed for e in events if e.HasField("completed")][0]
        self.assertIn(done.best_trial, (1, 2))
        self.assertGreater(done.metrics.test_accuracy, 0)
        self.assertEqual(done.hyperparameters.mode, common_pb2.TRAIN_MODE_FINETUNE)

    def test_a_search_outlives_its_client(self):
        request = self.request(trials=4, seed=5)
        call = self.stub.Tune(request, timeout=240)
        first = next(call)
        job_id = first.job_id
        call.cancel()  # the client goes away
        events = list(self.stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id),
                                         timeout=240))
        self.assertTrue(any(e.HasField("completed") for e in events))
        self.assertEqual(len([e for e in events if e.HasField("trial_finished")]), 4)
        job = self.stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=30)
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_SUCCEEDED)


if __name__ == "__main__":
    kt.main()
