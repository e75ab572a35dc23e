"""What the reliability suite's scenarios share.

Each scenario script keeps a Ledger per test: every request it sends and
the status code it got, the versions it checked and anything it found lost.
`main()` runs the script's tests, prints the script's table and writes the
ledgers to RESULTS_DIR, where summary.py reads them for the suite's table.

The servers, the CLI and the generated stubs come from the integration
tests' kennel_testlib (tests/integration/), and so do the registry's raw
push helpers and the trainer's data sets.
"""

import collections
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import kennel_testlib as kt  # noqa: E402
import test_registry_common as rc  # noqa: E402,F401  (re-exported for the scenarios)

import grpc  # noqa: E402
from kennel.v1 import (inference_pb2, inference_pb2_grpc,  # noqa: E402
                       registry_pb2_grpc, trainer_pb2_grpc)

RESULTS_DIR = os.environ.get("KENNEL_E2E_RESULTS",
                             os.path.join(kt.BUILD_DIR, "tests", "e2e", "results"))
OK = "OK"


class Ledger:
    """What one scenario did. Thread-safe: load generators share one."""

    _all = []

    def __init__(self, scenario):
        self.scenario = scenario
        self.requests = 0
        self.codes = collections.Counter()
        self.versions_checked = 0
        self.lost = []
        self.notes = {}
        self._lock = threading.Lock()
        Ledger._all.append(self)

    def record(self, code, n=1):
        name = code if isinstance(code, str) else code.name
        with self._lock:
            self.requests += n
            self.codes[name] += n

    def call(self, fn, *args, **kwargs):
        """Calls a gRPC method; returns (response, None) or (None, RpcError)
        and records the code either way."""
        try:
            response = fn(*args, **kwargs)
        except grpc.RpcError as e:
            self.record(e.code())
            return None, e
        self.record(OK)
        return response, None

    def stream(self, fn, *args, **kwargs):
        """Drains a server-streaming call; returns (messages, None|RpcError)."""
        messages = []
        try:
            for m in fn(*args, **kwargs):
                messages.append(m)
        except grpc.RpcError as e:
            self.record(e.code())
            return messages, e
        self.record(OK)
        return messages, None

    def checked(self, n=1):
        with self._lock:
            self.versions_checked += n

    def lose(self, what):
        with self._lock:
            self.lost.append(what)

    def note(self, key, value):
        with self._lock:
            self.notes[key] = value

    def as_dict(self):
        with self._lock:
            return {"scenario": self.scenario, "requests": self.requests,
                    "codes": dict(self.codes), "versions_checked": self.versions_checked,
                    "lost": list(self.lost), "notes": dict(self.notes)}


def ledger(test):
    """The Ledger of a running unittest test, named script.test."""
    script = os.path.splitext(os.path.basename(sys.modules["__main__"].__file__))[0]
    name = test.id().split(".")[-1]
    if name.startswith("test_"):
        name = name[5:]
    return Ledger(f"{script.removeprefix('test_')}.{name}")


def expect_code(testcase, led, code, fn, *args, what="", need_message=True, **kwargs):
    """Calls fn and asserts it fails with `code` and (unless need_message is
    false) a message; returns the error."""
    response, error = led.call(fn, *args, **kwargs)
    testcase.assertIsNotNone(error, f"{what}: expected {code.name}, got a response")
    testcase.assertEqual(error.code(), code, f"{what}: {error.details()}")
    if need_message:
        testcase.assertTrue(error.details(), f"{what}: {code.name} without a message")
    return error


# ---- stubs -----------------------------------------------------------------

def registry_stub(addr):
    return registry_pb2_grpc.ModelRegistryStub(kt.channel(addr))


def classifier_stub(addr):
    return inference_pb2_grpc.ClassifierStub(kt.channel(addr))


def trainer_stub(addr):
    return trainer_pb2_grpc.TrainerStub(kt.channel(addr))


def raw_unary(addr, method):
    """A unary method that sends bytes as they are, so a test can put on the
    wire what no generated stub would (invalid UTF-8 in a string field)."""
    return kt.channel(addr).unary_unary(method, request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)


def raw_stream_unary(addr, method):
    return kt.channel(addr).stream_unary(method, request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)


# ---- processes ---------------------------------------------------------------

