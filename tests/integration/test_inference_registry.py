"""kennel-inference following a real kennel-registry: push v1 and it serves;
push v2 and move the alias while 8 clients classify without pause: no
request fails and the answers switch to v2; point the alias at a broken v3
(wrong output width) and at a v4 that is not TorchScript: v2 keeps serving,
and the failures show in the status and the metrics. A restart finds the
model in the local cache and does not download it again. A restart while the
alias points at a broken version serves the last version that served (from
the cache, also while the registry is down), says so, and swaps to the next
good version; it never serves what another ref served."""
import io
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import kennel_testlib as kt  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kennel.v1 import inference_pb2 as pb  # noqa: E402
from kennel.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

V1_LABELS = ["a1", "b1", "c1"]
V2_LABELS = ["a2", "b2", "c2"]


def image_bytes(seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class RegistryFollowingTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-inference-registry-")
        cls.registry = kt.Service("registry", f"--storage=file://{cls.tmp}/store",
                                  workdir=cls.tmp, metrics=False).start()
        cls.cache = os.path.join(cls.tmp, "cache")

    @classmethod
    def tearDownClass(cls):
        cls.registry.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def push(self, path, labels, *extra):
        labels_path = path + ".labels"
        with open(labels_path, "w") as f:
            f.write("\n".join(labels) + "\n")
        out = kt.kennel("models", "push", "pets", "--file", path, "--labels", labels_path,
                        "--input-size", "32", "--resize", "36", *extra,
                        addr=self.registry.addr, check=True)
        return int(re.search(r"pets:(\d+)", out.stdout).group(1))

    def alias(self, version):
        kt.kennel("models", "alias", "pets", "production", version,
                  addr=self.registry.addr, check=True)

    def status(self, stub):
        return stub.GetModelStatus(pb.GetModelStatusRequest(), timeout=10)

    def test_a_model_the_registry_does_not_have_is_named_as_the_reason(self):
        inference = kt.Service("inference", f"--registry={self.registry.addr}",
                               "--model=nosuch@production",
                               f"--cache-dir={tempfile.mkdtemp(dir=self.tmp)}",
                               workdir=tempfile.mkdtemp(dir=self.tmp)).start()
        self.addCleanup(inference.stop)
        stub = pb_grpc.ClassifierStub(kt.channel(inference.addr))

        def details():
            try:
                stub.Classify(pb.ClassifyRequest(image=image_bytes(1)), timeout=10)
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE)
                return e.details()
            self.fail("a classification was answered without a model")

        kt.wait_until(lambda: "has no version of nosuch@production" in details(),
                      timeout=30, what="the reason to reach the answer")

    def test_follow_swap_under_load_and_refuse_broken_versions(self):
        v1 = self.push(kt.export_test_model(os.path.join(self.tmp, "v1.pt"), 3, seed=1),
                       V1_LABELS, "--alias", "production")
        self.assertEqual(v1, 1)
        server = kt.Service("inference", f"--registry={self.registry.addr}",
                            "--model=pets@production", f"--cache-dir={self.cache}",
                            "--precision=fp32", "--max-batch-size=8",
                            "--max-queue=256", workdir=self.tmp).start()
        self.addCleanup(server.stop)
        stub = pb_grpc.ClassifierStub(kt.channel(server.addr))
        kt.wait_until(lambda: self.status(stub).ready, timeout=60, what="v1 to load")
        status = self.status(stub)
        self.assertEqual((status.model_name, status.model_version), ("pets", 1))
        self.assertEqual(status.source, "pets@production")
        self.assertEqual(list(status.labels), V1_LABELS)
        first = stub.Classify(pb.ClassifyRequest(image=image_bytes(0)), timeout=30)
        self.assertEqual(first.model_version, 1)
        self.assertIn(first.predictions[0].label, V1_LABELS)

        # Eight clients classify without pause while v2 is pushed and the
        # alias moves.
        stop = threading.Event()
        lock = threading.Lock()
        failures, versions = [], [[] for _ in range(8)]

        def client(i):
            data = image_bytes(i)
            local = pb_grpc.ClassifierStub(kt.channel(server.addr))
            while not stop.is_set():
                try:
                    r = local.Classify(pb.ClassifyRequest(image=data), timeout=30)
                except grpc.RpcError as e:
                    with lock:
                        failures.append(f"{e.code()}: {e.details()}")
                    continue
                labels = V1_LABELS if r.model_version == 1 else V2_LABELS
                if r.predictions[0].label not in labels:
                    with lock:
                        failures.append(f"v{r.model_version} answered "
                                        f"{r.predictions[0].label}")
                versions[i].append(r.model_version)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            v2 = self.push(kt.export_test_model(os.path.join(self.tmp, "v2.pt"), 3,
                                                seed=2), V2_LABELS)
            self.assertEqual(v2, 2)
            self.alias(2)
            kt.wait_until(lambda: all(v and v[-1] == 2 for v in versions), timeout=60,
                          what="every client to be answered by v2")
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        self.assertEqual(failures, [])
        for i, seen in enumerate(versions):
            self.assertIn(1, seen, f"client {i} never saw v1")
            # Once a client is answered by v2 it is never answered by v1.
            switch = seen.index(2)
            self.assertEqual(set(seen[switch:]), {2}, f"client {i}: {seen}")
        self.assertEqual(self.status(stub).model_version, 2)

        # v3: four outputs for three labels. v4: not TorchScript at all.
        v3 = self.push(kt.export_test_model(os.path.join(self.tmp, "v3.pt"), 4, seed=3),
                       ["x", "y", "z"])
        self.alias(v3)
        kt.wait_until(lambda: self.status(stub).last_failed_version == v3, timeout=60,
                      what="v3 to be refused")
        self.assertIn("labels", self.status(stub).last_error)
        garbage = os.path.join(self.tmp, "v4.pt")
        with open(garbage, "wb") as f:
            f.write(b"PK\x03\x04 certainly not a TorchScript archive")
        v4 = self.push(garbage, V2_LABELS)
        self.alias(v4)
        kt.wait_until(lambda: self.status(stub).last_failed_version == v4, timeout=60,
                      what="v4 to be refused")
        status = self.status(stub)
        self.assertTrue(status.ready)
        self.assertEqual(status.model_version, 2)
        after = stub.Classify(pb.ClassifyRequest(image=image_bytes(0)), timeout=30)
        self.assertEqual(after.model_version, 2)
        metrics = server.scrape()
        self.assertIn('kennel_inference_model_loads_total{result="failure"} 2', metrics)
        self.assertIn('kennel_inference_model_loads_total{result="success"} 2', metrics)
        self.assertIn('kennel_inference_model_ready 1', metrics)
        self.assertRegex(metrics, r'kennel_inference_model_info\{[^}]*version="2"[^}]*\} 1')

        # Back to v2 and restart: the model comes from the local cache.
        self.alias(2)
        server.stop()
        self.assertIn("downloading pets:2", server.log())
        restarted = kt.Service("inference", f"--registry={self.registry.addr}",
                               "--model=pets@production", f"--cache-dir={self.cache}",
                               "--precision=fp32", workdir=tempfile.mkdtemp(dir=self.tmp))
        restarted.start()
        self.addCleanup(restarted.stop)
        stub = pb_grpc.ClassifierStub(kt.channel(restarted.addr))
        kt.wait_until(lambda: self.status(stub).ready, timeout=60, what="restart")
        self.assertEqual(self.status(stub).model_version, 2)
        self.assertNotIn("downloading", restarted.log())

    def test_registry_outage_keeps_serving_and_reconnects(self):
        registry = kt.Service("registry", f"--storage=file://{self.tmp}/store2",
                              workdir=tempfile.mkdtemp(dir=self.tmp), metrics=False,
                              listen=f"127.0.0.1:{kt.free_port()}").start()
        self.addCleanup(registry.kill)
        path = kt.export_test_model(os.path.join(self.tmp, "o1.pt"), 3, seed=4)
        labels = path + ".labels"
        with open(labels, "w") as f:
            f.write("p\nq\nr\n")
        kt.kennel("models", "push", "outage", "--file", path, "--labels", labels,
                  "--input-size", "32", addr=registry.addr, check=True)
        server = kt.Service("inference", f"--registry={registry.addr}", "--model=outage",
                            f"--cache-dir={self.cache}", "--precision=fp32",
                            workdir=tempfile.mkdtemp(dir=self.tmp)).start()
        self.addCleanup(server.stop)
        stub = pb_grpc.ClassifierStub(kt.channel(server.addr))
        kt.wait_until(lambda: self.status(stub).ready, timeout=60, what="load")
        registry.kill()
        for _ in range(5):
            r = stub.Classify(pb.ClassifyRequest(image=image_bytes(1)), timeout=30)
            self.assertEqual(r.model_version, 1)
        server.wait_for_log(r"watch of outage .* ended", timeout=30)
        # The registry returns on the same port; a new version is followed.
        registry.start()
        path2 = kt.export_test_model(os.path.join(self.tmp, "o2.pt"), 3, seed=5)
        kt.kennel("models", "push", "outage", "--file", path2, "--labels", labels,
                  "--input-size", "32", addr=registry.addr, check=True)
        kt.wait_until(lambda: self.status(stub).model_version == 2, timeout=60,
                      what="the new version after the registry came back")


    def test_restart_serves_the_last_good_version(self):
        tmp = tempfile.mkdtemp(dir=self.tmp)
        registry = kt.Service("registry", f"--storage=file://{tmp}/store", workdir=tmp,
                              metrics=False, listen=f"127.0.0.1:{kt.free_port()}").start()
        self.addCleanup(registry.kill)
        cache = os.path.join(tmp, "cache")
        labels = os.path.join(tmp, "labels")
        with open(labels, "w") as f:
            f.write("\n".join(V1_LABELS) + "\n")

        def push(path, *extra):
            out = kt.kennel("models", "push", "lg", "--file", path, "--labels", labels,
                            "--input-size", "32", "--json", *extra, addr=registry.addr,
                            check=True)
            return int(re.search(r'"version": *"?(\d+)', out.stdout).group(1))

        def alias(version):
            kt.kennel("models", "alias", "lg", "production", version, addr=registry.addr,
                      check=True)

        inference = kt.Service("inference", f"--registry={registry.addr}",
                               "--model=lg@production", f"--cache-dir={cache}",
                               "--precision=fp32", "--tune-batch-size=false",
                               workdir=tmp)
        self.addCleanup(inference.kill)

        def classify():
            stub = pb_grpc.ClassifierStub(kt.channel(inference.addr))
            return stub.Classify(pb.ClassifyRequest(image=image_bytes(3)), timeout=30)

        def status():
            return self.status(pb_grpc.ClassifierStub(kt.channel(inference.addr)))

        good1 = push(kt.export_test_model(os.path.join(tmp, "g1.pt"), 3, seed=11),
                     "--alias", "production")
        inference.start()
        kt.wait_until(lambda: status().ready, timeout=60, what="v1 to load")
        self.assertEqual(classify().model_version, good1)
        inference.stop()
        self.assertTrue(os.path.exists(os.path.join(cache, "last-good", "lg@production.json")))

        # While it is down the alias moves to a version with four outputs for
        # three labels, and a crash has left half a download in the cache.
        broken = push(kt.export_test_model(os.path.join(tmp, "b2.pt"), 4, seed=12))
        alias(broken)
        stale = os.path.join(cache, "sha256", "ab" * 32 + ".tmp-Xy12Zw")
        with open(stale, "wb") as f:
            f.write(b"half a model")
        inference.start()
        kt.wait_until(lambda: status().last_failed_version == broken, timeout=60,
                      what="the broken version to be refused")
        s = status()
        self.assertTrue(s.ready)
        self.assertEqual((s.model_name, s.model_version), ("lg", good1))
        self.assertEqual(s.source, "lg@production")
        self.assertIn(f"lg:{broken}: ", s.last_error)
        self.assertIn("labels", s.last_error)
        self.assertEqual(classify().model_version, good1)
        log = inference.log()
        self.assertIn(f"loading lg:{good1}, the last version of lg@production that served, "
                      "from the cache", log)
        self.assertIn(f"lg:{broken} was not loaded; lg:{good1} keeps serving", log)
        self.assertNotIn("no version is serving", log)
        self.assertNotIn("downloading lg:1", log)
        self.assertFalse(os.path.exists(stale), "the stale temporary file is still there")
        metrics = inference.scrape()
        self.assertIn('kennel_inference_model_loads_total{result="success"} 1', metrics)
        self.assertIn('kennel_inference_model_loads_total{result="failure"} 1', metrics)

        # The next good version swaps in as usual and is remembered.
        good3 = push(kt.export_test_model(os.path.join(tmp, "g3.pt"), 3, seed=13))
        alias(good3)
        kt.wait_until(lambda: status().model_version == good3, timeout=60,
                      what="the next good version")
        self.assertEqual(status().last_failed_version, 0)
        self.assertEqual(classify().model_version, good3)

        # A restart while the registry is down serves it too.
        registry.kill()
        inference.stop()
        inference.start()
        kt.wait_until(lambda: status().ready, timeout=60, what="the remembered version")
        self.assertEqual(status().model_version, good3)
        self.assertEqual(classify().model_version, good3)
        inference.wait_for_log(r"watch of lg@production .* ended", timeout=30)

        # Another ref has no memory here, even of the same model.
        other = kt.Service("inference", f"--registry={registry.addr}", "--model=lg",
                           f"--cache-dir={cache}", "--precision=fp32",
                           workdir=tempfile.mkdtemp(dir=tmp)).start()
        self.addCleanup(other.kill)
        other.wait_for_log(r"no version of lg from .* waiting for the registry", timeout=30)
        other.wait_for_log(r"watch of lg on .* ended", timeout=30)
        stub = pb_grpc.ClassifierStub(kt.channel(other.addr))
        self.assertFalse(self.status(stub).ready)
        with self.assertRaises(grpc.RpcError) as caught:
            stub.Classify(pb.ClassifyRequest(image=image_bytes(3)), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("cannot be followed", caught.exception.details())
        # The first one still serves beside it.
        self.assertEqual(classify().model_version, good3)


if __name__ == "__main__":
    kt.main()
