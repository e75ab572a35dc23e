"""The registry's S3 tests, shared by the runners for each S3 server:
test_registry_rgw.py (Ceph radosgw: checks SigV4 and honours If-None-Match)
and test_registry_s3rver.py (s3rver: checks no signature, ignores
conditional writes). Each runner starts its server once for all tests."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import kennel_testlib as kt
import test_registry_common as rc


BUCKET = "kennel"
PREFIX = "reg"


class S3Server:
    """One S3 server on loopback with a bucket named BUCKET."""
    name = "?"
    enforces_conditional_writes = False
    # What S3 says when the registry's credentials are wrong.
    refusal_code = "?"
    # Whether a multipart object's ETag ends in "-<parts>" (s3rver's does not).
    multipart_etags = False

    def __init__(self, workdir):
        self.workdir = workdir
        self.port = kt.free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = ""
        self.secret_key = ""

    def env(self):
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def wrong_env(self):
        raise NotImplementedError

    def boto3(self):
        """An independent client (Debian's python3-boto3), one per server."""
        if getattr(self, "_boto3", None) is None:
            self._boto3 = self._make_boto3()
        return self._boto3

    def _make_boto3(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2}))


class RadosGateway(S3Server):
    name = "radosgw"
    enforces_conditional_writes = True
    refusal_code = "SignatureDoesNotMatch"
    multipart_etags = True
    SCRIPTS = os.path.join(kt.SOURCE_DIR, "tests", "s3")

    def start(self):
        for tool in ("radosgw", "ceph-mon", "ceph-osd"):
            kt.require(tool, "the S3 tests run a throwaway Ceph radosgw")
        self.dir = os.path.join(self.workdir, "ceph")
        env = dict(os.environ, MONPORT=str(kt.free_port()))
        started = subprocess.run([os.path.join(self.SCRIPTS, "rgw-start.sh"), self.dir,
                                  str(self.port)], capture_output=True, text=True,
                                 timeout=120, env=env)
        if started.returncode != 0:
            raise RuntimeError(f"radosgw did not start:\n{started.stdout}{started.stderr}")
        values = dict(line.split("=", 1) for line in started.stdout.split())
        self.access_key = values["AWS_ACCESS_KEY_ID"]
        self.secret_key = values["AWS_SECRET_ACCESS_KEY"]
        self.boto3().create_bucket(Bucket=BUCKET)

    def stop(self):
        subprocess.run([os.path.join(self.SCRIPTS, "rgw-stop.sh"), self.dir],
                       env=dict(os.environ, FAST="1"), timeout=60)

    def outage(self):
        subprocess.run([os.path.join(self.SCRIPTS, "rgw-gateway.sh"), self.dir, "stop"],
                       check=True, timeout=60)

    def recover(self):
        subprocess.run([os.path.join(self.SCRIPTS, "rgw-gateway.sh"), self.dir, "start"],
                       check=True, timeout=120)

    def wrong_env(self):
        return dict(self.env(), AWS_SECRET_ACCESS_KEY="not-the-secret")


