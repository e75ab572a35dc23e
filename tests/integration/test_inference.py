"""kennel-inference serving a local TorchScript file (--model-path), over the
real binary: answers match PyTorch on the same image, bad input is refused
with INVALID_ARGUMENT and counted, limits hold, the metrics carry the names
the dashboards use, `kennel classify` prints the answers, and a file that
cannot serve stops the process with a clear message."""
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

sys.path.insert(0, os.path.dirname(__file__))
import kennel_testlib as kt  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from kennel.v1 import inference_pb2 as pb  # noqa: E402
from kennel.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from grpc_std import health_pb2  # noqa: E402
from grpc_std import health_pb2_grpc  # noqa: E402

LABELS = ["ant", "bee", "cat", "dog", "eel"]


def photo(width, height, seed):
    """A photo-like picture: smooth colour fields plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(1, 5, 2) * 2 * np.pi
        img[..., c] = np.sin(fx * x / width + fy * y / height + rng.uniform(0, 6))
    img = (img + 1) * 100 + rng.normal(0, 8, img.shape) + 20
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(width, height):
    """A few dozen bytes of PNG whose header claims width x height."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def start_inference(workdir, *args):
    return kt.Service("inference", *args, workdir=workdir).start()


def wait_ready(service, timeout=60):
    stub = pb_grpc.ClassifierStub(kt.channel(service.addr))
    return kt.wait_until(
        lambda: (lambda s: s if s.ready else None)(
            stub.GetModelStatus(pb.GetModelStatusRequest(), timeout=5)),
        timeout=timeout, what="the model to load")


class LocalModelTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-inference-test-")
        cls.model_path = kt.export_test_model(
            os.path.join(cls.tmp, "tiny.pt"), num_classes=5, size=32, seed=3)
        cls.labels_path = os.path.join(cls.tmp, "labels.txt")
        with open(cls.labels_path, "w") as f:
            f.write("\n".join(LABELS) + "\n")
        cls.server = start_inference(
            cls.tmp, f"--model-path={cls.model_path}",
            f"--labels={cls.labels_path}", "--precision=fp32",
            "--max-image-bytes=2000000", "--max-pixels=4000000",
            "--max-batch-size=4", "--tune-batch-size=false")
        cls.status = wait_ready(cls.server)
        cls.stub = pb_grpc.ClassifierStub(kt.channel(cls.server.addr))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def classify(self, data, **kw):
        return self.stub.Classify(pb.ClassifyRequest(image=data, **kw), timeout=30)

    def python_reference(self, image):
        """Softmax scores from PyTorch: torch.jit.load plus torchvision's
        transforms for the model's preprocessing (stretch to 32, mean 0.5,
        std 0.25)."""
        model = torch.jit.load(self.model_path).eval()
        tf = transforms.Compose([
            transforms.Resize((32, 32)), transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.25] * 3)])
        with torch.no_grad():
            logits = model(tf(image.convert("RGB")).unsqueeze(0))[0]
        return torch.softmax(logits, 0).numpy()

    def test_status_reports_the_local_file(self):
        s = self.status
        self.assertTrue(s.ready)
        self.assertEqual(s.model_name, "tiny")
        self.assertEqual(list(s.labels), LABELS)
        self.assertTrue(s.model_digest.startswith("sha256:"))
        self.assertEqual(s.preprocessing.input_size, 32)
        self.assertEqual(s.precision, 1)  # PRECISION_FP32, as asked
        self.assertGreater(s.load_seconds, 0)
        health = health_pb2_grpc.HealthStub(kt.channel(self.server.addr))
        self.assertEqual(
            health.Check(health_pb2.HealthCheckRequest(service="kennel.v1.Classifier"),
                         timeout=5).status,
            health_pb2.HealthCheckResponse.SERVING)

    def test_answers_match_pytorch_on_the_same_image(self):
        for fmt, image in [("PNG", photo(300, 200, 1)), ("PNG", photo(50, 70, 2)),
                           ("BMP", photo(64, 64, 3))]:
            response = self.classify(encode(image, fmt), top_k=5)
            expected = self.python_reference(image)
            self.assertEqual(len(response.predictions), 5)
            for p in response.predictions:
                self.assertEqual(p.label, LABELS[p.index])
                self.assertAlmostEqual(p.score, expected[p.index], delta=1e-4)
            self.assertEqual(response.predictions[0].index, int(np.argmax(expected)))
            self.assertEqual(response.model_digest, self.status.model_digest)

    def test_jpeg_and_webp_are_served(self):
        for fmt, kw in [("JPEG", {"quality": 90}), ("WEBP", {"lossless": True})]:
            response = self.classify(encode(photo(640, 480, 4), fmt, **kw), top_k=2)
            self.assertEqual(len(response.predictions), 2)
            self.assertGreater(response.timings.total_us, 0)

    def test_bad_input_is_invalid_argument_and_the_process_stays_up(self):
        jpeg = encode(photo(200, 150, 5), "JPEG")
        bad = {
            "empty": dict(image=b""),
            "text": dict(image=b"hello, this is not an image"),
            "truncated jpeg": dict(image=jpeg[: len(jpeg) // 2]),
            "truncated png": dict(image=encode(photo(200, 150, 5), "PNG")[:300]),
            "gif": dict(image=encode(photo(20, 20, 6), "GIF")),
            "content type contradicts": dict(image=jpeg, content_type="image/png"),
            "unsupported content type": dict(image=jpeg, content_type="text/html"),
            "declares 100000x100000": dict(image=png_declaring(100000, 100000)),
            "over --max-image-bytes": dict(image=jpeg + b"\0" * 2_000_000),
            "over --max-pixels": dict(image=encode(
                Image.new("RGB", (2500, 2000)), "JPEG")),
        }
        before = self.server.scrape()
        for name, request in bad.items():
            with self.assertRaises(grpc.RpcError, msg=name) as caught:
                self.stub.Classify(pb.ClassifyRequest(**request), timeout=30)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                             f"{name}: {caught.exception.details()}")
            self.assertTrue(caught.exception.details(), name)
        self.assertIsNone(self.server.proc.poll())
        self.assertEqual(len(self.classify(jpeg).predictions), 5)
        after = self.server.scrape()

        def rejected(text, reason):
            m = re.search(r'kennel_inference_requests_rejected_total\{reason="%s"\} (\S+)'
                          % reason, text)
            return float(m.group(1)) if m else 0.0
        self.assertEqual(rejected(after, "bad_image") - rejected(before, "bad_image"), 7)
        self.assertEqual(rejected(after, "too_large") - rejected(before, "too_large"), 3)

    def test_unknown_model_ref_is_not_found(self):
        with self.assertRaises(grpc.RpcError) as caught:
            self.classify(encode(photo(40, 40, 7), "PNG"), model_ref="dogbreed@production")
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(len(self.classify(encode(photo(40, 40, 7), "PNG"),
                                           model_ref="tiny").predictions), 5)

    def test_stream_pipelines_many_images(self):
        data = encode(photo(120, 90, 8), "PNG")
        requests = [pb.ClassifyRequest(image=data if i % 7 else b"junk",
                                       request_id=str(i)) for i in range(50)]
        answers = {int(r.request_id): r for r in
                   self.stub.ClassifyStream(iter(requests), timeout=60)}
        self.assertEqual(sorted(answers), list(range(50)))
        for i, r in answers.items():
            if i % 7:
                self.assertEqual(r.error_code, 0, r.error_message)
                self.assertEqual(len(r.predictions), 5)
            else:
                self.assertEqual(r.error_code, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        self.assertGreater(max(r.timings.batch_size for r in answers.values()), 1)

    def test_metrics_carry_the_contract_names(self):
        self.classify(encode(photo(64, 48, 9), "PNG"))
        text = self.server.scrape()
        for name in [
                'kennel_inference_latency_seconds_bucket{stage="decode"',
                'kennel_inference_latency_seconds_bucket{stage="queue"',
                'kennel_inference_latency_seconds_bucket{stage="model"',
                'kennel_inference_latency_seconds_bucket{stage="total"',
                "kennel_inference_batch_size_bucket",
                "kennel_inference_queue_depth ",
                "kennel_inference_model_ready 1",
                'kennel_inference_model_loads_total{result="success"} 1',
                'kennel_inference_model_loads_total{result="failure"} 0',
                'kennel_inference_requests_rejected_total{reason="queue_full"}',
                'kennel_inference_requests_rejected_total{reason="deadline"}',
                'kennel_grpc_server_handled_total{grpc_code="OK",grpc_method="Classify"',
                "process_resident_memory_bytes"]:
            self.assertIn(name, text)
        info = re.search(r"kennel_inference_model_info\{([^}]*)\} 1", text)
        self.assertIsNotNone(info, text)
        self.assertIn('name="tiny"', info.group(1))
        self.assertIn('precision="fp32"', info.group(1))
        self.assertIn(f'digest="{self.status.model_digest}"', info.group(1))
        if shutil.which("promtool"):
            check = subprocess.run(["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True, timeout=30)
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    def test_cli_prints_labels_scores_and_version(self):
        png = os.path.join(self.tmp, "pic.png")
        photo(100, 80, 10).save(png)
        jpg = os.path.join(self.tmp, "pic.jpg")
        photo(100, 80, 11).save(jpg)
        out = kt.kennel("classify", png, jpg, "--top-k", "3", addr=self.server.addr,
                        check=True)
        self.assertIn("LABEL", out.stdout)
        self.assertTrue(any(label in out.stdout for label in LABELS))
        self.assertIn("tiny:0", out.stdout)
        js = kt.kennel("classify", png, "--json", addr=self.server.addr, check=True)
        parsed = json.loads(js.stdout)
        self.assertEqual(parsed[0]["image"], png)
        self.assertEqual(len(parsed[0]["result"]["predictions"]), 5)
        broken = os.path.join(self.tmp, "broken.jpg")
        with open(broken, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not really")
        failed = kt.kennel("classify", png, broken, addr=self.server.addr)
        self.assertEqual(failed.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", failed.stderr)
        self.assertEqual(kt.kennel("classify", addr=self.server.addr).returncode, 2)
        # Files that cannot be read say why; the readable one is still answered.
        missing = os.path.join(self.tmp, "missing.jpg")
        failed = kt.kennel("classify", self.tmp, missing, png, addr=self.server.addr)
        self.assertEqual(failed.returncode, 1)
        self.assertIn(f"{self.tmp}: is a folder", failed.stderr)
        self.assertIn("cannot read the file: No such file or directory", failed.stderr)
        self.assertIn("pic.png", failed.stdout)


class UnservableFileTest(unittest.TestCase):
    """A local file that cannot serve ends the process with a message."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kennel-inference-bad-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def run_to_exit(self, *args):
        service = kt.Service("inference", *args, workdir=self.tmp, metrics=False)
        service.start(wait_ready=False)
        self.addCleanup(service.kill)
        code = service.proc.wait(60)
        return code, service.log()

    def test_not_torchscript(self):
        path = os.path.join(self.tmp, "model.pt")
        with open(path, "wb") as f:
            f.write(b"this is not a zip archive")
        code, log = self.run_to_exit(f"--model-path={path}")
        self.assertEqual(code, 1, log)
        self.assertIn("not a usable TorchScript module", log)

    def test_label_count_differs_from_the_output_width(self):
        path = kt.export_test_model(os.path.join(self.tmp, "m.pt"), num_classes=4)
        labels = os.path.join(self.tmp, "labels.txt")
        with open(labels, "w") as f:
            f.write("a\nb\nc\n")
        code, log = self.run_to_exit(f"--model-path={path}", f"--labels={labels}")
        self.assertEqual(code, 1, log)
        self.assertIn("outputs 4 values per image but has 3 labels", log)

    def test_bad_flags_are_usage_errors(self):
        code, log = self.run_to_exit("--precision=fp16", "--model-path=x.pt")
        self.assertEqual(code, 2, log)
        code, log = self.run_to_exit("--model=dogs")
        self.assertEqual(code, 2, log)
        self.assertIn("--registry", log)


class Bf16Test(unittest.TestCase):
    """ResNet18 through the real LibTorch path, in bf16 where the CPU has it."""

    def test_resnet18_serves_in_the_precision_the_cpu_allows(self):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
        tmp = tempfile.mkdtemp(prefix="kennel-inference-r18-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = kt.export_test_model(os.path.join(tmp, "r18.pt"), num_classes=10,
                                    size=96, kind="resnet18", seed=1)
        server = start_inference(tmp, f"--model-path={path}", "--precision=auto",
                                 "--bf16-min-agreement=0.5", "--max-batch-size=4")
        self.addCleanup(server.stop)
        status = wait_ready(server, timeout=180)
        self.assertEqual(status.precision, 2 if has_bf16 else 1, status)
        if has_bf16:
            self.assertGreaterEqual(status.bf16_agreement, 0.5)
        stub = pb_grpc.ClassifierStub(kt.channel(server.addr))
        image = photo(160, 120, 12)
        response = stub.Classify(pb.ClassifyRequest(image=encode(image, "PNG"), top_k=3),
                                 timeout=60)
        self.assertEqual(response.precision, status.precision)
        # The fp32 reference from PyTorch agrees on the top class.
        model = torch.jit.load(path).eval()
        tf = transforms.Compose([
            transforms.Resize(109), transforms.CenterCrop(96), transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        with torch.no_grad():
            expected = torch.softmax(model(tf(image).unsqueeze(0))[0], 0)
        self.assertEqual(response.predictions[0].index, int(expected.argmax()))
        tolerance = 0.05 if has_bf16 else 1e-4
        self.assertAlmostEqual(response.predictions[0].score,
                               float(expected.max()), delta=tolerance)


if __name__ == "__main__":
    kt.main()
