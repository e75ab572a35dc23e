"""Crash safety: kill -9 each service in the middle of its riskiest work and
check, after a restart, that nothing committed is lost and nothing half-done
is visible.

- The registry during pushes: committed versions and aliases are intact and
  their bytes verify, a push the crash interrupted left no version, and the
  next push takes the next number.
- The trainer during an epoch: the job is FAILED with a message that says why
  (never lost, never left RUNNING), the model an earlier job registered is
  intact, and the trainer takes new jobs.
- Inference during a model swap: it serves the alias's model after the
  restart, its blob cache holds no half-written file (and the restart removes
  the temporary files the cut downloads left), and clients saw no error
  before the crash. A broken version does not replace a working one, and a
  restart while the alias points at it serves the last good model.
"""

import hashlib
import os
import re
import tempfile
import threading
import time
import unittest

import e2e_lib as e2e
from e2e_lib import kt, rc

import grpc
from kennel.v1 import inference_pb2, registry_pb2, trainer_pb2

import trainer_fixtures as tf


def verify_version(test, led, stub, name, version, digest):
    """GetModel and a full PullModel of name:version; the bytes must hash to
    `digest`. Records a lost version in the ledger instead of stopping at the
    first, so the table shows them all."""
    ref = f"{name}:{version}"
    manifest, error = led.call(stub.GetModel, registry_pb2.GetModelRequest(ref=ref), timeout=10)
    if error is not None:
        led.lose(f"{ref}: GetModel {error.code().name} {error.details()}")
        return False
    if manifest.components[0].digest != digest:
        led.lose(f"{ref}: manifest digest {manifest.components[0].digest} != {digest}")
        return False
    h = hashlib.sha256()
    messages, error = led.stream(stub.PullModel, registry_pb2.PullModelRequest(ref=ref),
                                 timeout=60)
    if error is not None:
        led.lose(f"{ref}: PullModel {error.code().name} {error.details()}")
        return False
    for m in messages[1:]:
        h.update(m.chunk.data)
    if "sha256:" + h.hexdigest() != digest:
        led.lose(f"{ref}: pulled bytes hash to sha256:{h.hexdigest()}")
        return False
    led.checked()
    return True


