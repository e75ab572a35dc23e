#!/usr/bin/python3
"""Exports a TorchScript feature extractor (a "backbone") for kennel-trainer.

The file maps a float batch [N, 3, S, S] (normalised, CHW, RGB) to features
[N, F] and carries two attributes the trainer reads:

  kennel_preprocessing: str  the kennel.v1.Preprocessing message as JSON
                             (proto field names)
  feature_dim: int           F

A sidecar "<out>.json" holds the same preprocessing JSON.

Architectures:
  resnet50   torchvision ResNet50 without its classifier, 2048 features,
             ImageNet preprocessing (resize 256, centre crop 224)
  resnet18   torchvision ResNet18, 512 features, ImageNet preprocessing
  small_cnn  four 3x3 convolutions with batch norm and a 256-wide dense layer,
             for 28x28 images such as Fashion-MNIST

Weights: --weights imagenet downloads torchvision's ImageNet weights (resnets
only) and fails if it cannot; --weights auto (the default) tries the download
and, when it is not possible (an offline machine), exports the same
architecture with random weights and says so; --weights random never
downloads.

A backbone can also come out of a trained model: --from-classifier takes a
TorchScript classifier written by kennel-trainer (its "backbone" submodule is
exported) and --from-checkpoint takes a state_dict saved from the chosen
--arch (keys of a final "fc" layer are ignored).

Run with Debian's interpreter: /usr/bin/python3 tools/export_backbone.py ...
"""

import argparse
import json
import socket
import sys

import torch
from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Fashion-MNIST pixel statistics on [0, 1]; the grey images are decoded as
# three equal channels.
FASHION_MEAN = [0.2860, 0.2860, 0.2860]
FASHION_STD = [0.3530, 0.3530, 0.3530]


def preprocessing_json(input_size, resize_mode, resize, mean, std):
    spec = {
        "input_size": input_size,
        "resize_mode": resize_mode,
        "resize": resize,
        "mean": mean,
        "std": std,
        "color_order": "COLOR_ORDER_RGB",
    }
    return json.dumps(spec, sort_keys=True)


class SmallCnn(nn.Module):
    """A small CNN for 28x28 images: 2 x (conv-bn-relu, conv-bn-relu, pool)."""

    def __init__(self, feature_dim=256):
        super().__init__()

        def block(cin, cout):
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.fc1 = nn.Linear(64 * 7 * 7, feature_dim)
        self.bn1 = nn.BatchNorm1d(feature_dim)

    def forward(self, x):
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return torch.relu(self.bn1(self.fc1(x)))


class Backbone(nn.Module):
    """Wraps a feature network and carries the attributes Kennel reads."""

    kennel_preprocessing: str
    feature_dim: int

    def __init__(self, net, preprocessing, feature_dim):
        super().__init__()
        self.net = net
        self.kennel_preprocessing = preprocessing
        self.feature_dim = feature_dim

    def forward(self, x):
        return self.net(x)


