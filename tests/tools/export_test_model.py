#!/usr/bin/python3
"""Writes a TorchScript classifier that follows Kennel's artifact contract,
for tests and benchmarks: forward(x[N,3,S,S]) -> logits[N,C] in fp32, with
`labels: List[str]` and `kennel_preprocessing: str` (JSON) attributes.

Weights are random (seeded): tests need the contract, not accuracy.
"""
import argparse
import json
from typing import List

import torch
import torchvision


class Classifier(torch.nn.Module):
    labels: List[str]
    kennel_preprocessing: str

    def __init__(self, net, labels, preprocessing):
        super().__init__()
        self.net = net
        self.labels = labels
        self.kennel_preprocessing = json.dumps(preprocessing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny(num_classes):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
        torch.nn.Linear(8 * 16, num_classes))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--labels", default="", help="comma-separated; default class0..")
    p.add_argument("--size", type=int, default=32, help="input side in pixels")
    p.add_argument("--kind", choices=["tiny", "resnet18", "resnet50"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    labels = args.labels.split(",") if args.labels else [
        f"class{i}" for i in range(args.classes)]
    if len(labels) != args.classes:
        p.error("--labels must name --classes labels")
    if args.kind == "tiny":
        net = tiny(args.classes)
        preprocessing = {"input_size": args.size, "resize_mode": "RESIZE_MODE_STRETCH",
                         "resize": args.size, "mean": [0.5, 0.5, 0.5],
                         "std": [0.25, 0.25, 0.25]}
    else:
        net = getattr(torchvision.models, args.kind)(weights=None, num_classes=args.classes)
        preprocessing = {"input_size": args.size, "resize": max(args.size, args.size * 8 // 7),
                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model = Classifier(net.eval(), labels, preprocessing).eval()
    scripted = torch.jit.script(model)
    scripted.save(args.out)
    with open(args.out + ".json", "w") as f:
        json.dump({"labels": labels, "preprocessing": preprocessing}, f)


if __name__ == "__main__":
    main()
