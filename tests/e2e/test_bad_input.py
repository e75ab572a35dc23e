"""Bad input sweep: every RPC of every service fed malformed, oversized,
empty and hostile input. Each answer is asserted by its code and carries a
message; after each sweep the process is still up and serving, and nothing
was stored (the registry's folder, the trainer's job list and the model
inference serves are what they were).

Hostile input here: path traversal in names, refs, digests, job ids and
data paths; images whose headers claim huge dimensions (a tiny PNG, a JPEG
with a rewritten frame header, a real 20000x20000 PNG that compresses to a
few hundred KB); invalid UTF-8 where the wire format wants text (labels,
class folder names, content types); negative and extreme numbers
(top-k, sizes, versions, page sizes); bytes that are not a protobuf at all.
"""

import os
import random
import shutil
import tempfile
import unittest

import e2e_lib as e2e
from e2e_lib import kt, rc

import grpc
from kennel.v1 import common_pb2, inference_pb2, registry_pb2, trainer_pb2

import trainer_fixtures as tf

C = grpc.StatusCode


def tree(path):
    """Every file under path with its size: what a sweep must leave alone."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, path)] = os.path.getsize(p)
    return out


class BadInputTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-e2e-bad-")
        cls.root = e2e.data_root(cls.tmp, per_class=2)
        cls.make_hostile_dataset()
        cls.model = e2e.models(m={})["m"]
        cls.registry, cls.trainer = tf.start_servers(cls.tmp, cls.root)
        cls.store = os.path.join(cls.tmp, "store")
        e2e.push_model(cls.registry.addr, "m", cls.model, "--alias", "production")
        cls.inference = e2e.start_inference(cls.tmp, cls.registry.addr, "m@production",
                                            "--max-image-bytes=1000000")
        e2e.wait_serving(cls.inference.addr, 1)
        cls.reg = e2e.registry_stub(cls.registry.addr)
        cls.trn = e2e.trainer_stub(cls.trainer.addr)
        cls.inf = e2e.classifier_stub(cls.inference.addr)

    @classmethod
    def tearDownClass(cls):
        # kill: a graceful stop waits seconds on the sweep's idle connections.
        for s in (cls.inference, cls.trainer, cls.registry):
            s.kill()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def make_hostile_dataset(cls):
        """A copy of two Fashion-MNIST classes whose first class folder name
        is not UTF-8."""
        src = os.path.join(cls.root, "fm")
        dst = os.path.join(cls.root, "hostile").encode()
        for split in ("train", "valid", "test"):
            classes = sorted(os.listdir(os.path.join(src, split)))[:2]
            for name, cls_dir in zip((b"000.bad\xff\xfe", b"001.ok"), classes):
                os.makedirs(os.path.join(dst, split.encode(), name))
                for f in os.listdir(os.path.join(src, split, cls_dir)):
                    shutil.copy(os.path.join(src, split, cls_dir, f).encode(),
                                os.path.join(dst, split.encode(), name, f.encode()))

    def sweep(self, led, cases):
        """cases: (what, expected code, callable). Asserts each. A request
        that is not a valid protobuf never reaches Kennel's code: gRPC itself
        answers INTERNAL, with no message."""
        for what, code, fn in cases:
            with self.subTest(what):
                e2e.expect_code(self, led, code, fn, what=what,
                                need_message=code != C.INTERNAL)

    def assert_all_up(self):
        for s in (self.registry, self.trainer, self.inference):
            self.assertIsNone(s.proc.poll(), f"{s.kind} died:\n{s.log()[-3000:]}")

    # ---- registry ------------------------------------------------------------

    def test_registry_rpcs(self):
        led = e2e.ledger(self)
        reg = self.reg
        before = tree(self.store)
        data = rc.random_bytes(1000, 1)

        def H(name="ok", **kw):
            return registry_pb2.PushModelRequest(header=rc.header(name, data, **kw))

        def chunk(component=0, offset=0, payload=data):
            return registry_pb2.PushModelRequest(chunk=common_pb2.Chunk(
                component=component, offset=offset, data=payload))

        def push(*messages):
            return lambda: reg.PushModel(iter(messages), timeout=10)

        def header_with(**fields):
            h = rc.header("ok", data)
            for k, v in fields.items():
                if k == "aliases":
                    h.aliases.extend(v)
                elif k == "format":
                    h.components[0].format = v
                elif k == "role":
                    h.components[0].role = v
                else:
                    setattr(h, k, v)
            return registry_pb2.PushModelRequest(header=h)

        raw_push = e2e.raw_stream_unary(self.registry.addr, "/kennel.v1.ModelRegistry/PushModel")
        bad_utf8_header = H(labels=["LABELXX"]).SerializeToString().replace(
            b"LABELXX", b"\xff\xfe\xfdXX\xc0")
        raw_get = e2e.raw_unary(self.registry.addr, "/kennel.v1.ModelRegistry/GetModel")
        bad_utf8_ref = registry_pb2.GetModelRequest(ref="mXX").SerializeToString().replace(
            b"XX", b"\xff\xfe")
        cases = [
            ("push: empty stream", C.INVALID_ARGUMENT, push()),
            ("push: chunk before header", C.INVALID_ARGUMENT, push(chunk())),
            ("push: two headers", C.INVALID_ARGUMENT, push(H(), H(), chunk())),
            ("push: no components", C.INVALID_ARGUMENT, push(registry_pb2.PushModelRequest(
                header=registry_pb2.PushHeader(name="ok")))),
            ("push: negative size", C.INVALID_ARGUMENT, push(H(size=-5), chunk())),
            ("push: 1 PiB size", C.INVALID_ARGUMENT, push(H(size=1 << 50), chunk())),
            ("push: digest traversal", C.INVALID_ARGUMENT,
             push(H(digest_value="sha256:../../../etc/passwd"), chunk())),
            ("push: md5 digest", C.INVALID_ARGUMENT,
             push(H(digest_value="md5:" + "0" * 32), chunk())),
            ("push: wrong digest", C.INVALID_ARGUMENT,
             push(H(digest_value=rc.digest(b"other")), chunk())),
            ("push: chunk of component 5", C.INVALID_ARGUMENT, push(H(), chunk(component=5))),
            ("push: chunk out of order", C.INVALID_ARGUMENT, push(H(), chunk(offset=10))),
            ("push: more bytes than declared", C.INVALID_ARGUMENT,
             push(H(), chunk(), chunk(offset=1000))),
            ("push: truncated", C.INVALID_ARGUMENT, push(H(), chunk(payload=data[:10]))),
            ("push: alias traversal", C.INVALID_ARGUMENT,
             push(header_with(aliases=["../production"]), chunk())),
            ("push: format traversal", C.INVALID_ARGUMENT,
             push(header_with(format="../../x"), chunk())),
            ("push: unknown role", C.INVALID_ARGUMENT, push(header_with(role=77), chunk())),
            ("push: 10 MB header", C.INVALID_ARGUMENT,
             push(H(labels=["x" * 200] * 50000), chunk())),
            ("push: header over the message limit", C.RESOURCE_EXHAUSTED,
             push(H(labels=["x" * 250] * 80000), chunk())),
            # An undecodable message ends the stream's reads on the server.
            ("push: invalid UTF-8 label", C.INVALID_ARGUMENT,
             lambda: raw_push(iter([bad_utf8_header, chunk().SerializeToString()]), timeout=10)),
            ("push: not a protobuf", C.INVALID_ARGUMENT,
             lambda: raw_push(iter([b"\xff\xff\xff\xff\x0f"]), timeout=10)),
        ]

        # Versions that could be stored but never served: refused at the push.
        def never_serves(edit):
            h = rc.header("ok", data)
            edit(h)
            return push(registry_pb2.PushModelRequest(header=h), chunk())

        def pre(**fields):
            def edit(h):
                h.preprocessing.input_size = 224
                h.preprocessing.resize = 256
                for k, v in fields.items():
                    if k in ("mean", "std"):
                        getattr(h.preprocessing, k).extend(v)
                    else:
                        setattr(h.preprocessing, k, v)
            return never_serves(edit)

        def component(**fields):
            def edit(h):
                for k, v in fields.items():
                    setattr(h.components[0], k, v)
            return never_serves(edit)
        cases += [
            ("push: empty label", C.INVALID_ARGUMENT, push(H(labels=["a", ""]), chunk())),
            ("push: duplicate labels", C.INVALID_ARGUMENT,
             push(H(labels=["a", "b", "a"]), chunk())),
            ("push: input_size -3", C.INVALID_ARGUMENT, pre(input_size=-3)),
            ("push: input_size 2^30", C.INVALID_ARGUMENT, pre(input_size=1 << 30)),
            ("push: std 0", C.INVALID_ARGUMENT, pre(mean=[0.5] * 3, std=[0.2, 0, 0.2])),
            ("push: two means", C.INVALID_ARGUMENT, pre(mean=[0.5, 0.5])),
            ("push: four stds", C.INVALID_ARGUMENT, pre(std=[0.2] * 4)),
            ("push: resize below input_size", C.INVALID_ARGUMENT, pre(resize=100)),
            ("push: unknown resize mode", C.INVALID_ARGUMENT, pre(resize_mode=9)),
            ("push: format onnx", C.INVALID_ARGUMENT, component(format="onnx")),
            ("push: no model component", C.INVALID_ARGUMENT,
             component(role=common_pb2.COMPONENT_ROLE_BACKBONE)),
            ("push: empty model", C.INVALID_ARGUMENT,
             component(size=0, digest=rc.digest(b""))),
        ]
        for name in ["../../etc/passwd", "a/b", "", "A", "x" * 64, "caf\u00e9", "n\x00",
                     ".hidden", "-dash"]:
            cases.append((f"push: name {name!r}", C.INVALID_ARGUMENT, push(H(name=name), chunk())))
        for ref in ["", "../x", "/etc/passwd", "x:-1", "x:abc", "x@", "x@../y", "x:0",
                    "x:99999999999999999999", "x" * 100000]:
            cases.append((f"get: ref {ref[:30]!r}", C.INVALID_ARGUMENT,
                          lambda ref=ref: reg.GetModel(registry_pb2.GetModelRequest(ref=ref),
                                                       timeout=10)))
        cases += [
            ("get: missing model", C.NOT_FOUND,
             lambda: reg.GetModel(registry_pb2.GetModelRequest(ref="nope"), timeout=10)),
            ("get: missing version", C.NOT_FOUND,
             lambda: reg.GetModel(registry_pb2.GetModelRequest(ref="m:99"), timeout=10)),
            # gRPC answers a request it cannot parse itself, with INTERNAL.
            ("get: invalid UTF-8 ref", C.INTERNAL, lambda: raw_get(bad_utf8_ref, timeout=10)),
            ("get: not a protobuf", C.INTERNAL, lambda: raw_get(b"\x0a\xff\xff\xff", timeout=10)),
            ("list models: not a protobuf", C.INTERNAL, lambda: e2e.raw_unary(
                self.registry.addr, "/kennel.v1.ModelRegistry/ListModels")(b"\xff", timeout=10)),
            ("has blobs: traversal", C.INVALID_ARGUMENT, lambda: reg.HasBlobs(
                registry_pb2.HasBlobsRequest(digests=["../../x"]), timeout=10)),
            ("has blobs: 100k digests", C.INVALID_ARGUMENT, lambda: reg.HasBlobs(
                registry_pb2.HasBlobsRequest(digests=["sha256:%064x" % i for i in range(100000)]),
                timeout=30)),
            ("pull: ref traversal", C.INVALID_ARGUMENT, lambda: list(reg.PullModel(
                registry_pb2.PullModelRequest(ref="../x"), timeout=10))),
            ("pull: digest traversal", C.INVALID_ARGUMENT, lambda: list(reg.PullModel(
                registry_pb2.PullModelRequest(ref="m:1", digests=["sha256:../../x"]),
                timeout=10))),
            ("pull: digest of another version", C.NOT_FOUND, lambda: list(reg.PullModel(
                registry_pb2.PullModelRequest(ref="m:1", digests=[rc.digest(b"x")]),
                timeout=10))),
            ("pull: missing", C.NOT_FOUND, lambda: list(reg.PullModel(
                registry_pb2.PullModelRequest(ref="nope"), timeout=10))),
            ("list versions: traversal", C.INVALID_ARGUMENT, lambda: reg.ListVersions(
                registry_pb2.ListVersionsRequest(name="../x"), timeout=10)),
            ("list versions: page size -1", C.INVALID_ARGUMENT, lambda: reg.ListVersions(
                registry_pb2.ListVersionsRequest(name="m", page_size=-1), timeout=10)),
            ("list versions: forged page token", C.INVALID_ARGUMENT, lambda: reg.ListVersions(
                registry_pb2.ListVersionsRequest(name="m", page_token="../../etc"), timeout=10)),
            ("set alias: traversal", C.INVALID_ARGUMENT, lambda: reg.SetAlias(
                registry_pb2.SetAliasRequest(name="m", alias="../p", version=1), timeout=10)),
            ("set alias: name traversal", C.INVALID_ARGUMENT, lambda: reg.SetAlias(
                registry_pb2.SetAliasRequest(name="../m", alias="p", version=1), timeout=10)),
            ("set alias: version 0", C.INVALID_ARGUMENT, lambda: reg.SetAlias(
                registry_pb2.SetAliasRequest(name="m", alias="p", version=0), timeout=10)),
            ("set alias: version -1", C.INVALID_ARGUMENT, lambda: reg.SetAlias(
                registry_pb2.SetAliasRequest(name="m", alias="p", version=-1), timeout=10)),
            ("set alias: missing version", C.NOT_FOUND, lambda: reg.SetAlias(
                registry_pb2.SetAliasRequest(name="m", alias="p", version=2**62), timeout=10)),
            ("delete alias: traversal", C.INVALID_ARGUMENT, lambda: reg.DeleteAlias(
                registry_pb2.DeleteAliasRequest(name="m", alias="../production"), timeout=10)),
            ("delete alias: missing", C.NOT_FOUND, lambda: reg.DeleteAlias(
                registry_pb2.DeleteAliasRequest(name="m", alias="nope"), timeout=10)),
            ("delete version: 0", C.INVALID_ARGUMENT, lambda: reg.DeleteVersion(
                registry_pb2.DeleteVersionRequest(name="m", version=0), timeout=10)),
            ("delete version: traversal", C.INVALID_ARGUMENT, lambda: reg.DeleteVersion(
                registry_pb2.DeleteVersionRequest(name="../m", version=1), timeout=10)),
            ("delete version: aliased", C.FAILED_PRECONDITION, lambda: reg.DeleteVersion(
                registry_pb2.DeleteVersionRequest(name="m", version=1), timeout=10)),
            ("delete version: missing", C.NOT_FOUND, lambda: reg.DeleteVersion(
                registry_pb2.DeleteVersionRequest(name="m", version=77), timeout=10)),
            ("watch: traversal", C.INVALID_ARGUMENT, lambda: list(reg.WatchModel(
                registry_pb2.WatchModelRequest(ref="../x"), timeout=10))),
            ("watch: empty ref", C.INVALID_ARGUMENT, lambda: list(reg.WatchModel(
                registry_pb2.WatchModelRequest(ref=""), timeout=10))),
            ("gc: negative grace", C.INVALID_ARGUMENT, lambda: reg.GarbageCollect(
                registry_pb2.GarbageCollectRequest(grace_seconds=-5), timeout=10)),
        ]
        self.sweep(led, cases)
        self.assert_all_up()
        self.assertEqual(tree(self.store), before, "the sweep changed the store")
        self.assertEqual(rc.staged_files(self.store), [])
        got = led.call(reg.GetModel, registry_pb2.GetModelRequest(ref="m@production"),
                       timeout=10)[0]
        self.assertEqual(got.version, 1)
        led.checked()
        led.note("cases", len(cases))

    def test_cli_refuses_hostile_labels_and_names(self):
        led = e2e.ledger(self)
        before = tree(self.store)
        labels = os.path.join(self.tmp, "labels.txt")
        with open(labels, "wb") as f:
            f.write(b"cat\n\xff\xfe\xfd\ndog\n")
        result = kt.kennel("models", "push", "ok", "--file", self.model, "--labels", labels,
                           addr=self.registry.addr)
        led.record("CLI_REFUSED" if result.returncode else e2e.OK)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("UTF-8", result.stderr)
        for name in ("../../etc/passwd", "Dogs"):
            result = kt.kennel("models", "push", name, "--file", self.model,
                               addr=self.registry.addr)
            led.record("CLI_USAGE" if result.returncode == 2 else e2e.OK)
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn("invalid model name", result.stderr)
        self.assertEqual(tree(self.store), before)

    # ---- trainer -------------------------------------------------------------

    def test_trainer_rpcs(self):
        led = e2e.ledger(self)
        trn = self.trn
        jobs_before = led.call(trn.ListJobs, trainer_pb2.ListJobsRequest(limit=1000),
                               timeout=10)[0].jobs
        dirs_before = sorted(os.listdir(os.path.join(self.tmp, "jobs"))) if os.path.isdir(
            os.path.join(self.tmp, "jobs")) else []

        def train(**kw):
            extra = kw.pop("spec", {})
            hyper = kw.pop("hyper", {})
            r = tf.train_request(**kw)
            for k, v in extra.items():
                if k == "input_size":
                    r.spec.preprocessing.input_size = v
                else:
                    setattr(r.spec, k, v)
            for k, v in hyper.items():
                setattr(r.hyperparameters, k, v)
            return lambda: list(trn.Train(r, timeout=60))

        def tune(mutate):
            r = trainer_pb2.TuneRequest()
            r.spec.data = "fm"
            r.spec.backbone = "small_cnn.pt"
            r.base.learning_rate, r.base.batch_size, r.base.epochs = 0.01, 16, 1
            r.max_trials = 2
            p = r.space.add(name="learning_rate")
            p.continuous.min, p.continuous.max = 0.001, 0.1
            mutate(r)
            return lambda: list(trn.Tune(r, timeout=60))

        def setattrs(**kw):
            return lambda r: [setattr(r, k, v) for k, v in kw.items()]

        def space(**kw):
            def mutate(r):
                for k, v in kw.items():
                    setattr(r.space[0].continuous, k, v)
            return mutate

        raw_get = e2e.raw_unary(self.trainer.addr, "/kennel.v1.Trainer/GetJob")
        cases = [
            ("train: data traversal", C.INVALID_ARGUMENT, train(data="../../../../etc")),
            ("train: data /", C.INVALID_ARGUMENT, train(data="/")),
            ("train: data with NUL", C.INVALID_ARGUMENT, train(data="fm\x00/../..")),
            ("train: empty data", C.INVALID_ARGUMENT, train(data="")),
            ("train: s3 data", C.INVALID_ARGUMENT, train(data="s3://")),
            ("train: backbone traversal", C.INVALID_ARGUMENT,
             train(backbone="../../../../etc/passwd")),
            ("train: backbone is a folder", C.INVALID_ARGUMENT, train(backbone="fm")),
            ("train: class folder not UTF-8", C.INVALID_ARGUMENT, train(data="hostile")),
            ("train: lr NaN", C.INVALID_ARGUMENT, train(lr=float("nan"))),
            ("train: lr inf", C.INVALID_ARGUMENT, train(lr=float("inf"))),
            ("train: lr negative", C.INVALID_ARGUMENT, train(lr=-1)),
            ("train: weight decay -1", C.INVALID_ARGUMENT, train(hyper={"weight_decay": -1})),
            ("train: batch size 0", C.INVALID_ARGUMENT, train(batch_size=0)),
            ("train: epochs -1", C.INVALID_ARGUMENT, train(epochs=-1)),
            ("train: epochs 1e9", C.INVALID_ARGUMENT, train(epochs=10**9)),
            ("train: batch size 2^20", C.INVALID_ARGUMENT, train(batch_size=1 << 20)),
            ("train: mode 7", C.INVALID_ARGUMENT, train(hyper={"mode": 7})),
            ("train: precision 9", C.INVALID_ARGUMENT, train(spec={"precision": 9})),
            ("train: device tpu", C.INVALID_ARGUMENT, train(spec={"device": "tpu"})),
            ("train: bad image share 2", C.INVALID_ARGUMENT,
             train(spec={"max_bad_image_share": 2})),
            ("train: input size 2^20", C.INVALID_ARGUMENT, train(spec={"input_size": 1 << 20})),
            ("train: unknown rule", C.INVALID_ARGUMENT, train(rules=[tf.rule("rm -rf")])),
            ("train: unknown rule parameter", C.INVALID_ARGUMENT,
             train(rules=[tf.rule("overfit", bogus=1)])),
            ("train: rule parameter NaN", C.INVALID_ARGUMENT,
             train(rules=[tf.rule("overfit", patience=float("nan"))])),
            ("train: register name traversal", C.INVALID_ARGUMENT,
             train(register_as="../../etc")),
            ("train: alias traversal", C.INVALID_ARGUMENT,
             train(register_as="ok", aliases=["../x"])),
            ("tune: max trials -1", C.INVALID_ARGUMENT, tune(setattrs(max_trials=-1))),
            ("tune: max trials 10^6", C.INVALID_ARGUMENT, tune(setattrs(max_trials=10**6))),
            ("tune: parallel -3", C.INVALID_ARGUMENT, tune(setattrs(max_parallel_trials=-3))),
            ("tune: eta 1", C.INVALID_ARGUMENT, tune(setattrs(early_stopping=True, eta=1))),
            ("tune: parameter traversal", C.INVALID_ARGUMENT,
             tune(lambda r: setattr(r.space[0], "name", "../x"))),
            ("tune: min > max", C.INVALID_ARGUMENT, tune(space(min=1, max=0.5))),
            ("tune: log scale from 0", C.INVALID_ARGUMENT, tune(space(min=0, scale=1))),
            ("tune: NaN bound", C.INVALID_ARGUMENT, tune(space(max=float("nan")))),
            ("tune: empty space", C.INVALID_ARGUMENT, tune(lambda r: r.space.pop())),
            ("tune: data traversal", C.INVALID_ARGUMENT,
             tune(lambda r: setattr(r.spec, "data", "../../etc"))),
            ("list jobs: limit -1", C.INVALID_ARGUMENT,
             lambda: trn.ListJobs(trainer_pb2.ListJobsRequest(limit=-1), timeout=10)),
            ("watch job: empty id", C.INVALID_ARGUMENT,
             lambda: list(trn.WatchJob(trainer_pb2.WatchJobRequest(job_id=""), timeout=10))),
            ("watch job: after -5", C.INVALID_ARGUMENT, lambda: list(trn.WatchJob(
                trainer_pb2.WatchJobRequest(job_id="x", after_sequence=-5), timeout=10))),
            ("get job: not a protobuf", C.INTERNAL, lambda: raw_get(b"\xff\xff\xff", timeout=10)),
        ]
        for job_id in ["../../etc/passwd", "/etc/passwd", "x" * 10000, "job-doesnotexist"]:
            cases += [
                (f"get job {job_id[:20]!r}", C.NOT_FOUND,
                 lambda j=job_id: trn.GetJob(trainer_pb2.GetJobRequest(job_id=j), timeout=10)),
                (f"watch job {job_id[:20]!r}", C.NOT_FOUND, lambda j=job_id: list(trn.WatchJob(
                    trainer_pb2.WatchJobRequest(job_id=j), timeout=10))),
                (f"cancel job {job_id[:20]!r}", C.NOT_FOUND, lambda j=job_id: trn.CancelJob(
                    trainer_pb2.CancelJobRequest(job_id=j), timeout=10)),
            ]
        self.sweep(led, cases)
        self.assert_all_up()
        jobs_after = led.call(trn.ListJobs, trainer_pb2.ListJobsRequest(limit=1000),
                              timeout=10)[0].jobs
        self.assertEqual([j.id for j in jobs_after], [j.id for j in jobs_before],
                         "a refused request left a job")
        dirs_after = sorted(os.listdir(os.path.join(self.tmp, "jobs"))) if os.path.isdir(
            os.path.join(self.tmp, "jobs")) else []
        self.assertEqual(dirs_after, dirs_before)
        self.assertFalse(os.path.exists("/etc/kennel-e2e"), "sanity")
        led.note("cases", len(cases))

    # ---- inference -----------------------------------------------------------

    def test_inference_rpcs(self):
        led = e2e.ledger(self)
        inf = self.inf
        rss_before = e2e.rss_bytes(self.inference.proc.pid)
        jpeg = e2e.image_bytes()
        R = inference_pb2.ClassifyRequest
        raw_classify = e2e.raw_unary(self.inference.addr, "/kennel.v1.Classifier/Classify")
        bad_utf8_type = R(image=jpeg, content_type="image/jpegXX").SerializeToString().replace(
            b"XX", b"\xff\xfe")
        rng = random.Random(3)
        requests = [
            ("empty image", C.INVALID_ARGUMENT, R(image=b"")),
            ("random bytes", C.INVALID_ARGUMENT, R(image=rng.randbytes(5000))),
            ("SVG text", C.INVALID_ARGUMENT, R(image=b"<svg xmlns='http://www.w3.org/2000/svg'/>")),
            ("GIF (unsupported)", C.INVALID_ARGUMENT, R(image=e2e.image_bytes(fmt="GIF"))),
            ("TIFF (unsupported)", C.INVALID_ARGUMENT, R(image=e2e.image_bytes(fmt="TIFF"))),
            ("JPEG magic then garbage", C.INVALID_ARGUMENT,
             R(image=b"\xff\xd8\xff\xe0" + rng.randbytes(3000))),
            ("JPEG cut in half", C.INVALID_ARGUMENT, R(image=jpeg[:len(jpeg) // 2])),
            ("JPEG without its end marker", C.INVALID_ARGUMENT, R(image=jpeg[:-2])),
            ("JPEG frame header of 0x0", C.INVALID_ARGUMENT,
             R(image=e2e.jpeg_with_dimensions(0, 0))),
            ("JPEG frame header claiming 65500x65500", C.INVALID_ARGUMENT,
             R(image=e2e.jpeg_with_dimensions(65500, 65500))),
            ("progressive JPEG claiming 65500x65500", C.INVALID_ARGUMENT,
             R(image=e2e.jpeg_with_dimensions(65500, 65500, progressive=True))),
            ("tiny PNG claiming 100000x100000", C.INVALID_ARGUMENT,
             R(image=e2e.png_with_dimensions(100000, 100000))),
            ("PNG claiming 6000x6000 with one row", C.INVALID_ARGUMENT,
             R(image=e2e.png_with_dimensions(6000, 6000))),
            ("PNG bomb 20000x20000 in 390 KB", C.INVALID_ARGUMENT, R(image=e2e.png_bomb(20000))),
            ("PNG cut short", C.INVALID_ARGUMENT, R(image=e2e.image_bytes(fmt="PNG")[:-20])),
            ("content type contradicts bytes", C.INVALID_ARGUMENT,
             R(image=jpeg, content_type="image/png")),
            ("content type traversal", C.INVALID_ARGUMENT,
             R(image=jpeg, content_type="../../etc/passwd")),
            ("content type 100 KB", C.INVALID_ARGUMENT,
             R(image=jpeg, content_type="image/" + "x" * 100000)),
            ("top_k -1", C.INVALID_ARGUMENT, R(image=jpeg, top_k=-1)),
            ("top_k INT_MIN", C.INVALID_ARGUMENT, R(image=jpeg, top_k=-2**31)),
            ("model ref traversal", C.INVALID_ARGUMENT, R(image=jpeg, model_ref="../../etc")),
            ("model ref of another model", C.NOT_FOUND, R(image=jpeg, model_ref="other")),
            ("model ref of another version", C.NOT_FOUND, R(image=jpeg, model_ref="m:9")),
            ("over --max-image-bytes", C.INVALID_ARGUMENT,
             R(image=jpeg + b"\0" * 1_200_000)),
            ("over the gRPC message limit", C.RESOURCE_EXHAUSTED, R(image=b"\0" * (17 << 20))),
        ]
        cases = [(what, code, lambda r=r: inf.Classify(r, timeout=20))
                 for what, code, r in requests]
        cases += [
            ("invalid UTF-8 content type", C.INTERNAL,
             lambda: raw_classify(bad_utf8_type, timeout=10)),
            ("not a protobuf", C.INTERNAL, lambda: raw_classify(b"\x12\xff\xff", timeout=10)),
            ("model status: not a protobuf", C.INTERNAL, lambda: e2e.raw_unary(
                self.inference.addr, "/kennel.v1.Classifier/GetModelStatus")(b"\xff",
                                                                              timeout=10)),
        ]
        self.sweep(led, cases)

        # The same requests over one stream: each answers with its own code
        # and the stream goes on to the good one at the end.
        streamed = [r for _, _, r in requests if r.ByteSize() < (16 << 20)]
        for i, r in enumerate(streamed):
            r.request_id = str(i)
        good = R(image=jpeg, request_id="good")
        answers, error = led.stream(inf.ClassifyStream, iter(streamed + [good]), timeout=60)
        self.assertIsNone(error, error and error.details())
        by_id = {a.request_id: a for a in answers}
        self.assertEqual(len(by_id), len(streamed) + 1)
        expected = [code for _, code, r in requests if r.ByteSize() < (16 << 20)]
        for i, code in enumerate(expected):
            a = by_id[str(i)]
            self.assertEqual(a.error_code, code.value[0], (requests[i][0], a.error_message))
            self.assertTrue(a.error_message)
            led.record(code)
        self.assertEqual(by_id["good"].error_code, 0)
        self.assertEqual(by_id["good"].model_version, 1)

        # Extremes that are allowed: top_k past the class count is capped.
        response = led.call(inf.Classify, R(image=jpeg, top_k=2**31 - 1), timeout=10)[0]
        self.assertEqual(len(response.predictions), 3)
        self.assert_all_up()
        status = inf.GetModelStatus(inference_pb2.GetModelStatusRequest(), timeout=5)
        self.assertTrue(status.ready)
        self.assertEqual(status.model_version, 1)
        grown = e2e.peak_rss_bytes(self.inference.proc.pid) - rss_before
        led.note("inference peak RSS growth during the sweep (MB)", round(grown / 2**20))
        self.assertLess(grown, 300 << 20, "a hostile image made inference allocate")
        led.note("cases", len(cases) + len(streamed))

    def test_versions_inference_cannot_serve_leave_the_good_one_serving(self):
        """Versions the registry stores but no model can serve: inference
        refuses each, keeps serving v1 and stays up."""
        led = e2e.ledger(self)
        reg = self.reg
        data = rc.random_bytes(2000, 5)
        model_bytes = rc.read(self.model)
        bad = {}

        def push(what, h, payload):
            response, error = led.call(reg.PushModel, rc.messages(h, payload), timeout=30)
            self.assertIsNone(error, error and error.details())
            bad[what] = response.model.version

        push("not TorchScript", rc.header("m", data, labels=["a", "b", "c"]), data)
        push("two labels for three outputs", rc.header("m", model_bytes, labels=["a", "b"]),
             model_bytes)
        # (Unusable preprocessing never gets this far: the registry refuses
        # it at the push, in the registry sweep.)
        try:
            for what, version in bad.items():
                led.call(reg.SetAlias, registry_pb2.SetAliasRequest(
                    name="m", alias="production", version=version), timeout=10)
                kt.wait_until(lambda v=version: self.inf.GetModelStatus(
                    inference_pb2.GetModelStatusRequest(), timeout=5).last_failed_version == v,
                    timeout=30, what=f"inference to refuse {what}")
                status = self.inf.GetModelStatus(inference_pb2.GetModelStatusRequest(),
                                                 timeout=5)
                self.assertTrue(status.ready, what)
                self.assertEqual(status.model_version, 1, what)
                self.assertTrue(status.last_error, what)
                response = led.call(self.inf.Classify, inference_pb2.ClassifyRequest(
                    image=e2e.image_bytes()), timeout=10)[0]
                self.assertEqual(response.model_version, 1, what)
                led.checked()
                self.assert_all_up()
        finally:
            reg.SetAlias(registry_pb2.SetAliasRequest(name="m", alias="production", version=1),
                         timeout=10)
            for version in bad.values():
                reg.DeleteVersion(registry_pb2.DeleteVersionRequest(name="m", version=version),
                                  timeout=10)


if __name__ == "__main__":
    e2e.main()
