#!/usr/bin/python3
"""Accuracy proofs on real data (Debian's Fashion-MNIST), on the real
binaries: kennel-registry, kennel-trainer and the kennel CLI.

1. Fine-tune: the small CNN (tools/export_backbone.py --arch small_cnn,
   random initialisation) fine-tuned on all ten classes through
   `kennel train --mode finetune` (Adam, lr 0.002, batch 128, half of the
   images augmented each epoch: --unaugmented-share 0.5). Claim: test
   accuracy >= 0.90.
2. Transfer, the real workflow in miniature: fine-tune the small CNN on
   classes 0-4 and register it; export its backbone from the registered
   classifier (tools/export_backbone.py --from-classifier); train a head in
   head mode on classes 5-9 on that frozen backbone, and the same head on
   the randomly initialised backbone. Claim: the trained backbone is clearly
   better (by at least 0.05 test accuracy).
3. Precision: the transfer head job again with the backbone pass in fp32 and
   in bf16: feature-pass time and test accuracy of each.

Full run (about an hour on two cores):

    /usr/bin/python3 tests/proofs/fashion_mnist_proofs.py --report proofs.json

--quick runs the same steps on 100 images per class and split with one or
two epochs and checks only that everything works and the trained backbone
beats the random one; `make test` runs it (ctest name: proofs_quick).
Splits: train = the first 50,000 training images, valid = the last 10,000,
test = the 10,000 t10k images (see `kennel dataset --help`).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "integration"))
import kennel_testlib as kt  # noqa: E402
import trainer_fixtures as tf  # noqa: E402


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_cli(trainer, *args, timeout):
    """Runs `kennel train`; returns (completed metrics line values, stdout)."""
    start = time.time()
    result = kt.kennel("train", *args, addr=trainer.addr, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"kennel train {' '.join(map(str, args))} failed:\n"
                           f"{result.stdout}\n{result.stderr}")
    m = re.search(r"test accuracy (\d\.\d+) \(loss (\d+\.\d+)\)", result.stdout)
    ref = re.search(r"registered (\S+)", result.stdout)
    features = re.search(r"features (\d+\.\d+) s", result.stdout)
    epochs = re.findall(r"epoch +(\d+)/\d+ .*valid loss (\d+\.\d+) acc (\d\.\d+)",
                        result.stdout)
    return {
        "test_accuracy": float(m.group(1)),
        "test_loss": float(m.group(2)),
        "model_ref": ref.group(1) if ref else "",
        "feature_seconds": float(features.group(1)) if features else None,
        "valid_accuracy_per_epoch": [float(a) for _, _, a in epochs],
        "minutes": (time.time() - start) / 60,
    }, result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small data, few epochs: checks the steps, not the claims")
    parser.add_argument("--work", default="", help="working folder (default: a temp dir)")
    parser.add_argument("--finetune-epochs", type=int, default=12)
    parser.add_argument("--transfer-epochs", type=int, default=3)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--unaugmented-share", type=float, default=0.5,
                        help="fine-tune: share of training images kept whole (the rest "
                        "get a random resized crop and flip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-finetune", action="store_true",
                        help="only the transfer and precision proofs")
    parser.add_argument("--report", default="", help="write the figures as JSON here")
    args = parser.parse_args()

    quick = args.quick
    per_class = 100 if quick else 0
    ft_epochs = 2 if quick else args.finetune_epochs
    transfer_epochs = 2 if quick else args.transfer_epochs
    head_epochs = 5 if quick else args.head_epochs
    work = args.work or tempfile.mkdtemp(prefix="kennel-proofs-")
    root = os.path.join(work, "root")
    os.makedirs(root, exist_ok=True)
    report = {"quick": quick, "threads": args.threads,
              "split": "train: first 50,000 training images; valid: last 10,000; "
                       "test: the 10,000 t10k images"}
    if per_class:
        report["images_per_class_and_split"] = per_class

    log(f"data sets under {root}")
    for name, classes in (("fashion", None), ("fashion04", [0, 1, 2, 3, 4]),
                          ("fashion59", [5, 6, 7, 8, 9])):
        if not os.path.exists(os.path.join(root, name)):
            cmd = ["dataset", "fashion-mnist", os.path.join(root, name)]
            if per_class:
                cmd += ["--limit", per_class]
            if classes:
                cmd += ["--classes", ",".join(map(str, classes))]
            kt.kennel(*cmd, check=True, timeout=300)
    tf.export_small_cnn(root)

    registry, trainer = tf.start_servers(work, root, extra=[f"--threads={args.threads}"])
    try:
        common = ["--batch-size", "128", "--seed", "1"]
        if not args.skip_finetune:
            log(f"proof 1: fine-tune the small CNN on all ten classes, {ft_epochs} epochs")
            result, out = train_cli(trainer, "--data", "fashion", "--backbone", "small_cnn.pt",
                                    "--mode", "finetune", "--lr", "0.002",
                                    "--unaugmented-share", args.unaugmented_share,
                                    "--epochs", ft_epochs, "--register-as", "fashion-cnn",
                                    *common, timeout=6 * 3600)
            print(out, flush=True)
            result["epochs"] = ft_epochs
            result["unaugmented_share"] = args.unaugmented_share
            report["finetune"] = result
            log(f"fine-tune: test accuracy {result['test_accuracy']:.4f} after {ft_epochs} "
                f"epochs, {result['minutes']:.1f} min")

        log(f"proof 2: transfer; fine-tune on classes 0-4 ({transfer_epochs} epochs)")
        source, out = train_cli(trainer, "--data", "fashion04", "--backbone", "small_cnn.pt",
                                "--mode", "finetune", "--lr", "0.002",
                                "--unaugmented-share", args.unaugmented_share,
                                "--epochs", transfer_epochs, "--register-as", "fashion-04",
                                *common, timeout=6 * 3600)
        print(out, flush=True)
        classifier = os.path.join(work, "fashion-04.pt")
        tf.pull_model(registry.addr, source["model_ref"], classifier)
        export = subprocess.run([kt.PYTHON, os.path.join(kt.SOURCE_DIR, "tools",
                                                         "export_backbone.py"),
                                 "--from-classifier", classifier,
                                 "--out", os.path.join(root, "backbone04.pt")],
                                capture_output=True, text=True, timeout=300)
        if export.returncode != 0:
            raise RuntimeError(export.stderr)
        heads = {}
        for name, backbone, precision in (("trained", "backbone04.pt", "fp32"),
                                          ("random", "small_cnn.pt", "fp32"),
                                          ("trained_bf16", "backbone04.pt", "bf16")):
            log(f"head mode on classes 5-9, {name} backbone, {precision}")
            heads[name], out = train_cli(trainer, "--data", "fashion59", "--backbone", backbone,
                                         "--mode", "head", "--lr", "0.003",
                                         "--epochs", head_epochs, "--precision", precision,
                                         *common, timeout=3600)
            print(out, flush=True)
        report["transfer"] = {
            "source_classes": "0-4", "target_classes": "5-9",
            "source_finetune": dict(source, epochs=transfer_epochs),
            "head_epochs": head_epochs,
            "trained_backbone_test_accuracy": heads["trained"]["test_accuracy"],
            "random_backbone_test_accuracy": heads["random"]["test_accuracy"],
        }
        report["precision"] = {
            "fp32_test_accuracy": heads["trained"]["test_accuracy"],
            "bf16_test_accuracy": heads["trained_bf16"]["test_accuracy"],
            "fp32_feature_seconds": heads["trained"]["feature_seconds"],
            "bf16_feature_seconds": heads["trained_bf16"]["feature_seconds"],
        }
    finally:
        trainer.stop()
        registry.stop()

    print(json.dumps(report, indent=1))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)

    failures = []
    t = report["transfer"]
    margin = t["trained_backbone_test_accuracy"] - t["random_backbone_test_accuracy"]
    if margin < 0.05:
        failures.append(f"transfer: trained backbone {t['trained_backbone_test_accuracy']:.4f} "
                        f"is not clearly better than random "
                        f"{t['random_backbone_test_accuracy']:.4f}")
    if "finetune" in report:
        acc = report["finetune"]["test_accuracy"]
        want = 0.5 if quick else 0.90
        if acc < want:
            failures.append(f"fine-tune: test accuracy {acc:.4f} < {want}")
    if failures:
        print("PROOF FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("proofs hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
