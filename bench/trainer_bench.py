#!/usr/bin/python3
"""Trainer benchmark on a dogImages-sized generated set with ResNet50.

Generates photo-sized JPEGs (6,680 / 835 / 836 in 133 classes by default;
--train/--valid/--test make it smaller), exports ResNet50 with
tools/export_backbone.py (random weights when ImageNet's cannot be
downloaded: the compute is the same), then, for each --precisions entry, runs
bench/trainer_bench (C++, one process) for:

  raw forward          backbone on ready tensors, the ceiling
  extraction           head mode's feature pass through the real pipeline
                       (goal: >= 0.9 of the raw forward)
  cached pass          the same pass again, all cache hits
  head epoch           seconds per epoch on the cached features, and on a
                       set of the full 6,680 x 2,048 size
  fine-tune            images/s of Kennel's fine-tuning

and a Python PyTorch fine-tune loop on the same TorchScript model and the
same images (PIL decode, torchvision RandomResizedCrop + flip, DataLoader
with --threads workers, Adam), for the fine-tune ratio (goal: >= 1).

    python3 bench/trainer_bench.py [--train 640 --valid 80 --test 80]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

SOURCE = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

PY_FINETUNE = r'''
import json, os, sys, time, torch
from PIL import Image
from torchvision import transforms
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
root = args["train_dir"]
files = []
for label, folder in enumerate(sorted(os.listdir(root))):
    for name in sorted(os.listdir(os.path.join(root, folder))):
        files.append((os.path.join(root, folder, name), label))
files = files[:args["images"]]
pre = json.loads(open(args["backbone"] + ".json").read())
tf = transforms.Compose([
    transforms.RandomResizedCrop(pre["input_size"]),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(pre["mean"], pre["std"])])
class Files(torch.utils.data.Dataset):
    def __len__(self): return len(files)
    def __getitem__(self, i):
        path, label = files[i]
        return tf(Image.open(path).convert("RGB")), label
loader = torch.utils.data.DataLoader(Files(), batch_size=args["batch"], shuffle=True,
                                     num_workers=args["threads"], drop_last=False)
backbone = torch.jit.load(args["backbone"])
backbone.train()
head = torch.nn.Linear(backbone.feature_dim, args["classes"])
params = list(backbone.parameters()) + list(head.parameters())
for p in params: p.requires_grad_(True)
opt = torch.optim.Adam(params, lr=1e-4)
start = time.time(); seen = 0
for x, y in loader:
    if len(y) < 2: continue
    loss = torch.nn.functional.cross_entropy(head(backbone(x)), y)
    opt.zero_grad(); loss.backward(); opt.step()
    seen += len(y)
elapsed = time.time() - start
print(json.dumps({"images": seen, "seconds": elapsed, "images_per_second": seen / elapsed}))
'''


def generate(root, counts, classes, seed=0):
    """Photo-sized JPEGs: smooth colour fields with shapes and noise, sizes
    from 400x300 to 1024x768, a class-dependent palette."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    for split, count in counts.items():
        for i in range(count):
            label = i % classes
            folder = os.path.join(root, split, f"{label + 1:03d}.Breed_{label + 1}")
            os.makedirs(folder, exist_ok=True)
            w = rng.randint(400, 1024)
            h = rng.randint(300, 768)
            base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256],
                            np.float32)
            gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
            img = base + 60 * np.sin(gx / rng.uniform(20, 90))[..., None] \
                + 60 * np.cos(gy / rng.uniform(20, 90))[..., None]
            img += nrng.normal(0, 12, (h, w, 3))
            im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(im)
            for _ in range(6):
                x0, y0 = rng.randint(0, w - 50), rng.randint(0, h - 50)
                draw.ellipse([x0, y0, x0 + rng.randint(20, w // 3), y0 + rng.randint(20, h // 3)],
                             fill=tuple(rng.randint(0, 255) for _ in range(3)))
            im.save(os.path.join(folder, f"{split}_{i:05d}.jpg"), quality=90)


def load_avg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default=os.path.join(SOURCE, "build"))
    parser.add_argument("--work", default="/tmp/kennel-trainer-bench")
    parser.add_argument("--train", type=int, default=6680)
    parser.add_argument("--valid", type=int, default=835)
    parser.add_argument("--test", type=int, default=836)
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--raw-images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--finetune-images", type=int, default=64)
    parser.add_argument("--finetune-batch", type=int, default=16)
    parser.add_argument("--skip-python", action="store_true")
    parser.add_argument("--out", default="trainer_bench.json")
    args = parser.parse_args()

    if args.classes > min(args.train, args.valid, args.test):
        # Every split must hold every class.
        args.classes = min(args.train, args.valid, args.test)
        print(f"note: {args.classes} classes, so that every split holds each one", flush=True)
    root = os.path.join(args.work, "root")
    name = f"dogs-{args.train}-{args.valid}-{args.test}-{args.classes}"
    data = os.path.join(root, name)
    if not os.path.exists(os.path.join(data, ".complete")):
        print(f"generating {args.train}/{args.valid}/{args.test} JPEGs in {args.classes} "
              f"classes under {data} ...", flush=True)
        t = time.time()
        generate(data, {"train": args.train, "valid": args.valid, "test": args.test},
                 args.classes)
        open(os.path.join(data, ".complete"), "w").close()
        print(f"  {time.time() - t:.0f} s", flush=True)
    backbone = os.path.join(root, f"{args.arch}.pt")
    if not os.path.exists(backbone):
        out = subprocess.run([sys.executable, os.path.join(SOURCE, "tools", "export_backbone.py"),
                              "--arch", args.arch, "--out", backbone],
                             capture_output=True, text=True, check=True)
        print(out.stderr.strip() or out.stdout.strip(), flush=True)

    report = {"sizes": {"train": args.train, "valid": args.valid, "test": args.test,
                        "classes": args.classes},
              "arch": args.arch, "threads": args.threads, "runs": []}
    binary = os.path.join(args.build_dir, "bench", "trainer_bench")
    for precision in args.precisions.split(","):
        cache = os.path.join(args.work, f"cache-{precision}-{time.time():.0f}")
        print(f"[{precision}] trainer_bench (load average {load_avg()}) ...", flush=True)
        run = subprocess.run([binary, f"--data-root={root}", f"--data={name}",
                              f"--backbone={os.path.basename(backbone)}", f"--cache-dir={cache}",
                              f"--precision={precision}", f"--threads={args.threads}",
                              f"--raw-images={args.raw_images}", f"--rounds={args.rounds}",
                              f"--finetune-images={args.finetune_images}",
                              f"--finetune-batch={args.finetune_batch}"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"trainer_bench failed:\n{run.stderr}")
        result = json.loads(run.stdout)
        result["load_average_after"] = load_avg()
        report["runs"].append(result)
        subprocess.run(["rm", "-rf", cache])
        print(json.dumps(result, indent=1), flush=True)

    if not args.skip_python:
        print(f"[python] fine-tune loop (load average {load_avg()}) ...", flush=True)
        spec = {"threads": args.threads, "train_dir": os.path.join(data, "train"),
                "images": args.finetune_images, "batch": args.finetune_batch,
                "backbone": backbone, "classes": args.classes}
        py = subprocess.run([sys.executable, "-c", PY_FINETUNE, json.dumps(spec)],
                            capture_output=True, text=True)
        if py.returncode != 0:
            sys.exit(f"python baseline failed:\n{py.stderr}")
        report["python_finetune"] = json.loads(py.stdout.strip().splitlines()[-1])
        print(json.dumps(report["python_finetune"]), flush=True)

    print("\ntrainer benchmark, " + f"{args.train}/{args.valid}/{args.test} images, "
          f"{args.classes} classes, {args.arch}, {args.threads} threads")
    for r in report["runs"]:
        print(f"  {r['precision']}: raw forward {r['raw_forward_images_per_second']:.1f} img/s; "
              f"extraction {r['extraction_images_per_second']:.1f} img/s "
              f"({r['extraction_over_raw']:.2f} of raw; paired rounds median "
              f"{r['paired_median_ratio']:.2f}; goal 0.9); cached pass "
              f"{r['cached_pass_images_per_second']:.0f} img/s; head epoch "
              f"{r['head_epoch_seconds']:.3f} s on {r['head_train_size']} / "
              f"{r['head_full_epoch_seconds']:.3f} s on {r['head_full_train_size']}; fine-tune "
              f"{r['finetune_images_per_second']:.2f} img/s")
        if "python_finetune" in report:
            py = report["python_finetune"]["images_per_second"]
            print(f"      fine-tune vs Python loop {py:.2f} img/s: "
                  f"{r['finetune_images_per_second'] / py:.2f}x (goal 1)")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