def build(arch, weights):
    """Returns (network, preprocessing JSON, feature dim, weights used)."""
    if arch == "small_cnn":
        if weights == "imagenet":
            sys.exit("export_backbone: small_cnn has no ImageNet weights; use "
                     "--weights random")
        pre = preprocessing_json(28, "RESIZE_MODE_STRETCH", 28, FASHION_MEAN,
                                 FASHION_STD)
        return SmallCnn(256), pre, 256, "random"

    import torchvision

    ctor = {"resnet50": torchvision.models.resnet50,
            "resnet18": torchvision.models.resnet18}[arch]
    enum = {"resnet50": torchvision.models.ResNet50_Weights,
            "resnet18": torchvision.models.ResNet18_Weights}[arch]
    used = "random"
    net = None
    if weights in ("imagenet", "auto"):
        socket.setdefaulttimeout(30)
        try:
            net = ctor(weights=enum.IMAGENET1K_V1)
            used = "imagenet"
        except Exception as e:  # offline, proxy refused, bad download...
            if weights == "imagenet":
                sys.exit(f"export_backbone: could not download ImageNet "
                         f"weights for {arch}: {e}")
            print(f"export_backbone: NOTE: ImageNet weights for {arch} could "
                  f"not be downloaded ({type(e).__name__}: {e}); exporting "
                  f"the same architecture with RANDOM weights. Features from "
                  f"it carry no ImageNet knowledge.", file=sys.stderr)
    if net is None:
        net = ctor(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    pre = preprocessing_json(224, "RESIZE_MODE_SHORTER_SIDE_THEN_CROP", 256,
                             IMAGENET_MEAN, IMAGENET_STD)
    return net, pre, dim, used


def feature_dim_of(module, input_size):
    with torch.no_grad():
        out = module(torch.zeros(2, 3, input_size, input_size))
    if out.dim() != 2 or out.shape[0] != 2:
        sys.exit(f"export_backbone: the backbone returns shape "
                 f"{tuple(out.shape)}; a feature extractor must return [N, F]")
    return int(out.shape[1])


def from_classifier(path):
    """The "backbone" submodule of a Kennel TorchScript classifier."""
    model = torch.jit.load(path, map_location="cpu")
    names = [name for name, _ in model.named_children()]
    if "backbone" not in names:
        sys.exit(f"export_backbone: {path} has no 'backbone' submodule "
                 f"(submodules: {names}); is it a Kennel classifier?")
    backbone = model.backbone
    pre = None
    for holder in (backbone, model):
        if hasattr(holder, "kennel_preprocessing"):
            pre = holder.kennel_preprocessing
            break
    if pre is None:
        sys.exit(f"export_backbone: {path} carries no kennel_preprocessing "
                 f"attribute")
    return backbone, pre


def main():
    parser = argparse.ArgumentParser(
        description="Export a TorchScript feature extractor for kennel-trainer.")
    parser.add_argument("--arch", choices=["resnet50", "resnet18", "small_cnn"],
                        default="resnet50")
    parser.add_argument("--weights", choices=["auto", "imagenet", "random"],
                        default="auto")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds random weights (default 0)")
    parser.add_argument("--from-classifier", metavar="PT",
                        help="export the backbone of this TorchScript "
                        "classifier instead of a fresh architecture")
    parser.add_argument("--from-checkpoint", metavar="PTH",
                        help="load this state_dict into --arch before export")
    parser.add_argument("--out", required=True, help="TorchScript file to write")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.from_classifier:
        inner, pre = from_classifier(args.from_classifier)
        inner.eval()
        size = json.loads(pre)["input_size"]
        dim = feature_dim_of(inner, size)
        used = "from classifier " + args.from_classifier
        if hasattr(inner, "feature_dim") and hasattr(inner, "kennel_preprocessing"):
            scripted = inner
        else:
            scripted = torch.jit.script(Backbone(inner, pre, dim))
    else:
        net, pre, dim, used = build(args.arch, args.weights)
        if args.from_checkpoint:
            state = torch.load(args.from_checkpoint, map_location="cpu")
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                sys.exit(f"export_backbone: checkpoint does not fit {args.arch}: "
                         f"missing {missing}, unexpected {unexpected}")
            used = "checkpoint " + args.from_checkpoint
        net.eval()
        scripted = torch.jit.script(Backbone(net, pre, dim))
    scripted.eval()
    size = json.loads(pre)["input_size"]
    got = feature_dim_of(scripted, size)
    if got != dim:
        sys.exit(f"export_backbone: feature width {got} != declared {dim}")
    torch.jit.save(scripted, args.out)
    with open(args.out + ".json", "w") as f:
        f.write(pre + "\n")
    print(json.dumps({"out": args.out, "arch": args.arch, "weights": used,
                      "feature_dim": dim, "preprocessing": json.loads(pre)}))


if __name__ == "__main__":
    main()
