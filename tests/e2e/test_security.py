"""Security: bearer tokens and TLS on all three services.

- With --token-file, every mutating RPC of every service (registry:
  PushModel, SetAlias, DeleteAlias, DeleteVersion, GarbageCollect; trainer:
  Train, Tune, CancelJob) is UNAUTHENTICATED without the token, with a
  wrong one, a prefix of it, another scheme or another header, and nothing
  is stored or started; with the token each succeeds. Reads stay open, and
  inference (which has no mutating RPC) keeps classifying.
- With TLS, a plaintext client (grpcio and the CLI) cannot connect to any
  service; a client that trusts the CA can, the trainer registers a model
  in a TLS registry, inference follows it there, and the token is still
  required over TLS.
"""

import os
import subprocess
import tempfile
import unittest

import e2e_lib as e2e
from e2e_lib import kt, rc

import grpc
from grpc_std import health_pb2, health_pb2_grpc
from kennel.v1 import inference_pb2, registry_pb2, trainer_pb2

import trainer_fixtures as tf

C = grpc.StatusCode
TOKEN = "kennel-e2e-s3cret-7f1c"
BAD_CREDENTIALS = {
    "no token": None,
    "wrong token": (("authorization", "Bearer not-the-token"),),
    "empty bearer": (("authorization", "Bearer "),),
    "a prefix of the token": (("authorization", "Bearer " + TOKEN[:-1]),),
    "the token and more": (("authorization", "Bearer " + TOKEN + "x"),),
    "basic scheme": (("authorization", "Basic " + TOKEN),),
    "token without scheme": (("authorization", TOKEN),),
    "another header": (("x-api-key", TOKEN),),
}
GOOD = (("authorization", "Bearer " + TOKEN),)


def tree(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, path)] = os.path.getsize(p)
    return out


def tune_request():
    r = trainer_pb2.TuneRequest()
    r.spec.data, r.spec.backbone = "fm", "small_cnn.pt"
    r.base.learning_rate, r.base.batch_size, r.base.epochs = 0.01, 16, 1
    r.max_trials = 2
    p = r.space.add(name="learning_rate")
    p.continuous.min, p.continuous.max = 0.001, 0.1
    return r


class TokenTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-e2e-token-")
        cls.token_file = os.path.join(cls.tmp, "token")
        with open(cls.token_file, "w") as f:
            f.write(TOKEN + "\n")
        cls.root = e2e.data_root(cls.tmp, per_class=2)
        cls.registry = e2e.start_registry(cls.tmp, f"--token-file={cls.token_file}")
        # The trainer uses its own --token-file for the registry too.
        cls.trainer = kt.Service(
            "trainer", f"--data-root={cls.root}", f"--cache-dir={cls.tmp}/cache",
            f"--jobs-dir={cls.tmp}/jobs", f"--registry={cls.registry.addr}",
            f"--token-file={cls.token_file}", workdir=cls.tmp).start(timeout=60)
        cls.store = os.path.join(cls.tmp, "registry", "store")
        cls.model = e2e.models(m={})["m"]
        kt.kennel("models", "push", "m", "--file", cls.model, "--input-size", 32, "--resize", 32,
                  "--alias", "production", "--token-file", cls.token_file,
                  addr=cls.registry.addr, check=True)
        cls.inference = e2e.start_inference(cls.tmp, cls.registry.addr, "m@production",
                                            f"--token-file={cls.token_file}")
        e2e.wait_serving(cls.inference.addr, 1)

    @classmethod
    def tearDownClass(cls):
        # kill: a graceful stop waits seconds on the tests' idle connections.
        for s in (cls.inference, cls.trainer, cls.registry):
            s.kill()

    def refused_everywhere(self, led, what, call):
        """call(metadata) must be UNAUTHENTICATED for every bad credential."""
        for how, metadata in BAD_CREDENTIALS.items():
            with self.subTest(f"{what}, {how}"):
                e2e.expect_code(self, led, C.UNAUTHENTICATED, call, metadata,
                                what=f"{what} with {how}")

    def test_registry_mutations_need_the_token(self):
        led = e2e.ledger(self)
        reg = e2e.registry_stub(self.registry.addr)
        data = rc.random_bytes(3 << 20, 11)
        before = tree(self.store)
        calls = {
            "PushModel": lambda md: reg.PushModel(rc.messages(rc.header("m", data), data),
                                                  timeout=30, metadata=md),
            "SetAlias": lambda md: reg.SetAlias(registry_pb2.SetAliasRequest(
                name="m", alias="staging", version=1), timeout=10, metadata=md),
            "DeleteAlias": lambda md: reg.DeleteAlias(registry_pb2.DeleteAliasRequest(
                name="m", alias="production"), timeout=10, metadata=md),
            "DeleteVersion": lambda md: reg.DeleteVersion(registry_pb2.DeleteVersionRequest(
                name="m", version=1), timeout=10, metadata=md),
            "GarbageCollect": lambda md: reg.GarbageCollect(registry_pb2.GarbageCollectRequest(
                grace_seconds=0), timeout=10, metadata=md),
        }
        for what, call in calls.items():
            self.refused_everywhere(led, what, call)
        self.assertEqual(tree(self.store), before, "an unauthenticated call changed the store")
        self.assertEqual(rc.staged_files(self.store), [])
        # The CLI says so too, and exits 1.
        wrong = os.path.join(self.tmp, "wrong-token")
        with open(wrong, "w") as f:
            f.write("not-the-token\n")
        for extra in ([], ["--token-file", wrong]):
            result = kt.kennel("models", "alias", "m", "staging", "1", *extra,
                               addr=self.registry.addr)
            led.record(C.UNAUTHENTICATED if "UNAUTHENTICATED" in result.stderr else "CLI_OTHER")
            self.assertEqual(result.returncode, 1)
            self.assertIn("UNAUTHENTICATED", result.stderr)
        # Reads stay open.
        got = led.call(reg.GetModel, registry_pb2.GetModelRequest(ref="m@production"),
                       timeout=10)[0]
        self.assertEqual(got.version, 1)
        led.checked()
        self.assertIsNone(led.call(reg.ListModels, registry_pb2.ListModelsRequest(),
                                   timeout=10)[1])
        self.assertIsNone(led.call(reg.HasBlobs, registry_pb2.HasBlobsRequest(
            digests=[rc.digest(data)]), timeout=10)[1])
        # With the token, each one works.
        response = led.call(calls["PushModel"], GOOD)[0]
        self.assertEqual(response.model.version, 2)
        self.assertEqual(led.call(calls["SetAlias"], GOOD)[0].version, 1)
        self.assertIsNone(led.call(reg.DeleteAlias, registry_pb2.DeleteAliasRequest(
            name="m", alias="staging"), timeout=10, metadata=GOOD)[1])
        self.assertIsNone(led.call(reg.DeleteVersion, registry_pb2.DeleteVersionRequest(
            name="m", version=2), timeout=10, metadata=GOOD)[1])
        self.assertIsNone(led.call(calls["GarbageCollect"], GOOD)[1])
        # The version the sweep tried to delete and the alias it tried to
        # remove are still there.
        got = led.call(reg.GetModel, registry_pb2.GetModelRequest(ref="m@production"),
                       timeout=10)[0]
        self.assertEqual((got.version, got.components[0].digest), (1, rc.file_digest(self.model)))
        led.checked()

    def test_trainer_mutations_need_the_token(self):
        led = e2e.ledger(self)
        trn = e2e.trainer_stub(self.trainer.addr)
        jobs = lambda: [j.id for j in trn.ListJobs(trainer_pb2.ListJobsRequest(limit=1000),
                                                    timeout=10).jobs]
        # A finished job to try to cancel; the trainer registers it with its
        # token in the guarded registry.
        events, error = led.stream(trn.Train, tf.train_request(register_as="fm", epochs=1),
                                   timeout=300, metadata=GOOD)
        self.assertIsNone(error, error and error.details())
        self.assertEqual(events[-1].completed.model_ref, "fm:1")
        job_id = events[0].job_id
        before = jobs()
        calls = {
            "Train": lambda md: list(trn.Train(tf.train_request(epochs=1), timeout=60,
                                               metadata=md)),
            "Tune": lambda md: list(trn.Tune(tune_request(), timeout=60, metadata=md)),
            "CancelJob": lambda md: trn.CancelJob(trainer_pb2.CancelJobRequest(job_id=job_id),
                                                  timeout=10, metadata=md),
        }
        for what, call in calls.items():
            self.refused_everywhere(led, what, call)
        self.assertEqual(jobs(), before, "an unauthenticated call started a job")
        result = kt.kennel("train", "--data", "fm", "--backbone", "small_cnn.pt", "--epochs", 1,
                           addr=self.trainer.addr)
        led.record(C.UNAUTHENTICATED if "UNAUTHENTICATED" in result.stderr else "CLI_OTHER")
        self.assertEqual(result.returncode, 1)
        self.assertIn("UNAUTHENTICATED", result.stderr)
        # Reads stay open.
        job = led.call(trn.GetJob, trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)[0]
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_SUCCEEDED)
        replay, error = led.stream(trn.WatchJob, trainer_pb2.WatchJobRequest(job_id=job_id),
                                   timeout=30)
        self.assertIsNone(error)
        self.assertTrue(replay[-1].HasField("completed"))
        # With the token, CancelJob answers (the job has ended, so it is a no-op
        # or FAILED_PRECONDITION, never UNAUTHENTICATED).
        _, error = led.call(calls["CancelJob"], GOOD)
        if error is not None:
            self.assertNotEqual(error.code(), C.UNAUTHENTICATED)

    def test_inference_serves_without_the_token(self):
        """Classify changes nothing, so it needs no token; the token file
        does not lock readers out."""
        led = e2e.ledger(self)
        stub = e2e.classifier_stub(self.inference.addr)
        for metadata in (None, BAD_CREDENTIALS["wrong token"], GOOD):
            response, error = led.call(stub.Classify, inference_pb2.ClassifyRequest(
                image=e2e.image_bytes()), timeout=10, metadata=metadata)
            self.assertIsNone(error, error and error.details())
            self.assertEqual(response.model_version, 1)
        status = led.call(stub.GetModelStatus, inference_pb2.GetModelStatusRequest(),
                          timeout=10)[0]
        self.assertTrue(status.ready)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        kt.require("openssl", "the TLS checks make a throwaway certificate")
        cls.tmp = tempfile.mkdtemp(prefix="kennel-e2e-tls-")
        cls.cert = os.path.join(cls.tmp, "cert.pem")
        cls.key = os.path.join(cls.tmp, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", cls.key, "-out", cls.cert], check=True, capture_output=True, timeout=60)
        cls.token_file = os.path.join(cls.tmp, "token")
        with open(cls.token_file, "w") as f:
            f.write(TOKEN + "\n")
        tls = [f"--tls-cert={cls.cert}", f"--tls-key={cls.key}"]
        cls.root = e2e.data_root(cls.tmp, per_class=2)
        cls.model = e2e.models(m={})["m"]
        cls.registry = kt.Service("registry", f"--storage=file://{cls.tmp}/store",
                                  f"--token-file={cls.token_file}", *tls,
                                  workdir=cls.tmp, metrics=False).start()
        cls.trainer = kt.Service(
            "trainer", f"--data-root={cls.root}", f"--cache-dir={cls.tmp}/cache",
            f"--jobs-dir={cls.tmp}/jobs", f"--registry=localhost:{cls.registry.port}",
            f"--registry-tls-ca={cls.cert}", f"--token-file={cls.token_file}", *tls,
            workdir=cls.tmp, metrics=False).start(timeout=60)
        # kennel-inference has no flag for a TLS registry: it serves a file here.
        cls.inference = kt.Service("inference", f"--model-path={cls.model}", *tls,
                                   workdir=cls.tmp, metrics=False).start()
        cls.services = {"registry": cls.registry, "trainer": cls.trainer,
                        "inference": cls.inference}
        with open(cls.cert, "rb") as f:
            cls.creds = grpc.ssl_channel_credentials(root_certificates=f.read())

    @classmethod
    def tearDownClass(cls):
        for s in cls.services.values():
            s.kill()

    def secure(self, service):
        return grpc.secure_channel(f"localhost:{service.port}", self.creds)

    def test_plaintext_clients_cannot_connect(self):
        led = e2e.ledger(self)
        for kind, service in self.services.items():
            with self.subTest(kind):
                self.assertIn("(TLS)", service.log())
                health = health_pb2_grpc.HealthStub(kt.channel(service.addr))
                _, error = led.call(health.Check, health_pb2.HealthCheckRequest(), timeout=3)
                self.assertIsNotNone(error, f"{kind} answered a plaintext client")
                self.assertIn(error.code(), (C.UNAVAILABLE, C.DEADLINE_EXCEEDED))
                result = kt.kennel("health", "--timeout=3s", addr=service.addr)
                led.record("CLI_REFUSED" if result.returncode == 1 else e2e.OK)
                self.assertEqual(result.returncode, 1, result.stdout)
        # The service RPCs too, not only health.
        for fn, request in (
                (e2e.registry_stub(self.registry.addr).ListModels,
                 registry_pb2.ListModelsRequest()),
                (e2e.trainer_stub(self.trainer.addr).ListJobs, trainer_pb2.ListJobsRequest()),
                (e2e.classifier_stub(self.inference.addr).Classify,
                 inference_pb2.ClassifyRequest(image=e2e.image_bytes()))):
            _, error = led.call(fn, request, timeout=3)
            self.assertIsNotNone(error)
            self.assertIn(error.code(), (C.UNAVAILABLE, C.DEADLINE_EXCEEDED))
        for service in self.services.values():
            self.assertIsNone(service.proc.poll())

    def test_tls_clients_connect_and_the_token_still_counts(self):
        led = e2e.ledger(self)
        for kind, service in self.services.items():
            health = health_pb2_grpc.HealthStub(self.secure(service))
            kt.wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                          == health_pb2.HealthCheckResponse.SERVING, timeout=60,
                          what=f"{kind} to serve over TLS")
            led.record(e2e.OK)
            result = kt.kennel("health", f"--tls-ca={self.cert}",
                               addr=f"localhost:{service.port}")
            led.record(e2e.OK if result.returncode == 0 else "CLI_FAILED")
            self.assertEqual(result.returncode, 0, result.stderr)
        from kennel.v1 import inference_pb2_grpc, registry_pb2_grpc, trainer_pb2_grpc
        inf = inference_pb2_grpc.ClassifierStub(self.secure(self.inference))
        response, error = led.call(inf.Classify, inference_pb2.ClassifyRequest(
            image=e2e.image_bytes()), timeout=10)
        self.assertIsNone(error, error and error.details())
        self.assertEqual(len(response.predictions), 3)
        reg = registry_pb2_grpc.ModelRegistryStub(self.secure(self.registry))
        e2e.expect_code(self, led, C.UNAUTHENTICATED, reg.SetAlias, registry_pb2.SetAliasRequest(
            name="fm", alias="production", version=1), timeout=10, what="SetAlias over TLS")
        # The trainer trains and registers over TLS, with the token.
        trn = trainer_pb2_grpc.TrainerStub(self.secure(self.trainer))
        e2e.expect_code(self, led, C.UNAUTHENTICATED, lambda: list(trn.Train(
            tf.train_request(epochs=1), timeout=60)), what="Train over TLS")
        events, error = led.stream(trn.Train, tf.train_request(register_as="fm", epochs=1,
                                                               aliases=["production"]),
                                   timeout=300, metadata=GOOD)
        self.assertIsNone(error, error and error.details())
        self.assertEqual(events[-1].completed.model_ref, "fm:1", events[-1])
        got = led.call(reg.GetModel, registry_pb2.GetModelRequest(ref="fm@production"),
                       timeout=10)[0]
        self.assertEqual(got.version, 1)
        led.checked()
        # Inference follows it there, over TLS too, and serves it over TLS.
        follower = kt.Service(
            "inference", f"--registry=localhost:{self.registry.port}",
            f"--registry-tls-ca={self.cert}", "--model=fm@production",
            f"--cache-dir={self.tmp}/icache", f"--tls-cert={self.cert}",
            f"--tls-key={self.key}", workdir=self.tmp, metrics=False).start()
        self.addCleanup(follower.kill)
        stub = inference_pb2_grpc.ClassifierStub(self.secure(follower))
        status = kt.wait_until(lambda: (lambda s: s if s.ready else None)(
            stub.GetModelStatus(inference_pb2.GetModelStatusRequest(), timeout=5)),
            timeout=60, what="inference to load fm@production from the TLS registry")
        self.assertEqual((status.model_name, status.model_version), ("fm", 1))
        self.assertEqual(status.model_digest, got.components[0].digest)
        response, error = led.call(stub.Classify, inference_pb2.ClassifyRequest(
            image=e2e.image_bytes(28, 28, fmt="PNG")), timeout=10)
        self.assertIsNone(error, error and error.details())
        self.assertEqual(response.model_version, 1)
        led.checked()


if __name__ == "__main__":
    e2e.main()