def peak_rss_bytes(pid):
    """VmHWM (peak resident set) of a live process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def start_registry(tmp, *args, name="registry", **kwargs):
    workdir = os.path.join(tmp, name)
    os.makedirs(workdir, exist_ok=True)
    return kt.Service("registry", f"--storage=file://{workdir}/store", *args,
                      workdir=workdir, **kwargs).start()


def start_inference(tmp, registry_addr, ref, *args, name="inference", **kwargs):
    workdir = os.path.join(tmp, name)
    os.makedirs(workdir, exist_ok=True)
    return kt.Service("inference", f"--registry={registry_addr}", f"--model={ref}",
                      f"--cache-dir={workdir}/cache", "--threads=1", *args,
                      workdir=workdir, **kwargs).start()


def push_model(registry_addr, name, path, *args, size=32, check=True):
    """Pushes a TorchScript file through the CLI with the preprocessing the
    tiny test models take; returns the version number."""
    result = kt.kennel("models", "push", name, "--file", path, "--input-size", size,
                       "--resize", size, "--json", *args, addr=registry_addr, check=check)
    if result.returncode != 0:
        return None
    return int(json.loads(result.stdout)["version"])


def wait_serving(addr, version=None, timeout=60):
    """Waits until inference reports ready (on `version` if given); returns the status."""
    stub = classifier_stub(addr)

    def ready():
        s = stub.GetModelStatus(inference_pb2.GetModelStatusRequest(), timeout=5)
        return s if s.ready and (version is None or s.model_version == version) else None
    return kt.wait_until(ready, timeout=timeout, what=f"inference to serve version {version}")


# ---- shared inputs ---------------------------------------------------------------

FIXTURES_DIR = os.environ.get("KENNEL_E2E_FIXTURES",
                              os.path.join(kt.BUILD_DIR, "tests", "e2e", "fixtures"))
_EXPORT = os.path.join(kt.SOURCE_DIR, "tests", "tools", "export_test_model.py")


def _publish(tmp_path, path):
    """Moves a finished input into place; another script may have won the race."""
    try:
        os.rename(tmp_path, path)
    except OSError:
        if not os.path.exists(path):
            raise
        shutil.rmtree(tmp_path, ignore_errors=True)


def models(**specs):
    """Test classifiers (tests/tools/export_test_model.py) made once and
    shared by every scenario: name=dict(classes=, size=, kind=, seed=).
    The missing ones are exported in one Python process, since importing
    torch is most of the cost. Returns {name: path}; treat them as read-only."""
    os.makedirs(FIXTURES_DIR, exist_ok=True)
    paths = {}
    todo = []
    for name, spec in specs.items():
        key = "model-{kind}-c{classes}-s{size}-seed{seed}.pt".format(
            kind=spec.get("kind", "tiny"), classes=spec.get("classes", 3),
            size=spec.get("size", 32), seed=spec.get("seed", 0))
        paths[name] = os.path.join(FIXTURES_DIR, key)
        if not os.path.exists(paths[name]):
            staging = tempfile.mkdtemp(dir=FIXTURES_DIR, prefix=".export-")
            todo.append((os.path.join(staging, key), paths[name], staging, spec))
    if todo:
        argvs = [[_EXPORT, "--out", out, "--classes", str(spec.get("classes", 3)),
                  "--size", str(spec.get("size", 32)), "--kind", spec.get("kind", "tiny"),
                  "--seed", str(spec.get("seed", 0))] for out, _, _, spec in todo]
        code = ("import runpy, sys\n"
                f"for argv in {argvs!r}:\n"
                "    sys.argv = argv\n"
                "    runpy.run_path(argv[0], run_name='__main__')\n")
        subprocess.run([kt.PYTHON, "-c", code], check=True, capture_output=True, timeout=300)
        for out, final, staging, _ in todo:
            try:
                os.rename(out, final)
            except OSError:
                if not os.path.exists(final):
                    raise
            shutil.rmtree(staging, ignore_errors=True)
    return paths


def data_root(tmp, per_class):
    """A private copy, under tmp, of a trainer data root holding a
    Fashion-MNIST image folder `fm` (per_class images per class and split)
    and the small CNN backbone `small_cnn.pt`, made once by the trainer's
    integration fixtures and shared."""
    import trainer_fixtures as tf
    shared = os.path.join(FIXTURES_DIR, f"fashion-mnist-{per_class}")
    if not os.path.isdir(shared):
        os.makedirs(FIXTURES_DIR, exist_ok=True)
        staging = tempfile.mkdtemp(dir=FIXTURES_DIR, prefix=".root-")
        built = tf.make_root(staging, per_class=per_class)
        _publish(built, shared)
        shutil.rmtree(staging, ignore_errors=True)
    root = os.path.join(tmp, "root")
    shutil.copytree(shared, root)
    return root


# ---- images --------------------------------------------------------------------

def image_bytes(w=64, h=48, fmt="JPEG", color=(120, 30, 200), **save):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, fmt, **save)
    return buf.getvalue()


def _png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_with_dimensions(width, height, rows=1):
    """A well-formed PNG header claiming width x height, with only `rows`
    rows of (zero) pixel data: what a decompression bomb's header looks like."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    raw = zlib.compress(b"\x00" * ((width + 1) * rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw)
            + _png_chunk(b"IEND", b""))


