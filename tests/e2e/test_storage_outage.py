"""Storage outage: the registry on a real S3 server (a throwaway Ceph
radosgw, tests/s3/), inference following it, clients on both, and then the
S3 gateway goes away while the traffic runs.

- Gateway killed (connections refused): every registry call answers
  UNAVAILABLE, naming S3, well within its deadline; a push made during the
  outage leaves no version.
- Gateway frozen (SIGSTOP: connections hang): calls end in UNAVAILABLE
  just before their deadline (10 s), naming S3, rather than hanging until
  the caller gives up with DEADLINE_EXCEEDED; a call with a 30 s deadline
  ends in UNAVAILABLE too; how long each call took is reported.
- Inference keeps answering from the model it loaded, without an error,
  through both.
- When S3 is back the registry serves again and inference follows a new
  version, neither restarted; every version committed before is intact.
"""

import os
import subprocess
import tempfile
import threading
import time
import unittest

import e2e_lib as e2e
from e2e_lib import kt, rc

import grpc
from kennel.v1 import inference_pb2, registry_pb2

import test_registry_s3_suite as s3suite

DEADLINE = 10  # seconds, for every registry call while S3 is down


class StorageOutageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-e2e-s3-")
        cls.s3 = s3suite.RadosGateway(cls.tmp)
        started = time.time()
        cls.s3.start()
        cls.s3_start_seconds = time.time() - started

    @classmethod
    def tearDownClass(cls):
        kt.Service.stop_all()
        cls.s3.stop()

    def pause_gateway(self, signal_name):
        subprocess.run([os.path.join(self.s3.SCRIPTS, "rgw-stop.sh"), self.s3.dir],
                       env=dict(os.environ, SIGNAL=signal_name), check=True, timeout=30)

    def test_s3_outage_during_traffic(self):
        led = e2e.ledger(self)
        led.note("radosgw start-up seconds", round(self.s3_start_seconds, 1))
        made = e2e.models(m1=dict(seed=1), m2=dict(seed=2))
        models = [made["m1"], made["m2"]]
        digests = [rc.file_digest(p) for p in models]
        workdir = os.path.join(self.tmp, "registry")
        os.makedirs(workdir)
        registry = kt.Service("registry", f"--storage=s3://{s3suite.BUCKET}/e2e",
                              f"--s3-endpoint={self.s3.endpoint}", "--s3-path-style",
                              f"--spool-dir={workdir}", workdir=workdir,
                              env=self.s3.env()).start()
        reg = e2e.registry_stub(registry.addr)
        self.assertEqual(e2e.push_model(registry.addr, "m", models[0], "--alias",
                                        "production"), 1)
        other = rc.random_bytes(300_000, 7)
        response, error = led.call(reg.PushModel, rc.messages(rc.header("other", other), other),
                                   timeout=30)
        self.assertIsNone(error)
        committed = {("m", 1): digests[0], ("other", 1): rc.digest(other)}

        inference = e2e.start_inference(self.tmp, registry.addr, "m@production")
        e2e.wait_serving(inference.addr, 1)
        pids = (registry.proc.pid, inference.proc.pid)

        # Traffic: two classifying clients, one registry reader.
        phase = ["up"]
        stop = threading.Event()
        answers = []  # (phase, version or code)
        reads = []  # (phase, code, seconds, details)

        def classify():
            stub = e2e.classifier_stub(inference.addr)
            image = e2e.image_bytes()
            while not stop.is_set():
                r, err = led.call(stub.Classify, inference_pb2.ClassifyRequest(image=image),
                                  timeout=10)
                answers.append((phase[0], r.model_version if r else err.code()))
                time.sleep(0.01)

        def read():
            n = 0
            while not stop.is_set():
                p = phase[0]
                started = time.time()
                if n % 2:
                    r, err = led.call(reg.ListModels, registry_pb2.ListModelsRequest(),
                                      timeout=DEADLINE)
                else:
                    r, err = led.call(reg.GetModel,
                                      registry_pb2.GetModelRequest(ref="m@production"),
                                      timeout=DEADLINE)
                # A call that spans two phases counts in the later one.
                p = phase[0]
                reads.append((p, err.code() if err else grpc.StatusCode.OK,
                              time.time() - started, err.details() if err else ""))
                n += 1
                time.sleep(0.1)

        threads = [threading.Thread(target=f, daemon=True) for f in (classify, classify, read)]
        for t in threads:
            t.start()
        time.sleep(1.0)

        # Outage 1: the gateway is killed.
        phase[0] = "going down"
        self.s3.outage()
        phase[0] = "down"
        down_calls = [
            ("PushModel", lambda: reg.PushModel(
                rc.messages(rc.header("m", rc.random_bytes(100_000, 9)),
                            rc.random_bytes(100_000, 9)), timeout=DEADLINE)),
            ("SetAlias", lambda: reg.SetAlias(registry_pb2.SetAliasRequest(
                name="m", alias="staging", version=1), timeout=DEADLINE)),
            ("DeleteAlias", lambda: reg.DeleteAlias(registry_pb2.DeleteAliasRequest(
                name="m", alias="production"), timeout=DEADLINE)),
            ("HasBlobs", lambda: reg.HasBlobs(registry_pb2.HasBlobsRequest(
                digests=[digests[0]]), timeout=DEADLINE)),
            ("ListVersions", lambda: reg.ListVersions(registry_pb2.ListVersionsRequest(
                name="m"), timeout=DEADLINE)),
            ("PullModel", lambda: list(reg.PullModel(registry_pb2.PullModelRequest(
                ref="m:1"), timeout=DEADLINE))),
        ]
        slowest = 0
        for what, fn in down_calls:
            started = time.time()
            err = e2e.expect_code(self, led, grpc.StatusCode.UNAVAILABLE, fn, what=what)
            elapsed = time.time() - started
            slowest = max(slowest, elapsed)
            self.assertIn("S3", err.details(), what)
            self.assertLess(elapsed, DEADLINE - 1, what)
        time.sleep(2)
        led.note("slowest UNAVAILABLE with S3 down (s)", round(slowest, 2))

        phase[0] = "coming back"
        self.s3.recover()
        recovered = time.time()
        phase[0] = "recovering"
        kt.wait_until(lambda: reads and reads[-1][0] == "recovering"
                      and reads[-1][1] == grpc.StatusCode.OK,
                      timeout=30, interval=0.05, what="the registry to read from S3 again")
        led.note("registry serving again after S3 returned (s)", round(time.time() - recovered, 2))
        phase[0] = "up again"
        time.sleep(1)

        # Outage 2: the gateway freezes; connections open but nothing answers.
        phase[0] = "freezing"
        self.pause_gateway("STOP")
        phase[0] = "frozen"
        frozen = {}

        def frozen_call(what, fn, deadline):
            started = time.time()
            r, err = led.call(fn, timeout=deadline)
            frozen[what] = (err.code() if err else grpc.StatusCode.OK, time.time() - started,
                            err.details() if err else "")
        frozen_threads = [
            threading.Thread(target=frozen_call, args=(
                "GetModel", lambda timeout: reg.GetModel(
                    registry_pb2.GetModelRequest(ref="m:1"), timeout=timeout), 30)),
            threading.Thread(target=frozen_call, args=(
                "GetModel in 10 s", lambda timeout: reg.GetModel(
                    registry_pb2.GetModelRequest(ref="m:1"), timeout=timeout), DEADLINE)),
            threading.Thread(target=frozen_call, args=(
                "HasBlobs in 10 s", lambda timeout: reg.HasBlobs(
                    registry_pb2.HasBlobsRequest(digests=[digests[1]]), timeout=timeout),
                DEADLINE)),
            threading.Thread(target=frozen_call, args=(
                "SetAlias", lambda timeout: reg.SetAlias(registry_pb2.SetAliasRequest(
                    name="m", alias="frozen", version=1), timeout=timeout), 30)),
        ]
        for t in frozen_threads:
            t.start()
        for t in frozen_threads:
            t.join(40)
        phase[0] = "thawing"
        self.pause_gateway("CONT")
        phase[0] = "thawed"
        for what, (code, seconds, _) in frozen.items():
            led.note(f"{what} with S3 frozen" + ("" if "10 s" in what else " (30 s deadline)"),
                     f"{code.name} after {seconds:.1f} s")
        self.assertEqual(frozen["GetModel"][0], grpc.StatusCode.UNAVAILABLE)
        # The registry stops waiting for S3 before the caller's deadline and
        # says why, instead of leaving the caller a bare DEADLINE_EXCEEDED.
        for what in ("GetModel in 10 s", "HasBlobs in 10 s"):
            code, seconds, details = frozen[what]
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, (what, details))
            self.assertIn("S3 did not answer within the deadline", details, what)
            self.assertLess(seconds, DEADLINE, what)
        kt.wait_until(lambda: reg.GetModel(registry_pb2.GetModelRequest(ref="m@production"),
                                           timeout=5), timeout=30,
                      what="the registry to read from S3 after the freeze")

        # A new version reaches inference without a restart of anything.
        self.assertEqual(e2e.push_model(registry.addr, "m", models[1]), 2)
        committed[("m", 2)] = digests[1]
        kt.kennel("models", "alias", "m", "production", "2", addr=registry.addr, check=True)
        phase[0] = "v2"
        e2e.wait_serving(inference.addr, 2, timeout=60)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        self.assertEqual((registry.proc.pid, inference.proc.pid), pids)
        self.assertIsNone(registry.proc.poll())
        self.assertIsNone(inference.proc.poll())

        # Inference answered every request, from v1 until the alias moved.
        failed = [a for a in answers if not isinstance(a[1], int)]
        self.assertEqual(failed, [], "inference failed requests during the outage")
        served = {}
        for p, v in answers:
            served.setdefault(p, set()).add(v)
        for p in served:
            if p != "v2":
                self.assertEqual(served[p], {1}, p)
        self.assertIn(2, served["v2"])
        self.assertTrue(served.get("down") and served.get("frozen"),
                        "no request ran during the outages")
        led.note("classify answers during the outages",
                 sum(1 for p, _ in answers if p in ("down", "frozen")))

        # The reader saw UNAVAILABLE while S3 was down or frozen, each within
        # its 10 s deadline, and only OK while it was up.
        unavailable_or_ok = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        for p, c, s, details in reads:
            if p in ("up", "up again", "v2"):
                self.assertEqual(c, grpc.StatusCode.OK, (p, details))
            else:
                self.assertIn(c, unavailable_or_ok, (p, details))
                self.assertLess(s, DEADLINE, (p, details))
        led.note("reader calls with S3 frozen (10 s deadline)", ", ".join(
            f"{c.name} after {s:.1f} s" for p, c, s, _ in reads if p == "frozen"))
        down = [r for r in reads if r[0] == "down"]
        self.assertTrue(down)
        self.assertTrue(all(c == grpc.StatusCode.UNAVAILABLE for _, c, _, _ in down), down)
        self.assertLess(max(s for _, _, s, _ in down), DEADLINE - 1)
        self.assertTrue(all(c == grpc.StatusCode.OK for p, c, _, _ in reads
                            if p in ("up", "up again", "v2")))

        # Every committed version is whole; the outage added none.
        for name in ("m", "other"):
            versions = led.call(reg.ListVersions, registry_pb2.ListVersionsRequest(name=name),
                                timeout=10)[0].versions
            self.assertEqual(sorted(v.version for v in versions),
                             sorted(v for (n, v) in committed if n == name))
        for (name, version), digest in committed.items():
            messages, error = led.stream(reg.PullModel, registry_pb2.PullModelRequest(
                ref=f"{name}:{version}"), timeout=30)
            data = b"".join(m.chunk.data for m in messages[1:])
            if error is not None or rc.digest(data) != digest:
                led.lose(f"{name}:{version}")
            else:
                led.checked()
        production = led.call(reg.GetModel, registry_pb2.GetModelRequest(ref="m@production"),
                              timeout=10)[0]
        self.assertEqual(production.version, 2)
        self.assertEqual(led.lost, [])


if __name__ == "__main__":
    e2e.main()
