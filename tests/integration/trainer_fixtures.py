"""Data sets, backbones and servers the trainer's integration tests share.

A small Fashion-MNIST image folder (written by `kennel dataset`), a small CNN
backbone (tools/export_backbone.py) and odd backbones made on purpose: one
whose features are scaled to almost nothing (vanishing gradients), one that
returns the wrong shape, and a file that is not TorchScript."""

import os
import subprocess

import kennel_testlib as kt

import grpc
from kennel.v1 import common_pb2, registry_pb2, registry_pb2_grpc, trainer_pb2, trainer_pb2_grpc

_ODD_BACKBONES = r'''
import sys, torch
from torch import nn

class Tiny(nn.Module):
    """Wraps a backbone and scales its features by 1e-12."""
    kennel_preprocessing: str
    feature_dim: int
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.kennel_preprocessing = inner.kennel_preprocessing
        self.feature_dim = inner.feature_dim
    def forward(self, x):
        return self.inner(x) * 1e-12

class Spatial(nn.Module):
    """Returns a feature map [N, C, H, W] instead of [N, F]."""
    kennel_preprocessing: str
    def __init__(self, pre):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.kennel_preprocessing = pre
    def forward(self, x):
        return self.conv(x)

inner = torch.jit.load(sys.argv[1])
torch.jit.save(torch.jit.script(Tiny(inner)), sys.argv[2])
torch.jit.save(torch.jit.script(Spatial(inner.kennel_preprocessing)), sys.argv[3])
'''


def make_root(tmp, per_class=10, classes=None, name="fm"):
    """A data root holding a Fashion-MNIST folder and the small CNN backbone.
    Returns the root path."""
    root = os.path.join(tmp, "root")
    os.makedirs(root, exist_ok=True)
    args = ["dataset", "fashion-mnist", os.path.join(root, name), "--limit", per_class]
    if classes:
        args += ["--classes", ",".join(str(c) for c in classes)]
    kt.kennel(*args, check=True, timeout=120)
    export_small_cnn(root)
    return root


def export_small_cnn(root):
    """Writes root/small_cnn.pt (random weights, seed 1) unless it exists."""
    backbone = os.path.join(root, "small_cnn.pt")
    if not os.path.exists(backbone):
        subprocess.run([kt.PYTHON, os.path.join(kt.SOURCE_DIR, "tools", "export_backbone.py"),
                        "--arch", "small_cnn", "--weights", "random", "--seed", "1",
                        "--out", backbone], check=True, capture_output=True, timeout=300)
    return backbone


def make_odd_backbones(root):
    """Writes tiny.pt (features x 1e-12), spatial.pt (wrong output shape) and
    not_torchscript.pt (text) under root."""
    # TorchScript reads the classes' source, so the script must be a file.
    script = os.path.join(os.path.dirname(root), "odd_backbones.py")
    with open(script, "w") as f:
        f.write(_ODD_BACKBONES)
    subprocess.run([kt.PYTHON, script, os.path.join(root, "small_cnn.pt"),
                    os.path.join(root, "tiny.pt"), os.path.join(root, "spatial.pt")],
                   check=True, capture_output=True, timeout=300)
    with open(os.path.join(root, "not_torchscript.pt"), "w") as f:
        f.write("this is not a TorchScript archive\n")


def start_servers(tmp, root, registry=True, extra=()):
    """Starts a registry (optional) and a trainer; returns (registry, trainer)."""
    reg = None
    args = [f"--data-root={root}", f"--cache-dir={tmp}/cache", f"--jobs-dir={tmp}/jobs",
            "--threads=2"] + list(extra)
    if registry:
        reg = kt.Service("registry", f"--storage=file://{tmp}/store", workdir=tmp,
                         metrics=False).start()
        args.append(f"--registry={reg.addr}")
    trainer = kt.Service("trainer", *args, workdir=tmp).start(timeout=60)
    return reg, trainer


def train_request(data="fm", backbone="small_cnn.pt", mode="head", lr=0.01, batch_size=32,
                  epochs=3, seed=1, register_as="", aliases=(), rules=(), precision=None):
    r = trainer_pb2.TrainRequest()
    r.spec.data = data
    r.spec.backbone = backbone
    r.spec.register_as = register_as
    r.spec.aliases.extend(aliases)
    if precision is not None:
        r.spec.precision = precision
    for rule in rules:
        r.spec.rules.add().CopyFrom(rule)
    h = r.hyperparameters
    h.learning_rate = lr
    h.batch_size = batch_size
    h.epochs = epochs
    h.seed = seed
    h.mode = common_pb2.TRAIN_MODE_FINETUNE if mode == "finetune" else common_pb2.TRAIN_MODE_HEAD
    return r


def rule(name, action="warn", **params):
    c = trainer_pb2.RuleConfig(name=name)
    c.action = trainer_pb2.RULE_ACTION_STOP if action == "stop" else trainer_pb2.RULE_ACTION_WARN
    for k, v in params.items():
        c.params[k] = v
    return c


def train(stub, request, timeout=300):
    """Runs Train to the end; returns the events."""
    return list(stub.Train(request, timeout=timeout))


def pull_model(registry_addr, ref, path):
    """Downloads the model component of `ref` into `path`; returns the manifest."""
    stub = registry_pb2_grpc.ModelRegistryStub(kt.channel(registry_addr))
    header = None
    data = bytearray()
    for msg in stub.PullModel(registry_pb2.PullModelRequest(ref=ref), timeout=120):
        if msg.HasField("header"):
            header = msg.header
        else:
            assert msg.chunk.component == 0
            assert msg.chunk.offset == len(data)
            data += msg.chunk.data
    with open(path, "wb") as f:
        f.write(bytes(data))
    return header


def trainer_stub(trainer):
    return trainer_pb2_grpc.TrainerStub(kt.channel(trainer.addr))


def code_of(call):
    """The gRPC status code a streaming call ends with."""
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""