class RegistryCrashTest(unittest.TestCase):
    def test_registry_kill_9_during_pushes(self):
        led = e2e.ledger(self)
        tmp = tempfile.mkdtemp(prefix="kennel-e2e-crash-registry-")
        registry = e2e.start_registry(tmp)
        self.addCleanup(registry.kill)
        store = os.path.join(tmp, "registry", "store")
        stub = e2e.registry_stub(registry.addr)

        committed = {}  # (name, version) -> digest, from successful responses
        lock = threading.Lock()

        def push(name, data):
            response, error = led.call(
                stub.PushModel, rc.messages(rc.header(name, data), data), timeout=60)
            if error is None:
                with lock:
                    committed[(name, response.model.version)] = rc.digest(data)
            return response, error

        for i, name in enumerate(["alpha", "alpha", "alpha", "beta", "beta"]):
            self.assertIsNotNone(push(name, rc.random_bytes(300_000 + i, i))[0])
        aliases = {("alpha", "production"): 2, ("alpha", "staging"): 3,
                   ("beta", "production"): 1}
        for (name, alias), version in aliases.items():
            led.call(stub.SetAlias, registry_pb2.SetAliasRequest(
                name=name, alias=alias, version=version), timeout=10)

        # Pushes in flight at the moment of the crash: three held after 8 MiB
        # of 24 MiB, and a pusher that keeps committing small versions.
        held = []
        for i in range(3):
            data = rc.random_bytes(24 << 20, 100 + i)
            held.append(rc.PushInBackground(registry.addr, rc.header(f"held{i}", data), data,
                                            upto=8 << 20))
        for h in held:
            self.assertTrue(h.reached.wait(60))
        stop = threading.Event()
        attempted = {}  # digest -> name, for pushes whose answer the crash may have eaten

        def pusher():
            n = 0
            while not stop.is_set():
                data = rc.random_bytes(200_000, 1000 + n)
                attempted[rc.digest(data)] = "alpha"
                push("alpha", data)
                n += 1
        thread = threading.Thread(target=pusher, daemon=True)
        thread.start()
        time.sleep(1.0)
        registry.kill()
        stop.set()
        thread.join(30)
        for h in held:
            h.release()
            led.record(h.error.code() if h.error else e2e.OK)
            self.assertIsNotNone(h.error, "a held push succeeded across the crash")
            self.assertEqual(h.error.code(), grpc.StatusCode.UNAVAILABLE)
        before_crash = len(committed)
        self.assertGreater(before_crash, 5, "the pusher committed nothing before the crash")
        self.assertTrue(rc.staged_files(store), "expected the crash to leave staged bytes")

        registry.start()
        stub = e2e.registry_stub(registry.addr)
        # Every committed version is there and its bytes verify.
        for (name, version), digest in sorted(committed.items()):
            verify_version(self, led, stub, name, version, digest)
        # Aliases are where they were.
        for (name, alias), version in aliases.items():
            got, error = led.call(stub.GetModel,
                                  registry_pb2.GetModelRequest(ref=f"{name}@{alias}"),
                                  timeout=10)
            if error is not None or got.version != version:
                led.lose(f"alias {name}@{alias}: {error or got.version}")
        # Nothing half-written is visible: the held pushes made no version,
        # and every listed version is one that was pushed and reads back whole.
        listed = led.call(stub.ListModels, registry_pb2.ListModelsRequest(), timeout=10)[0]
        self.assertEqual(sorted(m.name for m in listed.models), ["alpha", "beta"])
        for name in ("alpha", "beta"):
            versions = led.call(stub.ListVersions, registry_pb2.ListVersionsRequest(
                name=name, page_size=1000), timeout=10)[0].versions
            for v in versions:
                digest = v.components[0].digest
                if (name, v.version) not in committed:
                    # Committed by the crash's last push, whose answer was lost:
                    # acceptable only if it is whole.
                    self.assertIn(digest, attempted, f"{name}:{v.version} was never pushed")
                    self.assertTrue(verify_version(self, led, stub, name, v.version, digest))
                    committed[(name, v.version)] = digest
        for i in range(3):
            e2e.expect_code(self, led, grpc.StatusCode.NOT_FOUND, stub.GetModel,
                            registry_pb2.GetModelRequest(ref=f"held{i}"), timeout=10,
                            what=f"held{i}")
        # The next push takes the next number and overwrites nothing.
        top = max(v for (n, v) in committed if n == "alpha")
        response, error = push("alpha", rc.random_bytes(1000, 9999))
        self.assertIsNone(error)
        self.assertEqual(response.model.version, top + 1)
        verify_version(self, led, stub, "alpha", top, committed[("alpha", top)])
        led.note("versions committed before the crash", before_crash)
        self.assertEqual(led.lost, [])