def png_bomb(side=20000):
    """A real PNG of side x side black pixels (side^2 bytes when decoded)
    that compresses to a few hundred KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


def jpeg_with_dimensions(width, height, progressive=False):
    """A small real JPEG whose frame header (SOF) is rewritten to claim
    width x height: the decoder would allocate for the claim."""
    data = bytearray(image_bytes(16, 16, progressive=progressive))
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, "malformed JPEG from PIL"
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


# ---- statistics ----------------------------------------------------------------

def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))
    return values[k]


# ---- running a scenario script ---------------------------------------------------

def _test_name(test):
    """The test method's name; for a failure outside any test (setUpClass),
    its description, which holds a parenthesis."""
    test = getattr(test, "test_case", test)  # a subTest belongs to its test
    tid = test.id()
    return tid if "(" in tid else tid.split(".")[-1]


def _outcomes(result):
    out = {}
    for test, _ in result.skipped:
        out[_test_name(test)] = "SKIP"
    for test, _ in result.failures + result.errors:
        out[_test_name(test)] = "FAIL"
    return out


def format_table(rows):
    """Rows of scenario dicts (with 'result') as a fixed-width table."""
    header = ["scenario", "result", "seconds", "requests", "errors by code", "versions",
              "lost"]
    lines = []
    totals = collections.Counter()
    total_codes = collections.Counter()
    body = []
    for r in rows:
        codes = {k: v for k, v in r["codes"].items() if k != OK}
        codes_text = ", ".join(f"{k}={v}" for k, v in sorted(codes.items())) or "-"
        body.append([r["scenario"], r["result"], f"{r.get('seconds', 0):.0f}",
                     str(r["requests"]), codes_text, str(r["versions_checked"]),
                     str(len(r["lost"]))])
        totals["requests"] += r["requests"]
        totals["versions"] += r["versions_checked"]
        totals["lost"] += len(r["lost"])
        totals[r["result"]] += 1
        total_codes.update(r["codes"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines.append(line(header))
    lines.append(line(["-" * w for w in widths]))
    for b in body:
        lines.append(line(b))
    lines.append(line(["-" * w for w in widths]))
    runs = ", ".join(f"{k.lower()} {totals[k]}" for k in ("PASS", "FAIL", "SKIP")
                     if totals[k])
    codes = {k: v for k, v in total_codes.items() if k != OK}
    lines.append(f"scenarios: {len(rows)} ({runs}); requests: {totals['requests']} "
                 f"({total_codes[OK]} OK); versions checked: {totals['versions']}; "
                 f"lost: {totals['lost']}")
    lines.append("errors by code: " + (", ".join(
        f"{k}={v}" for k, v in sorted(codes.items())) or "none"))
    return "\n".join(lines)


class _TimedResult(unittest.TextTestResult):
    """Remembers how long each test took."""
    seconds = {}

    def startTest(self, test):
        self._started = time.time()
        super().startTest(test)

    def stopTest(self, test):
        _TimedResult.seconds[_test_name(test)] = time.time() - self._started
        super().stopTest(test)


def main():
    """Runs the calling script's tests, prints its table, saves its ledgers."""
    module = sys.modules["__main__"]
    loader = unittest.defaultTestLoader
    names = [a for a in sys.argv[1:] if not a.startswith("-")]
    suite = (loader.loadTestsFromNames(names, module) if names
             else loader.loadTestsFromModule(module))
    started = time.time()
    result = unittest.TextTestRunner(verbosity=2, resultclass=_TimedResult).run(suite)
    outcomes = _outcomes(result)
    rows = []
    for led in Ledger._all:
        d = led.as_dict()
        name = "test_" + led.scenario.split(".", 1)[1]
        d["result"] = outcomes.get(name, "PASS")
        d["seconds"] = round(_TimedResult.seconds.get(name, 0), 1)
        if d["lost"] and d["result"] == "PASS":
            d["result"] = "FAIL"
        rows.append(d)
    script = os.path.splitext(os.path.basename(module.__file__))[0]
    for key, status in outcomes.items():
        if "(" in key:  # setUpClass or setUpModule failed
            rows.append({"scenario": f"{script.removeprefix('test_')}.setup", "result": status,
                         "requests": 0, "codes": {}, "versions_checked": 0, "lost": [],
                         "notes": {"error": key}, "seconds": 0})
    seconds = time.time() - started
    for r in rows:
        r["script_seconds"] = round(seconds, 1)
    print(f"\n{script}: {seconds:.1f} s\n" + format_table(rows))
    for r in rows:
        for k, v in sorted(r["notes"].items()):
            print(f"  {r['scenario']}: {k} = {v}")
        for what in r["lost"]:
            print(f"  {r['scenario']}: LOST {what}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, script + ".json"), "w") as f:
        json.dump({"script": script, "seconds": seconds, "scenarios": rows}, f, indent=1)
    if not result.wasSuccessful():
        sys.exit(1)
    if result.testsRun and len(result.skipped) == result.testsRun:
        sys.exit(kt.SKIP)
    sys.exit(0)
