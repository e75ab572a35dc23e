"""Helpers the registry integration tests share (no tests here): raw PushModel streams
through the generated Python stubs, digests, and random artifacts."""

import hashlib
import os
import json
import random
import subprocess
import threading

import kennel_testlib as kt  # noqa: F401  (puts the stubs on sys.path)

import grpc
from kennel.v1 import common_pb2, registry_pb2, registry_pb2_grpc

CHUNK = 1 << 20


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


ZIP_MAGIC = b"PK\x03\x04"


def random_bytes(size, seed):
    """Random bytes that start like a zip archive (as TorchScript files do),
    so `kennel models push` takes them."""
    data = random.Random(seed).randbytes(size)
    return ZIP_MAGIC[:size] + data[len(ZIP_MAGIC):]


def random_file(path, size, seed):
    with open(path, "wb") as f:
        f.write(random_bytes(size, seed))
    return path


def stub(addr):
    return registry_pb2_grpc.ModelRegistryStub(kt.channel(addr))


def header(name, data, labels=("a", "b"), size=None, digest_value=None):
    h = registry_pb2.PushHeader(name=name, labels=list(labels))
    h.components.add(role=common_pb2.COMPONENT_ROLE_MODEL,
                     digest=digest_value or digest(data),
                     size=len(data) if size is None else size)
    return h


def messages(h, data, upto=None, pause=None):
    """Yields a push: the header, then `data` in 1 MiB chunks. With `pause`
    (a pair of threading.Events) it sets the first after `upto` bytes and
    waits for the second before sending the rest; with `upto` alone it stops
    there (a truncated push)."""
    yield registry_pb2.PushModelRequest(header=h)
    offset = 0
    while offset < len(data):
        if upto is not None and offset >= upto:
            if pause is None:
                return
            reached, go_on = pause
            reached.set()
            go_on.wait(60)
            pause = None
            upto = None
        piece = data[offset:offset + CHUNK]
        yield registry_pb2.PushModelRequest(
            chunk=common_pb2.Chunk(component=0, offset=offset, data=piece))
        offset += len(piece)


def push_raw(addr, h, data, timeout=60, **kwargs):
    """Pushes through the raw stub; returns (response or None, grpc error or None)."""
    try:
        response = stub(addr).PushModel(messages(h, data, **kwargs), timeout=timeout)
        return response, None
    except grpc.RpcError as e:
        return None, e


class PushInBackground:
    """A push that stops after `upto` bytes until released, so a test can
    act on the registry mid-push."""

    def __init__(self, addr, h, data, upto, metadata=None):
        self.reached = threading.Event()
        self.go_on = threading.Event()
        self.result = None
        self.error = None

        def run():
            try:
                self.result = stub(addr).PushModel(
                    messages(h, data, upto=upto, pause=(self.reached, self.go_on)),
                    timeout=120, metadata=metadata)
            except grpc.RpcError as e:
                self.error = e
            finally:
                self.reached.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def release(self):
        self.go_on.set()
        self.thread.join(120)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def staged_files(store):
    staging = os.path.join(store, ".staging")
    if not os.path.isdir(staging):
        return []
    return [n for n in os.listdir(staging) if n.startswith(".write-")]


def check_concurrent_pushes(test, paths):
    """Pushes every file in paths to model "conc" at once, each with its own
    `kennel models push`, and checks that each got its own version and that
    every version pulls back the bytes that were pushed."""
    procs = [subprocess.Popen([kt.binary("kennel"), "models", "push", "conc", "--file", p,
                               "--json", f"--addr={test.registry.addr}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in paths]
    versions = {}
    for p, proc in zip(paths, procs):
        out, err = proc.communicate(timeout=120)
        test.assertEqual(proc.returncode, 0, err)
        versions[int(json.loads(out)["version"])] = p
    test.assertEqual(sorted(versions), list(range(1, len(paths) + 1)))
    for version, path in versions.items():
        dest = os.path.join(test.tmp, f"conc-out-{version}.pt")
        test.cli("pull", f"conc:{version}", "-o", dest, check=True)
        test.assertEqual(file_digest(dest), file_digest(path), f"conc:{version}")