class S3rver(S3Server):
    name = "s3rver"
    enforces_conditional_writes = False
    refusal_code = "InvalidAccessKeyId"
    BIN = os.path.join(kt.SOURCE_DIR, "tests", "node_modules", ".bin", "s3rver")

    def start(self):
        kt.require("node", "s3rver runs on Node.js")
        if not os.access(self.BIN, os.X_OK):
            print("SKIP: s3rver is not installed (scripts/setup.sh runs npm ci in tests/)",
                  file=sys.stderr)
            sys.exit(kt.SKIP)
        self.access_key = self.secret_key = "S3RVER"
        self.dir = os.path.join(self.workdir, "s3rver")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None
        self.recover()

    def recover(self):
        log = open(os.path.join(self.workdir, "s3rver.log"), "ab")
        self.proc = subprocess.Popen([self.BIN, "-d", self.dir, "-a", "127.0.0.1",
                                      "-p", str(self.port), "--configure-bucket", BUCKET],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        kt.wait_until(lambda: self.boto3().head_bucket(Bucket=BUCKET), timeout=60,
                      what="s3rver to serve")

    def outage(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.outage()

    def wrong_env(self):
        return dict(self.env(), AWS_ACCESS_KEY_ID="NOT-A-KEY")


class S3RegistryTests:
    """Mixed into a unittest.TestCase with `server_class` set."""
    server_class = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix=f"kennel-s3-{cls.server_class.name}-")
        cls.s3 = cls.server_class(cls.tmp)
        t = time.time()
        cls.s3.start()
        print(f"{cls.s3.name} ready in {time.time() - t:.1f}s at {cls.s3.endpoint}",
              file=sys.stderr)
        cls.registry = cls.start_registry(cls.s3.env())

    @classmethod
    def tearDownClass(cls):
        kt.Service.stop_all()
        cls.s3.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def start_registry(cls, env, name="registry", wait_ready=True):
        workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=cls.tmp)
        return kt.Service("registry", f"--storage=s3://{BUCKET}/{PREFIX}",
                          f"--s3-endpoint={cls.s3.endpoint}", "--s3-path-style",
                          f"--spool-dir={workdir}", workdir=workdir, env=env).start()

    def cli(self, *args, service=None, **kwargs):
        return kt.kennel("models", *args, addr=(service or self.registry).addr, **kwargs)

    def file(self, name, size, seed):
        return rc.random_file(os.path.join(self.tmp, name), size, seed)

    def test_startup_says_whether_conditional_writes_are_enforced(self):
        if self.s3.enforces_conditional_writes:
            self.registry.wait_for_log("refuses exclusive writes to existing keys")
        else:
            self.registry.wait_for_log(r"ignores conditional writes \(If-None-Match: \*\)")
            self.registry.wait_for_log("Run a single registry against this store")

    def test_push_pull_and_an_independent_client_agree(self):
        # Above the 64 MiB threshold, so the blob goes up in parts.
        path = self.file("big.pt", 70 << 20, 1)
        want = rc.file_digest(path)
        pushed = json.loads(self.cli("push", "big", "--file", path, "--json",
                                     check=True).stdout)
        self.assertEqual(pushed["components"][0]["digest"], want)
        s3 = self.s3.boto3()
        keys = {o["Key"]: o for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{PREFIX}/") for o in page.get("Contents", [])}
        blob_key = f"{PREFIX}/blobs/sha256/{want[7:]}"
        manifest_key = f"{PREFIX}/models/big/versions/00000001.json"
        self.assertIn(blob_key, keys)
        self.assertIn(manifest_key, keys)
        self.assertEqual(keys[blob_key]["Size"], 70 << 20)
        head = s3.head_object(Bucket=BUCKET, Key=blob_key)
        if self.s3.multipart_etags:
            self.assertRegex(head["ETag"], r"-5\"?$", "expected an upload in 5 parts")
        body = s3.get_object(Bucket=BUCKET, Key=blob_key)["Body"].read()
        self.assertEqual("sha256:" + hashlib.sha256(body).hexdigest(), want)
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
        self.assertEqual(manifest["name"], "big")
        self.assertEqual(int(manifest["version"]), 1)
        self.assertEqual(manifest["components"][0]["digest"], want)
        self.assertEqual(int(manifest["components"][0]["size"]), 70 << 20)
        dest = os.path.join(self.tmp, "big-out.pt")
        self.cli("pull", "big", "-o", dest, check=True)
        self.assertEqual(rc.file_digest(dest), want)

    def test_eight_concurrent_pushers_get_eight_readable_versions(self):
        paths = [self.file(f"conc-{i}.pt", (1 << 20) + i, 100 + i) for i in range(8)]
        rc.check_concurrent_pushes(self, paths)

    def test_restart_keeps_versions_and_aliases(self):
        a = self.file("keep-a.pt", 200000, 2)
        b = self.file("keep-b.pt", 200000, 3)
        self.cli("push", "keep", "--file", a, "--alias", "production", check=True)
        self.cli("push", "keep", "--file", b, check=True)
        self.assertEqual(self.registry.stop(), 0)
        self.registry.start()
        shown = json.loads(self.cli("show", "keep@production", "--json", check=True).stdout)
        self.assertEqual(int(shown["version"]), 1)
        self.assertEqual(shown["components"][0]["digest"], rc.file_digest(a))
        self.assertEqual(int(json.loads(self.cli("show", "keep", "--json",
                                                 check=True).stdout)["version"]), 2)

    def test_corrupt_object_is_refused_on_pull(self):
        path = self.file("corrupt.pt", 2 << 20, 4)
        self.cli("push", "corrupt", "--file", path, check=True)
        data = bytearray(rc.read(path))
        data[12345] ^= 0xFF
        self.s3.boto3().put_object(Bucket=BUCKET, Body=bytes(data),
                                   Key=f"{PREFIX}/blobs/sha256/{rc.file_digest(path)[7:]}")
        outdir = os.path.join(self.tmp, "corrupt-out")
        os.makedirs(outdir)
        pulled = self.cli("pull", "corrupt", "-o", os.path.join(outdir, "m.pt"))
        self.assertEqual(pulled.returncode, 1)
        self.assertIn("DATA_LOSS", pulled.stderr)
        self.assertEqual(os.listdir(outdir), [])

    def test_wrong_credentials_are_permission_denied_with_the_s3_message(self):
        wrong = self.start_registry(self.s3.wrong_env(), name="wrong")
        try:
            listed = self.cli("ls", service=wrong)
            self.assertEqual(listed.returncode, 1)
            self.assertIn("PERMISSION_DENIED", listed.stderr)
            self.assertIn(self.s3.refusal_code, listed.stderr)
            pushed = self.cli("push", "denied", "--file", self.file("denied.pt", 1000, 5),
                              service=wrong)
            self.assertEqual(pushed.returncode, 1)
            self.assertIn("PERMISSION_DENIED", pushed.stderr)
        finally:
            wrong.stop()

    def test_kill_9_mid_push_leaves_no_version_and_the_next_push_works(self):
        data = rc.random_bytes(80 << 20, 6)
        push = rc.PushInBackground(self.registry.addr, rc.header("crash", data), data,
                                   upto=72 << 20)
        self.assertTrue(push.reached.wait(120))
        time.sleep(1)  # let parts reach S3
        self.registry.kill()
        push.release()
        self.assertIsNotNone(push.error)
        self.registry.start()
        got = self.cli("show", "crash")
        self.assertEqual(got.returncode, 1)
        self.assertIn("NOT_FOUND", got.stderr)
        s3 = self.s3.boto3()
        objects = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/models/crash/")
        self.assertEqual(objects.get("KeyCount", 0), 0)
        response, error = rc.push_raw(self.registry.addr, rc.header("crash", data), data,
                                      timeout=120)
        self.assertIsNone(error, error and error.details())
        self.assertEqual(response.model.version, 1)
        if self.s3.enforces_conditional_writes:
            # The abandoned multipart upload goes at the next collection.
            uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{PREFIX}/")
            self.assertTrue(uploads.get("Uploads"), "expected the crash to leave an upload")
            time.sleep(1.2)
            self.cli("gc", "--grace", "1s", check=True)
            uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{PREFIX}/")
            self.assertFalse(uploads.get("Uploads"))

    def test_s3_outage_is_unavailable_in_time_and_service_resumes(self):
        path = self.file("outage.pt", 100000, 7)
        self.cli("push", "outage", "--file", path, check=True)
        pid = self.registry.proc.pid
        self.s3.outage()
        try:
            for args in (("ls",), ("show", "outage"), ("push", "outage", "--file", path)):
                start = time.time()
                result = self.cli(*args, "--timeout", "30s")
                elapsed = time.time() - start
                self.assertEqual(result.returncode, 1, args)
                self.assertIn("UNAVAILABLE", result.stderr, args)
                self.assertIn("S3", result.stderr, args)
                self.assertLess(elapsed, 25, args)
        finally:
            self.s3.recover()
        kt.wait_until(lambda: self.cli("show", "outage").returncode == 0, timeout=30,
                      what="the registry to read from S3 again")
        self.cli("push", "outage", "--file", self.file("outage2.pt", 1000, 8), check=True)
        self.assertEqual(self.registry.proc.pid, pid, "the registry was restarted")
        self.assertIsNone(self.registry.proc.poll())
