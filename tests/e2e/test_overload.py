"""Overload: kennel-inference offered several times what it can serve, at a
steady rate (open loop, as real clients arrive), then offered less.

Capacity is measured first, on this machine, in the same run. Under
overload the server sheds the excess with RESOURCE_EXHAUSTED (nothing else
fails), keeps serving about its capacity, keeps the p99 latency of the
requests it accepts bounded by what its queue can hold, and its memory
stays bounded; its peak RSS (VmHWM from /proc) is reported. When the load
drops it serves every request at once, at its normal latency.
"""

import tempfile
import threading
import time
import unittest

import e2e_lib as e2e
from e2e_lib import kt

import grpc
from kennel.v1 import inference_pb2

MAX_BATCH = 4
MAX_QUEUE = 8
OVERLOAD = 4.0  # times capacity
OVERLOAD_SECONDS = 6.0


class OpenLoop:
    """Sends requests at `rate` per second for `seconds` without waiting for
    answers; collects (code, latency) per request."""

    def __init__(self, led, stub, image, rate, seconds, deadline=10):
        self.results = []
        self.lock = threading.Lock()
        self.pending = threading.Semaphore(0)
        sent = 0
        start = time.perf_counter()
        while True:
            now = time.perf_counter()
            if now - start >= seconds:
                break
            due = start + sent / rate
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            future = stub.Classify.future(inference_pb2.ClassifyRequest(image=image),
                                          timeout=deadline)
            future.add_done_callback(lambda f, t0=t0: self._done(led, f, t0))
            sent += 1
        self.sent = sent
        self.offered_rate = sent / (time.perf_counter() - start)
        for _ in range(sent):
            if not self.pending.acquire(timeout=deadline + 5):
                raise AssertionError("a request never completed")

    def _done(self, led, future, t0):
        latency = time.perf_counter() - t0
        code = future.code()
        led.record(code)
        with self.lock:
            self.results.append((code, latency))
        self.pending.release()

    def latencies(self, code=grpc.StatusCode.OK):
        return [lat for c, lat in self.results if c == code]

    def count(self, code):
        return sum(1 for c, _ in self.results if c == code)


class OverloadTest(unittest.TestCase):
    def test_inference_at_four_times_capacity(self):
        led = e2e.ledger(self)
        tmp = tempfile.mkdtemp(prefix="kennel-e2e-overload-")
        model = e2e.models(r18=dict(classes=10, size=96, kind="resnet18"))["r18"]
        server = kt.Service("inference", f"--model-path={model}", "--precision=fp32",
                            "--threads=1", f"--max-batch-size={MAX_BATCH}",
                            f"--max-queue={MAX_QUEUE}", "--max-queue-delay=2ms",
                            workdir=tmp).start()
        self.addCleanup(server.kill)
        e2e.wait_serving(server.addr, timeout=120)
        stub = e2e.classifier_stub(server.addr)
        image = e2e.image_bytes(96, 96)
        pid = server.proc.pid

        # Capacity: enough clients to keep every batch full, for 3 s.
        done = []
        stop = time.time() + 3
        lock = threading.Lock()

        def closed_loop():
            local = e2e.classifier_stub(server.addr)
            while time.time() < stop:
                t0 = time.perf_counter()
                _, err = led.call(local.Classify, inference_pb2.ClassifyRequest(image=image),
                                  timeout=10)
                with lock:
                    done.append((err.code() if err else grpc.StatusCode.OK,
                                 time.perf_counter() - t0))
        threads = [threading.Thread(target=closed_loop) for _ in range(MAX_BATCH)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual({c for c, _ in done}, {grpc.StatusCode.OK})
        capacity = len(done) / 3
        light_p50 = e2e.percentile([lat for _, lat in done], 50)
        rss_before = e2e.rss_bytes(pid)

        # Overload, with the server's memory sampled as it runs.
        rss_samples = []
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                rss_samples.append(e2e.rss_bytes(pid))
                time.sleep(0.05)
        sampler = threading.Thread(target=sample)
        sampler.start()
        heavy = OpenLoop(led, stub, image, OVERLOAD * capacity, OVERLOAD_SECONDS)
        sampling.set()
        sampler.join()
        peak = e2e.peak_rss_bytes(pid)

        ok = heavy.count(grpc.StatusCode.OK)
        shed = heavy.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        accepted = heavy.latencies()
        p50, p99 = e2e.percentile(accepted, 50), e2e.percentile(accepted, 99)
        # An accepted request waits at most for the queue ahead of it and
        # its own batch: (queue + batch) / capacity, a quarter of a second
        # here. Allow 5x that, and no less than 1.5 s, for a shared machine;
        # an unbounded queue would reach 10 s and more in this run.
        bound = max(1.5, 5 * (MAX_QUEUE + MAX_BATCH) / capacity)
        led.note("capacity (req/s, closed loop, 4 clients)", round(capacity, 1))
        led.note("offered under overload (req/s)", round(heavy.offered_rate, 1))
        led.note("served under overload (req/s)", round(ok / OVERLOAD_SECONDS, 1))
        led.note("shed under overload", f"{shed} of {heavy.sent}")
        led.note("accepted latency under overload p50/p99 (ms)",
                 f"{p50 * 1000:.0f}/{p99 * 1000:.0f} (bound {bound * 1000:.0f})")
        led.note("RSS before/peak during overload (MB)",
                 f"{rss_before / 2**20:.0f}/{max(rss_samples) / 2**20:.0f}")
        led.note("peak RSS over the whole run, VmHWM (MB)", round(peak / 2**20))

        self.assertGreater(heavy.offered_rate, 2.5 * capacity,
                           "the client could not offer enough load")
        self.assertEqual({c for c, _ in heavy.results},
                         {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED})
        self.assertGreater(shed, heavy.sent / 3, "hardly anything was shed")
        self.assertGreater(ok / OVERLOAD_SECONDS, 0.6 * capacity,
                           "serving collapsed under overload")
        self.assertLess(p99, bound)
        self.assertLess(max(rss_samples) - rss_before, 200 << 20)
        self.assertIsNone(server.proc.poll())

        # The load drops to half of capacity: everything is served at once.
        light = OpenLoop(led, stub, image, 0.5 * capacity, 3)
        self.assertEqual(light.count(grpc.StatusCode.OK), light.sent,
                         {c.name for c, _ in light.results})
        first = [lat for _, lat in light.results[:10]]
        light_p99 = e2e.percentile(light.latencies(), 99)
        led.note("latency after the load dropped p50/p99 (ms)",
                 f"{e2e.percentile(light.latencies(), 50) * 1000:.0f}/{light_p99 * 1000:.0f}")
        self.assertLess(max(first), max(0.5, 5 * light_p50))
        self.assertLess(light_p99, bound)
        self.assertIn("queue_full", server.scrape())


if __name__ == "__main__":
    e2e.main()
