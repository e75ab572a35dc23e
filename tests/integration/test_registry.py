"""kennel-registry on a local folder, through the real binary, the `kennel`
CLI and raw gRPC streams: round trips, dedupe, crash and restart,
corruption, drain during a push, tokens, malformed pushes, concurrent
pushers and watches."""

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import kennel_testlib as kt
import test_registry_common as rc

import grpc
from kennel.v1 import registry_pb2


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported:\n{text}")


class RegistryFileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-registry-")
        cls.store = os.path.join(cls.tmp, "store")
        cls.registry = kt.Service("registry", f"--storage=file://{cls.store}",
                                  workdir=cls.tmp).start()

    @classmethod
    def tearDownClass(cls):
        cls.registry.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def fresh_registry(self, *args, name="r"):
        """A registry of its own, on its own folder."""
        workdir = tempfile.mkdtemp(prefix=f"kennel-registry-{name}-", dir=self.tmp)
        store = os.path.join(workdir, "store")
        service = kt.Service("registry", f"--storage=file://{store}", *args,
                             workdir=workdir).start()
        self.addCleanup(service.kill)
        return service, store

    def file(self, name, size, seed):
        return rc.random_file(os.path.join(self.tmp, name), size, seed)

    def cli(self, *args, service=None, **kwargs):
        return kt.kennel("models", *args, addr=(service or self.registry).addr, **kwargs)

    def test_cli_round_trip_with_dedupe_aliases_and_deletion(self):
        path = self.file("rt.pt", 12 << 20, 1)
        labels = os.path.join(self.tmp, "labels.txt")
        with open(labels, "w") as f:
            f.write("cat\ndog\n\nbird\n")
        before = metric(self.registry.scrape(), "kennel_registry_bytes_received_total")
        out = self.cli("push", "rt", "--file", path, "--labels", labels,
                       "--alias", "staging", check=True).stdout
        self.assertIn("pushed rt:1", out)
        out = self.cli("push", "rt", "--file", path, check=True).stdout
        self.assertIn("pushed rt:2", out)
        received = metric(self.registry.scrape(), "kennel_registry_bytes_received_total")
        self.assertEqual(received - before, 12 << 20, "the same blob was uploaded twice")

        versions = json.loads(self.cli("ls", "rt", "--json", check=True).stdout)["versions"]
        self.assertEqual([int(v["version"]) for v in versions], [2, 1])
        table = self.cli("ls", check=True).stdout
        self.assertRegex(table, r"rt\s+2\s+2\s+.*staging=1")
        shown = json.loads(self.cli("show", "rt@staging", "--json", check=True).stdout)
        self.assertEqual(int(shown["version"]), 1)
        self.assertEqual(shown["labels"], ["cat", "dog", "bird"])
        self.assertEqual(shown["preprocessing"]["input_size"], 224)
        self.assertEqual(shown["preprocessing"]["resize"], 256)
        self.assertEqual(shown["components"][0]["digest"], rc.file_digest(path))
        self.assertIn("centre crop 224", self.cli("show", "rt:1", check=True).stdout)

        dest = os.path.join(self.tmp, "pulled", "rt.pt")
        os.makedirs(os.path.dirname(dest))
        self.cli("pull", "rt@staging", "-o", dest, check=True)
        self.assertEqual(rc.read(dest), rc.read(path))
        self.assertEqual(os.listdir(os.path.dirname(dest)), ["rt.pt"])

        self.cli("alias", "rt", "production", "2", check=True)
        refused = self.cli("rm", "rt:2")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("FAILED_PRECONDITION", refused.stderr)
        self.assertIn("production", refused.stderr)
        self.cli("unalias", "rt", "production", check=True)
        self.cli("rm", "rt:2", check=True)
        gone = self.cli("show", "rt:2")
        self.assertEqual(gone.returncode, 1)
        self.assertIn("NOT_FOUND", gone.stderr)
        missing = self.cli("alias", "rt", "production", "9")
        self.assertEqual(missing.returncode, 1)
        self.assertIn("NOT_FOUND", missing.stderr)
        self.assertEqual(self.cli("rm", "rt").returncode, 2)
        self.assertEqual(self.cli("push", "Bad Name", "--file", path).returncode, 2)
        # The deleted version's number is not reused.
        other = self.file("rt3.pt", 1000, 3)
        self.assertIn("pushed rt:3", self.cli("push", "rt", "--file", other, check=True).stdout)
        # A file that cannot be TorchScript (not a zip archive) is refused
        # before anything is sent.
        text = os.path.join(self.tmp, "notes.pt")
        with open(text, "w") as f:
            f.write("hello\n")
        refused = self.cli("push", "rt", "--file", text, "--alias", "production")
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("is not a TorchScript file", refused.stderr)
        versions = json.loads(self.cli("ls", "rt", "--json", check=True).stdout)["versions"]
        self.assertEqual([int(v["version"]) for v in versions], [3, 1])
        self.assertEqual(self.cli("show", "rt@production").returncode, 1)

    def test_restart_keeps_versions_and_aliases(self):
        service, store = self.fresh_registry(name="restart")
        a = self.file("restart-a.pt", 300000, 4)
        b = self.file("restart-b.pt", 300000, 5)
        self.cli("push", "keep", "--file", a, "--alias", "production", service=service, check=True)
        self.cli("push", "keep", "--file", b, service=service, check=True)
        self.assertEqual(service.stop(), 0)
        service.start()
        shown = json.loads(self.cli("show", "keep@production", "--json", service=service,
                                    check=True).stdout)
        self.assertEqual(int(shown["version"]), 1)
        self.assertEqual(shown["components"][0]["digest"], rc.file_digest(a))
        latest = json.loads(self.cli("show", "keep", "--json", service=service,
                                     check=True).stdout)
        self.assertEqual(int(latest["version"]), 2)
        dest = os.path.join(self.tmp, "restart-out.pt")
        self.cli("pull", "keep:2", "-o", dest, service=service, check=True)
        self.assertEqual(rc.read(dest), rc.read(b))

    def test_kill_9_mid_push_leaves_no_version_and_the_next_push_works(self):
        service, store = self.fresh_registry(name="crash")
        data = rc.random_bytes(24 << 20, 6)
        push = rc.PushInBackground(service.addr, rc.header("crash", data), data,
                                   upto=10 << 20)
        self.assertTrue(push.reached.wait(60))
        time.sleep(0.3)  # let the registry write what it has received
        service.kill()
        push.release()
        self.assertIsNotNone(push.error)
        self.assertEqual(push.error.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertTrue(rc.staged_files(store), "expected the crash to leave staged bytes")
        service.start()
        with self.assertRaises(grpc.RpcError) as ctx:
            rc.stub(service.addr).GetModel(registry_pb2.GetModelRequest(ref="crash"), timeout=10)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(len(rc.stub(service.addr).ListModels(
            registry_pb2.ListModelsRequest(), timeout=10).models), 0)
        response, error = rc.push_raw(service.addr, rc.header("crash", data), data)
        self.assertIsNone(error)
        self.assertEqual(response.model.version, 1)
        # The crash's leftovers go at the next collection past the grace period.
        time.sleep(1.2)
        self.cli("gc", "--grace", "1s", service=service, check=True)
        self.assertEqual(rc.staged_files(store), [])

    def test_corrupt_blob_is_refused_on_pull(self):
        path = self.file("corrupt.pt", 3 << 20, 7)
        self.cli("push", "corrupt", "--file", path, check=True)
        blob = os.path.join(self.store, "blobs", "sha256", rc.file_digest(path)[7:])
        with open(blob, "r+b") as f:
            f.seek(2 << 20)
            byte = f.read(1)
            f.seek(2 << 20)
            f.write(bytes([byte[0] ^ 0xFF]))
        outdir = os.path.join(self.tmp, "corrupt-out")
        os.makedirs(outdir)
        pulled = self.cli("pull", "corrupt", "-o", os.path.join(outdir, "m.pt"))
        self.assertEqual(pulled.returncode, 1)
        self.assertIn("DATA_LOSS", pulled.stderr)
        self.assertIn("corrupt", pulled.stderr)
        self.assertEqual(os.listdir(outdir), [])

    def test_sigterm_while_a_push_is_half_sent_lets_it_finish(self):
        service, store = self.fresh_registry("--drain-seconds=30", name="drain")
        data = rc.random_bytes(8 << 20, 8)
        push = rc.PushInBackground(service.addr, rc.header("drain", data), data,
                                   upto=4 << 20)
        self.assertTrue(push.reached.wait(60))
        service.proc.send_signal(signal.SIGTERM)
        service.wait_for_log("draining", timeout=10)
        time.sleep(0.5)
        push.release()
        self.assertIsNone(push.error, push.error and push.error.details())
        self.assertEqual(push.result.model.version, 1)
        self.assertEqual(service.proc.wait(30), 0)
        service.start()
        got = rc.stub(service.addr).GetModel(registry_pb2.GetModelRequest(ref="drain:1"),
                                             timeout=10)
        self.assertEqual(got.components[0].digest, rc.digest(data))

    def test_token_file_guards_mutations_and_nothing_is_stored_without_it(self):
        token_file = os.path.join(self.tmp, "token")
        with open(token_file, "w") as f:
            f.write("s3cret\n")
        wrong_file = os.path.join(self.tmp, "wrong-token")
        with open(wrong_file, "w") as f:
            f.write("nope\n")
        service, store = self.fresh_registry(f"--token-file={token_file}", name="token")
        path = self.file("token.pt", 2 << 20, 9)
        for extra in ([], ["--token-file", wrong_file]):
            pushed = self.cli("push", "guarded", "--file", path, *extra, service=service)
            self.assertEqual(pushed.returncode, 1)
            self.assertIn("UNAUTHENTICATED", pushed.stderr)
        data = rc.read(path)
        for metadata in (None, (("authorization", "Bearer nope"),)):
            try:
                rc.stub(service.addr).PushModel(
                    rc.messages(rc.header("guarded", data), data), timeout=30,
                    metadata=metadata)
                self.fail("push without the right token succeeded")
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAUTHENTICATED)
        blobs = os.path.join(store, "blobs")
        self.assertFalse(os.path.isdir(blobs) and os.listdir(blobs), "bytes were stored")
        self.assertEqual(rc.staged_files(store), [])
        self.assertIn("NAME", self.cli("ls", service=service, check=True).stdout)
        self.cli("push", "guarded", "--file", path, "--token-file", token_file,
                 service=service, check=True)
        alias = self.cli("alias", "guarded", "prod", "1", service=service)
        self.assertIn("UNAUTHENTICATED", alias.stderr)
        self.cli("alias", "guarded", "prod", "1", "--token-file", token_file,
                 service=service, check=True)

    def test_bad_names_oversized_headers_and_truncated_streams_store_nothing(self):
        service, store = self.fresh_registry(name="bad")
        data = rc.random_bytes(3 << 20, 10)
        cases = [
            ("bad name", rc.header("../etc", data), {}, grpc.StatusCode.INVALID_ARGUMENT),
            ("upper case", rc.header("Dogs", data), {}, grpc.StatusCode.INVALID_ARGUMENT),
            ("bad digest", rc.header("ok", data, digest_value="sha256:12"), {},
             grpc.StatusCode.INVALID_ARGUMENT),
            ("wrong digest", rc.header("ok", data, digest_value=rc.digest(b"other")), {},
             grpc.StatusCode.INVALID_ARGUMENT),
            ("truncated", rc.header("ok", data), {"upto": 1 << 20},
             grpc.StatusCode.INVALID_ARGUMENT),
            ("big header", rc.header("ok", data, labels=["x" * 200] * 8000), {},
             grpc.StatusCode.INVALID_ARGUMENT),
            ("huge header", rc.header("ok", data, labels=["x" * 250] * 80000), {},
             grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]
        for what, h, kwargs, code in cases:
            response, error = rc.push_raw(service.addr, h, data, **kwargs)
            self.assertIsNotNone(error, what)
            self.assertEqual(error.code(), code, f"{what}: {error.details()}")
            self.assertTrue(error.details(), what)
        s = rc.stub(service.addr)
        for ref in ("Bad", "a/b", "x:0", "x@Y", ""):
            with self.assertRaises(grpc.RpcError) as ctx:
                s.GetModel(registry_pb2.GetModelRequest(ref=ref), timeout=10)
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, ref)
        with self.assertRaises(grpc.RpcError) as ctx:
            s.SetAlias(registry_pb2.SetAliasRequest(name="ok", alias="../p", version=1),
                       timeout=10)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        blobs = os.path.join(store, "blobs")
        self.assertFalse(os.path.isdir(blobs) and os.listdir(blobs), "bytes were stored")
        self.assertFalse(os.path.isdir(os.path.join(store, "models")))
        self.assertEqual(rc.staged_files(store), [])

    def test_eight_concurrent_pushers_get_eight_readable_versions(self):
        paths = [self.file(f"conc-{i}.pt", (2 << 20) + i, 100 + i) for i in range(8)]
        rc.check_concurrent_pushes(self, paths)

    def test_watch_follows_an_alias_and_ends_when_the_registry_stops(self):
        service, store = self.fresh_registry(name="watch")
        updates = queue.Queue()
        call = rc.stub(service.addr).WatchModel(registry_pb2.WatchModelRequest(ref="w@prod"))

        def follow():
            try:
                for state in call:
                    updates.put(state.model.version if state.HasField("model") else 0)
            except grpc.RpcError as e:
                updates.put(e.code())

        threading.Thread(target=follow, daemon=True).start()
        self.assertEqual(updates.get(timeout=10), 0)
        for i in range(2):
            self.cli("push", "w", "--file", self.file(f"w{i}.pt", 1000, 200 + i),
                     service=service, check=True)
        self.cli("alias", "w", "prod", "1", service=service, check=True)
        self.assertEqual(updates.get(timeout=10), 1)
        self.cli("alias", "w", "prod", "2", service=service, check=True)
        self.assertEqual(updates.get(timeout=10), 2)
        start = time.time()
        self.assertEqual(service.stop(), 0)
        self.assertEqual(updates.get(timeout=10), grpc.StatusCode.UNAVAILABLE)
        self.assertLess(time.time() - start, 10)

    def test_metrics_follow_the_contract(self):
        path = self.file("metrics.pt", 1 << 20, 11)
        self.cli("push", "metrics", "--file", path, check=True)
        self.cli("pull", "metrics", "-o", os.path.join(self.tmp, "metrics-out.pt"), check=True)
        text = self.registry.scrape()
        self.assertGreaterEqual(metric(text, "kennel_registry_bytes_received_total"), 1 << 20)
        self.assertGreaterEqual(metric(text, "kennel_registry_bytes_sent_total"), 1 << 20)
        self.assertGreaterEqual(metric(text, "kennel_registry_versions_committed_total"), 1)
        for op in ("put", "get", "head", "list", "delete"):
            self.assertIn(f'kennel_registry_storage_errors_total{{op="{op}"}}', text)
            self.assertIn(f'kennel_registry_storage_seconds_bucket{{op="{op}",le="', text)
        self.assertIn('kennel_grpc_server_handled_total{grpc_code="OK",'
                      'grpc_method="PushModel",grpc_service="kennel.v1.ModelRegistry"}', text)
        if shutil.which("promtool"):
            check = subprocess.run(["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True)
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)


if __name__ == "__main__":
    kt.main()
