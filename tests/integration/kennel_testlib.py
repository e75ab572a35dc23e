"""Shared machinery for Kennel's integration tests.

Starts the real binaries on free loopback ports, runs the `kennel` command
line, and exposes the Python stubs generated from proto/ at build time. Tests
run under ctest, which sets KENNEL_BUILD_DIR and KENNEL_SOURCE_DIR; run by hand
they fall back to ./build next to the sources.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

SOURCE_DIR = os.environ.get(
    "KENNEL_SOURCE_DIR",
    os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILD_DIR = os.environ.get("KENNEL_BUILD_DIR", os.path.join(SOURCE_DIR, "build"))
PYTHON = "/usr/bin/python3"

# Generated stubs: kennel.v1.*_pb2(_grpc) and grpc_std.{health,reflection}_pb2.
sys.path.insert(0, os.path.join(BUILD_DIR, "python"))

SKIP = 77  # ctest's SKIP_RETURN_CODE

BINARIES = {
    "registry": "services/registry/kennel-registry",
    "trainer": "services/trainer/kennel-trainer",
    "inference": "services/inference/kennel-inference",
    "kennel": "services/cli/kennel",
}

_LISTEN_RE = re.compile(
    r"listening on ([0-9.]+|\[[0-9a-f:]+\]):(\d+) .*?metrics (?:on (\S+)|off)")


def binary(name):
    """Absolute path of a built binary: 'registry', 'trainer', 'inference', 'kennel'."""
    path = os.path.join(BUILD_DIR, BINARIES.get(name, name))
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is not built")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One running Kennel server process.

    Its stderr goes to a log file in `workdir`; start() waits for the line in
    which the server reports the ports it bound. Use as a context manager, or
    call stop() / kill(); a forgotten process is killed at exit.
    """

    _all = []

    def __init__(self, kind, *args, workdir=None, env=None, metrics=True,
                 listen="127.0.0.1:0"):
        self.kind = kind
        self.args = list(args)
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"kennel-{kind}-")
        self.env = dict(os.environ, **(env or {}))
        self.metrics = metrics
        self.listen = listen
        self.proc = None
        self.port = None
        self.metrics_port = None
        self.log_path = None
        self._log_offset = 0

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self):
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout=30, wait_ready=True):
        cmd = [binary(self.kind), f"--listen={self.listen}",
               "--metrics-listen=" + ("127.0.0.1:0" if self.metrics else "off")]
        cmd += self.args
        self.log_path = os.path.join(self.workdir, f"{self.kind}.log")
        log = open(self.log_path, "ab")
        self._log_offset = log.tell()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.workdir)
        log.close()
        Service._all.append(self)
        if not wait_ready:
            return self
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = _LISTEN_RE.search(self.log()[0:])
            if m:
                self.port = int(m.group(2))
                metrics = m.group(3)
                if metrics:
                    self.metrics_port = int(metrics.split(":")[1].split("/")[0])
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.proc.returncode} during start-up:\n"
                    + self.log())
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{self.kind} did not report its port in {timeout}s:\n"
                           + self.log())

    def log(self):
        """What this run of the process has logged so far."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def wait_for_log(self, pattern, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.kind} never logged /{pattern}/:\n" + self.log())

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Sends `sig` and returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self):
        """kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *extra_args, timeout=30):
        """Starts the same binary again with the same arguments (new ports
        unless `listen` names fixed ones)."""
        self.stop()
        self.args += list(extra_args)
        return self.start(timeout=timeout)

    def scrape(self):
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @classmethod
    def stop_all(cls):
        for s in cls._all:
            with contextlib.suppress(Exception):
                s.kill()


import atexit  # noqa: E402
atexit.register(Service.stop_all)


def kennel(*args, addr=None, check=False, timeout=120, input=None, env=None):
    """Runs the `kennel` CLI; returns the CompletedProcess (text mode)."""
    cmd = [binary("kennel")] + [str(a) for a in args]
    if addr:
        cmd.append(f"--addr={addr}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            input=input, env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def channel(addr, **kwargs):
    import grpc
    options = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    return grpc.insecure_channel(addr, options=options, **kwargs)


def wait_until(predicate, timeout=30, interval=0.1, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # the thing may not be up yet
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def require(tool, why):
    """Skips the test (exit 77) when an external tool is missing."""
    if shutil.which(tool) is None:
        print(f"SKIP: {tool} is not installed; {why}", file=sys.stderr)
        sys.exit(SKIP)


def export_test_model(path, num_classes=3, size=32, kind="tiny", seed=0, labels=None):
    """Writes a TorchScript classifier following Kennel's artifact contract
    (fp32 logits, `labels` and `kennel_preprocessing` attributes), using
    tools/export_test_model.py; returns its path."""
    cmd = [PYTHON, os.path.join(SOURCE_DIR, "tests", "tools", "export_test_model.py"),
           "--out", path, "--classes", str(num_classes), "--size", str(size),
           "--kind", kind, "--seed", str(seed)]
    if labels:
        cmd += ["--labels", ",".join(labels)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return path


def main():
    """unittest.main with verbose output; ctest shows it on failure."""
    unittest.main(verbosity=2)
