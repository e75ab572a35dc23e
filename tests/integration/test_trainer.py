"""kennel-trainer on the real binaries with a real registry: a small
Fashion-MNIST set (100 images per split) and a small CNN backbone.

What is checked: a head job streams its events, registers a model that
Python's torch.jit.load opens (labels, preprocessing, logits) with lineage
and metrics in the manifest; fine-tuning through `kennel train` prints a
line per epoch and registers; rules fire when they should (learning rate
that cannot move the weights -> loss_not_decreasing, tiny features ->
vanishing_gradient, a STOP rule ends the job) and stay quiet on a healthy
run; bad input is INVALID_ARGUMENT and leaves no job; the trainer's metrics
follow the jobs."""

import json
import os
import re
import tempfile
import unittest

import kennel_testlib as kt
import trainer_fixtures as tf

import grpc
from kennel.v1 import common_pb2, trainer_pb2


class TrainerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-trainer-")
        cls.root = tf.make_root(cls.tmp, per_class=10)
        tf.make_odd_backbones(cls.root)
        cls.registry, cls.trainer = tf.start_servers(cls.tmp, cls.root)
        cls.stub = tf.trainer_stub(cls.trainer)

    @classmethod
    def tearDownClass(cls):
        cls.trainer.stop()
        cls.registry.stop()

    def job_count(self):
        return len(self.stub.ListJobs(trainer_pb2.ListJobsRequest(limit=1000), timeout=10).jobs)

    def test_head_job_registers_a_model_python_opens(self):
        events = tf.train(self.stub, tf.train_request(
            register_as="fashion-head", aliases=["production"], epochs=3))
        kinds = [e.WhichOneof("event") for e in events]
        self.assertEqual(kinds[0], "log")
        self.assertIn("started", kinds)
        self.assertEqual(kinds.count("epoch"), 3, kinds)
        self.assertIn("profiler", kinds)
        self.assertEqual(kinds[-1], "completed", events[-1])
        self.assertEqual([e.sequence for e in events], list(range(1, len(events) + 1)))
        started = next(e.started for e in events if e.HasField("started"))
        self.assertEqual(len(started.classes), 10)
        self.assertEqual(started.classes[0], "T-shirt_top")
        self.assertEqual([(s.split, s.images) for s in started.splits],
                         [("train", 100), ("valid", 100), ("test", 100)])
        self.assertEqual(started.device, "cpu")
        self.assertTrue(started.backbone_digest.startswith("sha256:"))
        epochs = [e.epoch for e in events if e.HasField("epoch")]
        self.assertLess(epochs[-1].train_loss, epochs[0].train_loss)
        completed = events[-1].completed
        self.assertEqual(completed.model_ref, "fashion-head:1")
        self.assertTrue(completed.metrics.measured)

        model_path = os.path.join(self.tmp, "fashion-head.pt")
        manifest = tf.pull_model(self.registry.addr, "fashion-head@production", model_path)
        self.assertEqual(manifest.version, 1)
        self.assertEqual(list(manifest.labels)[:2], ["T-shirt_top", "Trouser"])
        self.assertEqual(manifest.preprocessing.input_size, 28)
        self.assertEqual(manifest.lineage.job_id, events[0].job_id)
        self.assertEqual(manifest.lineage.backbone_digest, started.backbone_digest)
        self.assertTrue(manifest.lineage.dataset_fingerprint.startswith("sha256:"))
        self.assertAlmostEqual(manifest.metrics.test_accuracy,
                               completed.metrics.test_accuracy, places=6)
        self.assertEqual(manifest.precision, started.precision)
        self.assertEqual(manifest.components[0].role, common_pb2.COMPONENT_ROLE_MODEL)

        # Python's torch.jit.load opens it: labels, preprocessing, logits.
        # Its test accuracy on the PNGs, preprocessed in Python, matches the
        # accuracy the trainer reported.
        check = r'''
import json, os, sys, torch, numpy as np
from PIL import Image
m = torch.jit.load(sys.argv[1])
pre = json.loads(m.kennel_preprocessing)
assert pre["input_size"] == 28, pre
labels = list(m.labels)
root = sys.argv[2]
xs, ys = [], []
for i, folder in enumerate(sorted(os.listdir(root))):
    for name in sorted(os.listdir(os.path.join(root, folder))):
        a = np.asarray(Image.open(os.path.join(root, folder, name)).convert("RGB"), np.float32) / 255
        a = (a - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
        xs.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
        ys.append(i)
with torch.no_grad():
    out = m(torch.stack(xs))
assert out.shape == (len(xs), len(labels)), out.shape
acc = (out.argmax(1) == torch.tensor(ys)).float().mean().item()
print(json.dumps({"labels": labels, "accuracy": acc}))
'''
        import subprocess
        result = subprocess.run([kt.PYTHON, "-c", check, model_path,
                                 os.path.join(self.root, "fm", "test")],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertEqual(len(report["labels"]), 10)
        # bf16 features in the trainer against fp32 in Python may flip a few
        # borderline images out of 100.
        tolerance = 0.03 if manifest.precision == common_pb2.PRECISION_BF16 else 1e-6
        self.assertAlmostEqual(report["accuracy"], completed.metrics.test_accuracy,
                               delta=tolerance)

    def test_finetune_through_the_cli(self):
        result = kt.kennel("train", "--data", "fm", "--backbone", "small_cnn.pt",
                           "--mode", "finetune", "--lr", "0.003", "--batch-size", "32",
                           "--epochs", "2", "--register-as", "fashion-ft",
                           addr=self.trainer.addr, timeout=300)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        out = result.stdout
        self.assertRegex(out, r"epoch  1/2  train loss \d+\.\d+")
        self.assertRegex(out, r"epoch  2/2  train loss")
        self.assertIn("data wait", out)
        self.assertIn("profile:", out)
        self.assertRegex(out, r"completed in .* test accuracy 0\.\d+ .*registered fashion-ft:1")
        job_id = re.search(r"job (job-\S+) accepted", out).group(1)
        shown = kt.kennel("jobs", "show", job_id, "--json", addr=self.trainer.addr, check=True)
        job = json.loads(shown.stdout)
        self.assertEqual(job["state"], "JOB_STATE_SUCCEEDED")
        self.assertEqual(job["model_ref"], "fashion-ft:1")
        self.assertEqual(job["train"]["hyperparameters"]["mode"], "TRAIN_MODE_FINETUNE")
        listed = kt.kennel("jobs", "ls", addr=self.trainer.addr, check=True).stdout
        self.assertIn(job_id, listed)
        self.assertIn("fashion-ft:1", listed)

    def rules_fired(self, events):
        return [(e.rule.rule, e.rule.action) for e in events if e.HasField("rule")]

    def test_a_refused_registration_keeps_the_model_and_names_the_flag(self):
        # The registry wants a token the trainer was not given.
        tmp = tempfile.mkdtemp(prefix="kennel-trainer-token-", dir=self.tmp)
        token = os.path.join(tmp, "token")
        with open(token, "w") as f:
            f.write("s3cret-token\n")
        registry = kt.Service("registry", f"--storage=file://{tmp}/store",
                              f"--token-file={token}", workdir=tmp, metrics=False).start()
        trainer = kt.Service("trainer", f"--data-root={self.root}", f"--cache-dir={tmp}/cache",
                             f"--jobs-dir={tmp}/jobs", "--threads=2",
                             f"--registry={registry.addr}", workdir=tmp).start(timeout=60)
        try:
            events = tf.train(tf.trainer_stub(trainer),
                              tf.train_request(register_as="kept", epochs=1))
            self.assertTrue(events[-1].HasField("failed"), events[-1])
            failed = events[-1].failed
            self.assertEqual(failed.code, grpc.StatusCode.UNAUTHENTICATED.value[0])
            self.assertIn("--registry-token-file", failed.message)
            kept = re.search(r"kept at (\S+\.pt)", failed.message)
            self.assertIsNotNone(kept, failed.message)
            self.assertTrue(os.path.getsize(kept.group(1)) > 0)
        finally:
            trainer.stop()
            registry.stop()

    def test_healthy_run_fires_no_rule(self):
        events = tf.train(self.stub, tf.train_request(lr=0.003, epochs=6))
        self.assertTrue(events[-1].HasField("completed"), events[-1])
        self.assertEqual(self.rules_fired(events), [])

    def test_learning_rate_that_cannot_move_weights_fires_loss_not_decreasing(self):
        # A learning rate of exactly 0 is refused (see test_bad_input); 1e-12
        # moves Adam's weights by less than float precision, so the loss
        # stays where it started.
        events = tf.train(self.stub, tf.train_request(
            lr=1e-12, epochs=3, rules=[tf.rule("loss_not_decreasing", num_steps=1)]))
        self.assertTrue(events[-1].HasField("completed"), events[-1])
        fired = self.rules_fired(events)
        self.assertIn(("loss_not_decreasing", trainer_pb2.RULE_ACTION_WARN), fired)
        rule = next(e.rule for e in events if e.HasField("rule"))
        self.assertEqual(rule.epoch, 2)
        self.assertIn("training loss went from", rule.message)

    def test_stop_rule_ends_the_job(self):
        events = tf.train(self.stub, tf.train_request(
            lr=1e-12, epochs=5,
            rules=[tf.rule("loss_not_decreasing", action="stop", num_steps=1)]))
        self.assertTrue(events[-1].HasField("failed"), events[-1])
        self.assertIn("stopped by rule loss_not_decreasing", events[-1].failed.message)
        self.assertEqual(len([e for e in events if e.HasField("epoch")]), 2)
        job = self.stub.GetJob(trainer_pb2.GetJobRequest(job_id=events[0].job_id), timeout=10)
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_FAILED)
        self.assertEqual(job.model_ref, "")

    def test_tiny_gradients_fire_vanishing_gradient(self):
        events = tf.train(self.stub, tf.train_request(backbone="tiny.pt", epochs=2))
        self.assertTrue(events[-1].HasField("completed"), events[-1])
        self.assertIn(("vanishing_gradient", trainer_pb2.RULE_ACTION_WARN),
                      self.rules_fired(events))
        epoch = next(e.epoch for e in events if e.HasField("epoch"))
        self.assertLess(epoch.mean_abs_gradient, 1e-7)

    def test_bad_input_is_invalid_argument_and_leaves_no_job(self):
        # Data sets that are wrong in one way each.
        os.makedirs(os.path.join(self.tmp, "outside", "train"), exist_ok=True)
        mismatched = os.path.join(self.root, "mismatched")
        empty = os.path.join(self.root, "empty")
        for split in ("train", "valid"):
            os.makedirs(os.path.join(empty, split, "000.a"), exist_ok=True)
            os.makedirs(os.path.join(empty, split, "001.b"), exist_ok=True)
        tf.make_root(self.tmp, per_class=1, name="mismatched")
        os.rename(os.path.join(mismatched, "valid", "009.Ankle_boot"),
                  os.path.join(mismatched, "valid", "010.Boot"))
        link = os.path.join(self.root, "escape")
        if not os.path.islink(link):
            os.symlink(os.path.join(self.tmp, "outside"), link)

        cases = {
            "missing data dir": tf.train_request(data="no-such-folder"),
            "data outside the root": tf.train_request(data="../outside"),
            "absolute path outside": tf.train_request(data="/etc"),
            "symlink out of the root": tf.train_request(data="escape"),
            "mismatched classes": tf.train_request(data="mismatched"),
            "no images": tf.train_request(data="empty"),
            "learning rate 0": tf.train_request(lr=0),
            "negative learning rate": tf.train_request(lr=-0.1),
            "batch size 0": tf.train_request(batch_size=0),
            "zero epochs": tf.train_request(epochs=0),
            "backbone not TorchScript": tf.train_request(backbone="not_torchscript.pt"),
            "backbone output shape": tf.train_request(backbone="spatial.pt"),
            "missing backbone": tf.train_request(backbone="nope.pt"),
            "unknown rule": tf.train_request(rules=[tf.rule("nope")]),
            "bad model name": tf.train_request(register_as="Bad Name"),
        }
        before = self.job_count()
        messages = {}
        for what, request in cases.items():
            code, details = tf.code_of(self.stub.Train(request, timeout=60))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {details}")
            messages[what] = details
        self.assertEqual(self.job_count(), before)
        self.assertIn("does not exist", messages["missing data dir"])
        self.assertIn("outside", messages["data outside the root"])
        self.assertIn("outside", messages["symlink out of the root"])
        self.assertIn("010.Boot", messages["mismatched classes"])
        self.assertIn("no images", messages["no images"])
        self.assertIn("learning_rate must be > 0", messages["learning rate 0"])
        self.assertIn("batch_size must be > 0", messages["batch size 0"])
        self.assertIn("not a TorchScript file", messages["backbone not TorchScript"])
        self.assertIn("does not fit", messages["backbone output shape"])
        # The CLI shows the same refusal and exits 1.
        cli = kt.kennel("train", "--data", "no-such-folder", "--backbone", "small_cnn.pt",
                        addr=self.trainer.addr)
        self.assertEqual(cli.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", cli.stderr)

    def test_unreadable_images_are_skipped_and_counted(self):
        import shutil
        for name, bad in (("fm_bad1", 1), ("fm_bad5", 5)):
            target = os.path.join(self.root, name)
            if not os.path.exists(target):
                shutil.copytree(os.path.join(self.root, "fm"), target)
                folder = os.path.join(target, "train", "003.Dress")
                for file in sorted(os.listdir(folder))[:bad]:
                    with open(os.path.join(folder, file), "wb") as f:
                        f.write(b"\x89PNG\r\n\x1a\n truncated, not an image")
        # 1 of 100 is within the default share (0.01): skipped and reported.
        events = tf.train(self.stub, tf.train_request(data="fm_bad1", epochs=1))
        self.assertTrue(events[-1].HasField("completed"), events[-1])
        logs = [e.log for e in events if e.HasField("log")]
        self.assertTrue(any("skipped 1 unreadable image(s) in train/" in l for l in logs), logs)
        # 5 of 100 is more: the job fails and says why.
        events = tf.train(self.stub, tf.train_request(data="fm_bad5", epochs=1))
        self.assertTrue(events[-1].HasField("failed"), events[-1])
        self.assertEqual(events[-1].failed.code, grpc.StatusCode.FAILED_PRECONDITION.value[0])
        self.assertIn("5 of 100 images in train/ could not be read", events[-1].failed.message)
        # The share is the job's to set.
        request = tf.train_request(data="fm_bad5", epochs=1)
        request.spec.max_bad_image_share = 0.1
        self.assertTrue(tf.train(self.stub, request)[-1].HasField("completed"))

    def test_metrics_follow_jobs(self):
        events = tf.train(self.stub, tf.train_request(epochs=2))
        job = events[0].job_id
        text = self.trainer.scrape()
        self.assertRegex(text, r'kennel_trainer_jobs_total\{kind="train",state="succeeded"\} \d')
        self.assertIn(f'kennel_trainer_train_loss{{job="{job}",trial="0"}}', text)
        self.assertIn(f'kennel_trainer_epoch{{job="{job}"}} 2', text)
        self.assertRegex(text, r"kennel_trainer_feature_cache_hits_total \d")
        self.assertRegex(text, r"kennel_trainer_jobs_running 0")


if __name__ == "__main__":
    kt.main()