class TrainerCrashTest(unittest.TestCase):
    def test_trainer_kill_9_during_an_epoch(self):
        led = e2e.ledger(self)
        tmp = tempfile.mkdtemp(prefix="kennel-e2e-crash-trainer-")
        root = e2e.data_root(tmp, per_class=10)
        registry, trainer = tf.start_servers(tmp, root)
        self.addCleanup(registry.kill)
        self.addCleanup(trainer.kill)
        stub = e2e.trainer_stub(trainer.addr)
        reg = e2e.registry_stub(registry.addr)

        # A finished job whose model must survive.
        events, error = led.stream(stub.Train, tf.train_request(
            register_as="fm", aliases=["production"], epochs=2), timeout=300)
        self.assertIsNone(error)
        self.assertTrue(events[-1].HasField("completed"), events[-1])
        done_id = events[0].job_id
        first = led.call(reg.GetModel, registry_pb2.GetModelRequest(ref="fm@production"),
                         timeout=10)[0]
        self.assertEqual(first.version, 1)

        # A long fine-tuning job, killed once its first epoch has ended.
        call = stub.Train(tf.train_request(mode="finetune", epochs=500, lr=0.003,
                                           register_as="fm", aliases=["production"]),
                          timeout=300)
        seen = []
        for event in call:
            seen.append(event)
            if event.HasField("epoch"):
                break
        job_id = seen[0].job_id
        running = led.call(stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id),
                           timeout=10)[0]
        self.assertEqual(running.state, trainer_pb2.JOB_STATE_RUNNING)
        trainer.kill()
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            led.record(e.code())
            self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE)

        trainer.start(timeout=60)
        stub = e2e.trainer_stub(trainer.addr)
        job = led.call(stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)[0]
        if job.state != trainer_pb2.JOB_STATE_FAILED:
            led.lose(f"job {job_id} is {trainer_pb2.JobState.Name(job.state)} after the crash")
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_FAILED)
        self.assertIn("stopped while this job was running", job.message)
        self.assertIn("Start it again", job.message)
        self.assertEqual(job.model_ref, "")
        # Its history replays, the epoch it finished included, and ends failed.
        replay, error = led.stream(stub.WatchJob, trainer_pb2.WatchJobRequest(job_id=job_id),
                                   timeout=30)
        self.assertIsNone(error)
        kinds = [e.WhichOneof("event") for e in replay]
        self.assertIn("started", kinds)
        self.assertGreaterEqual(kinds.count("epoch"), 1)
        self.assertEqual(kinds[-1], "failed")
        self.assertEqual(replay[-1].failed.code, grpc.StatusCode.ABORTED.value[0])
        # The finished job and its model are intact; the crash registered nothing.
        jobs = {j.id: j for j in led.call(stub.ListJobs, trainer_pb2.ListJobsRequest(limit=100),
                                          timeout=10)[0].jobs}
        self.assertEqual(set(jobs), {done_id, job_id})
        self.assertEqual(jobs[done_id].state, trainer_pb2.JOB_STATE_SUCCEEDED)
        self.assertEqual(jobs[done_id].model_ref, "fm:1")
        versions = led.call(reg.ListVersions, registry_pb2.ListVersionsRequest(name="fm"),
                            timeout=10)[0].versions
        self.assertEqual([v.version for v in versions], [1])
        verify_version(self, led, reg, "fm", 1, first.components[0].digest)
        production = led.call(reg.GetModel, registry_pb2.GetModelRequest(ref="fm@production"),
                              timeout=10)[0]
        self.assertEqual(production.version, 1)
        # The restarted trainer takes new work.
        events, error = led.stream(stub.Train, tf.train_request(register_as="fm", epochs=1),
                                   timeout=300)
        self.assertIsNone(error)
        self.assertEqual(events[-1].completed.model_ref, "fm:2")
        led.checked()
        self.assertEqual(led.lost, [])


class InferenceCrashTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-e2e-crash-inference-")
        # v1 is tiny; v2 and v3 are ResNet18s, big enough (45 MB) that a swap
        # takes a second to download, verify, load and warm up.
        made = e2e.models(v1={}, v2=dict(size=64, kind="resnet18", seed=2),
                          v3=dict(size=64, kind="resnet18", seed=3))
        cls.models = [made["v1"], made["v2"], made["v3"]]

    def classify_loop(self, led, addr, stop, answers):
        stub = e2e.classifier_stub(addr)
        image = e2e.image_bytes()
        while not stop.is_set():
            response, error = led.call(stub.Classify,
                                       inference_pb2.ClassifyRequest(image=image), timeout=10)
            answers.append((response.model_version, response.model_digest) if response
                           else error.code())

    def test_inference_kill_9_during_a_model_swap(self):
        led = e2e.ledger(self)
        registry = e2e.start_registry(self.tmp)
        self.addCleanup(registry.kill)
        digests = [rc.file_digest(p) for p in self.models]
        e2e.push_model(registry.addr, "m", self.models[0], "--alias", "production")
        for p in self.models[1:]:
            e2e.push_model(registry.addr, "m", p, size=64)
        inference = e2e.start_inference(self.tmp, registry.addr, "m@production")
        self.addCleanup(inference.kill)
        cache = os.path.join(self.tmp, "inference", "cache")
        e2e.wait_serving(inference.addr, 1)

        # Two swaps, each cut by kill -9: one as the download starts, one
        # while the new version loads and warms up (v2 and v3 have the same
        # architecture, so v2's load time after the restart says when).
        serving = 1
        leftovers = set()
        delay = 0.0
        for target in (2, 3):
            stop = threading.Event()
            answers = []
            client = threading.Thread(target=self.classify_loop,
                                      args=(led, inference.addr, stop, answers), daemon=True)
            client.start()
            time.sleep(0.3)
            kt.kennel("models", "alias", "m", "production", target, addr=registry.addr,
                      check=True)
            inference.wait_for_log(f"downloading m:{target} ", timeout=30)
            time.sleep(delay)
            stop.set()
            inference.kill()
            client.join(15)
            self.assertNotIn(f"serving m:{target} ", inference.log(),
                             "the swap finished before the kill; nothing was cut")
            # Until the crash every answer came from the old version.
            ok = [a for a in answers if isinstance(a, tuple)]
            self.assertGreater(len(ok), 0)
            self.assertEqual(set(ok), {(serving, digests[serving - 1])})
            failed = [a for a in answers if not isinstance(a, tuple)]
            # Only the call the kill itself cut may fail.
            self.assertLessEqual(len(failed), 1, failed)
            # Whatever the cache holds under a digest's name is that digest.
            # (A download the crash cut stays under a temporary name.)
            for name in os.listdir(os.path.join(cache, "sha256")):
                path = os.path.join(cache, "sha256", name)
                if re.fullmatch(r"[0-9a-f]{64}", name):
                    self.assertEqual(rc.file_digest(path), "sha256:" + name,
                                     f"half-written cache file {name}")
                else:
                    leftovers.add(name)
            inference.start()
            status = e2e.wait_serving(inference.addr, target, timeout=60)
            self.assertEqual(status.model_digest, digests[target - 1])
            # The restart served the version that served before the crash
            # from the cache first, and removed what the cut download left.
            self.assertIn(f"loading m:{serving}, the last version of m@production that "
                          "served, from the cache", inference.log())
            self.assertEqual([n for n in os.listdir(os.path.join(cache, "sha256"))
                              if not re.fullmatch(r"[0-9a-f]{64}", n)], [])
            delay = 0.4 * status.load_seconds
            led.note(f"v{target} load after the restart (s)", round(status.load_seconds, 2))
            response = led.call(e2e.classifier_stub(inference.addr).Classify,
                                inference_pb2.ClassifyRequest(image=e2e.image_bytes()),
                                timeout=10)[0]
            self.assertEqual((response.model_version, response.model_digest),
                             (target, digests[target - 1]))
            led.checked()
            serving = target

        # A broken version does not replace the one that works.
        broken = os.path.join(self.tmp, "broken.pt")
        with open(broken, "wb") as f:
            f.write(b"PK\x03\x04 this is not a TorchScript archive")
        bad = e2e.push_model(registry.addr, "m", broken)
        kt.kennel("models", "alias", "m", "production", bad, addr=registry.addr, check=True)
        stub = e2e.classifier_stub(inference.addr)
        kt.wait_until(lambda: stub.GetModelStatus(inference_pb2.GetModelStatusRequest(),
                                                  timeout=5).last_failed_version == bad,
                      timeout=30, what="inference to try the broken version")
        status = stub.GetModelStatus(inference_pb2.GetModelStatusRequest(), timeout=5)
        self.assertTrue(status.ready)
        self.assertEqual(status.model_version, serving)
        self.assertIn("TorchScript", status.last_error)
        response = led.call(stub.Classify, inference_pb2.ClassifyRequest(
            image=e2e.image_bytes()), timeout=10)[0]
        self.assertEqual(response.model_version, serving)
        led.checked()

        # A crash while the alias points at the broken version: the restart
        # serves the last good model and reports why not the alias's.
        inference.kill()
        inference.start()
        stub = e2e.classifier_stub(inference.addr)
        kt.wait_until(lambda: stub.GetModelStatus(inference_pb2.GetModelStatusRequest(),
                                                  timeout=5).last_failed_version == bad,
                      timeout=60, what="the restarted inference to try the broken version")
        status = stub.GetModelStatus(inference_pb2.GetModelStatusRequest(), timeout=5)
        if not status.ready or status.model_version != serving:
            led.lose(f"after a restart on a broken alias inference serves "
                     f"{status.model_version if status.ready else 'nothing'}, not v{serving}")
        self.assertTrue(status.ready)
        self.assertEqual((status.model_version, status.model_digest),
                         (serving, digests[serving - 1]))
        self.assertIn("TorchScript", status.last_error)
        self.assertIn(f"m:{bad} was not loaded; m:{serving} keeps serving", inference.log())
        response = led.call(stub.Classify, inference_pb2.ClassifyRequest(
            image=e2e.image_bytes()), timeout=10)[0]
        self.assertEqual((response.model_version, response.model_digest),
                         (serving, digests[serving - 1]))
        led.checked()
        led.note("inference restarts", 3)
        led.note("temporary files the crashes left in the blob cache", len(leftovers))


if __name__ == "__main__":
    e2e.main()
