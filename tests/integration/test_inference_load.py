"""Bounded load on kennel-inference at concurrency 1, 8 and 32, with a queue
small enough that 32 clients overload it: every answer is OK or
RESOURCE_EXHAUSTED (never another error), the rejections match the
queue_full counter, the process stays up and healthy, and it serves
normally once the load stops."""
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
from grpc_std import health_pb2  # noqa: E402
from grpc_std import health_pb2_grpc  # noqa: E402

SECONDS_PER_LEVEL = float(os.environ.get("KENNEL_LOAD_SECONDS", "4"))


def images():
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(640, 480), (320, 240), (800, 600), (200, 300)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


class LoadTest(unittest.TestCase):

    def test_overload_only_answers_resource_exhausted(self):
        tmp = tempfile.mkdtemp(prefix="kennel-inference-load-")
        self.addCleanup(shutil.rmtree, tmp, True)
        model = kt.export_test_model(os.path.join(tmp, "r18.pt"), num_classes=10,
                                     size=64, kind="resnet18")
        server = kt.Service("inference", f"--model-path={model}", "--precision=fp32",
                            "--max-batch-size=2", "--max-queue=4",
                            "--max-queue-delay=1ms", workdir=tmp).start()
        self.addCleanup(server.stop)
        stub = pb_grpc.ClassifierStub(kt.channel(server.addr))
        kt.wait_until(lambda: stub.GetModelStatus(pb.GetModelStatusRequest(),
                                                  timeout=5).ready,
                      timeout=120, what="the model to load")
        data = images()
        totals = {}
        for concurrency in (1, 8, 32):
            codes = {}
            lock = threading.Lock()
            stop = time.time() + SECONDS_PER_LEVEL

            def client(i):
                local = pb_grpc.ClassifierStub(kt.channel(server.addr))
                n = i
                while time.time() < stop:
                    try:
                        local.Classify(pb.ClassifyRequest(image=data[n % len(data)]),
                                       timeout=60)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        code = e.code()
                    n += 1
                    with lock:
                        codes[code] = codes.get(code, 0) + 1

            threads = [threading.Thread(target=client, args=(i,))
                       for i in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            totals[concurrency] = codes
            ok = codes.get(grpc.StatusCode.OK, 0)
            print(f"concurrency {concurrency}: {ok / SECONDS_PER_LEVEL:.1f} ok/s, "
                  f"{dict((c.name, n) for c, n in codes.items())}", file=sys.stderr)
            self.assertLessEqual(set(codes), {grpc.StatusCode.OK,
                                              grpc.StatusCode.RESOURCE_EXHAUSTED},
                                 f"concurrency {concurrency}: {codes}")
            self.assertGreater(ok, 0)
            self.assertIsNone(server.proc.poll(), "the server died under load")

        self.assertNotIn(grpc.StatusCode.RESOURCE_EXHAUSTED, totals[1])
        self.assertGreater(totals[32].get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0), 0,
                           "32 clients against a queue of 4 never overflowed it")
        rejected = sum(c.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
                       for c in totals.values())
        metrics = server.scrape()
        m = re.search(r'kennel_inference_requests_rejected_total\{reason="queue_full"\} (\S+)',
                      metrics)
        self.assertEqual(float(m.group(1)), rejected)
        health = health_pb2_grpc.HealthStub(kt.channel(server.addr))
        self.assertEqual(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status,
                         health_pb2.HealthCheckResponse.SERVING)
        self.assertEqual(len(stub.Classify(pb.ClassifyRequest(image=data[0]),
                                           timeout=30).predictions), 5)


if __name__ == "__main__":
    kt.main()
