#!/usr/bin/python3
"""kennel-inference benchmark: one TorchScript ResNet50 (random weights, 133
classes, Resize((224, 224)) preprocessing as the original endpoint had),
photo-sized JPEGs, and in one run on the same cores:

  * the raw forward pass of that model through the service's own loader at
    batch sizes 1-16, fp32 and bf16 (bench/inference_forward_bench);
  * kennel-inference in fp32 and in bf16: throughput, p50 and p99 latency
    at concurrency 1, 8 and 32 (gRPC Classify, one image per request);
  * bench/python_baseline_server.py, the original endpoint's way of serving
    (PIL, torchvision transforms, one image per forward, grpcio thread
    pool), under the same load;
  * fp32 against bf16: throughput and top-1 agreement on the images.

Usage: inference_bench.py [--build-dir build] [--seconds 20] [--out FILE]
Prints a report and writes the figures as JSON to --out.
"""
import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.dirname(HERE)
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]
FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scene(rng, width, height):
    """A photo-like scene: smooth colour fields, soft-edged shapes, noise."""
    from PIL import Image, ImageDraw, ImageFilter
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 4.0, 2) * 2 * np.pi
            img[..., c] += np.sin(fx * x / width + fy * y / height + rng.uniform(0, 6))
    img = (img - img.min()) / (np.ptp(img) + 1e-6) * 200 + 20
    pil = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(14):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1],
                                                                  fill=colour)
    pil = pil.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(pil).astype(np.float32) + rng.normal(0, 5, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def fashion_photos(count):
    """Real photographs: Fashion-MNIST tiles, 18 x 24 per picture, upscaled
    to 1008 x 756 as a camera would deliver them."""
    import gzip
    from PIL import Image
    if not os.path.exists(FASHION):
        return []
    with gzip.open(FASHION, "rb") as f:
        data = f.read()
    tiles = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    out = []
    for k in range(count):
        block = tiles[k * 432:(k + 1) * 432].reshape(18, 24, 28, 28)
        mosaic = block.transpose(0, 2, 1, 3).reshape(18 * 28, 24 * 28)
        out.append(Image.fromarray(mosaic, "L").convert("RGB").resize(
            (1008, 756), Image.BICUBIC))
    return out


def make_images(directory, count):
    from PIL import Image  # noqa: F401
    rng = np.random.default_rng(7)
    photos = fashion_photos(max(count // 4, 1))
    images = []
    for i in range(count - len(photos)):
        w, h = SIZES[i % len(SIZES)]
        if i % 3 == 2:
            w, h = h, w  # some portrait
        images.append(scene(rng, w, h))
    images += photos
    blobs = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
        with open(os.path.join(directory, f"img{i:03d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    return blobs


def export_resnet50(path):
    """ResNet50 with random weights under Kennel's artifact contract, with the
    original endpoint's preprocessing (Resize((224, 224)), ImageNet stats)."""
    script = f"""
import json, torch, torchvision
from typing import List
class Classifier(torch.nn.Module):
    labels: List[str]
    kennel_preprocessing: str
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.labels = [f"breed{{i:03d}}" for i in range(133)]
        self.kennel_preprocessing = json.dumps({{
            "input_size": 224, "resize_mode": "RESIZE_MODE_STRETCH",
            "mean": {MEAN}, "std": {STD}}})
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
torch.manual_seed(0)
net = torchvision.models.resnet50(weights=None, num_classes=133).eval()
torch.jit.script(Classifier(net).eval()).save({path!r})
"""
    # TorchScript reads the class's source, so the script must be a file.
    script_path = path + ".export.py"
    with open(script_path, "w") as f:
        f.write(script)
    subprocess.run([sys.executable, script_path], check=True, timeout=600)


def raw_forward(build_dir, model, precision, batches, seconds, threads):
    cmd = [os.path.join(build_dir, "bench", "inference_forward_bench"),
           f"--model={model}", f"--precision={precision}",
           f"--batch_sizes={','.join(map(str, batches))}", f"--seconds={seconds}",
           f"--threads={threads}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         timeout=1800).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


class Server:
    def __init__(self, cmd, port, log_path, env=None):
        self.port = port
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))

    def wait_ready(self, stubs, image, timeout=900):
        import grpc
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                stub = stubs.ClassifierStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))
                stub.Classify(stubs.pb.ClassifyRequest(image=image), timeout=60)
                return
            except grpc.RpcError:
                time.sleep(0.5)
        raise TimeoutError("server never answered")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Stubs:
    def __init__(self, build_dir):
        sys.path.insert(0, os.path.join(build_dir, "python"))
        from kennel.v1 import inference_pb2, inference_pb2_grpc
        self.pb = inference_pb2
        self.ClassifierStub = inference_pb2_grpc.ClassifierStub


def load(stubs, port, images, concurrency, warmup, seconds):
    """Closed-loop clients, one request in flight each. Counts the requests
    that finish inside the measured window (after `warmup`)."""
    import grpc
    start = time.time()
    window = (start + warmup, start + warmup + seconds)
    lock = threading.Lock()
    latencies, errors = [], {}

    def client(i):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 64 << 20)])
        stub = stubs.ClassifierStub(channel)
        n = i * 7
        while time.time() < window[1]:
            data = images[n % len(images)]
            n += 1
            t0 = time.time()
            try:
                stub.Classify(stubs.pb.ClassifyRequest(image=data, top_k=5), timeout=120)
                ok = True
            except grpc.RpcError as e:
                ok = False
                code = e.code().name
            t1 = time.time()
            if window[0] <= t1 <= window[1]:
                with lock:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors[code] = errors.get(code, 0) + 1
        channel.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "images_per_second": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "errors": errors,
    }


def top1(stubs, port, images):
    import grpc
    stub = stubs.ClassifierStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    out = []
    for data in images:
        r = stub.Classify(stubs.pb.ClassifyRequest(image=data, top_k=1), timeout=120)
        out.append(r.predictions[0].index)
    return out


def model_status(stubs, port):
    import grpc
    stub = stubs.ClassifierStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return stub.GetModelStatus(stubs.pb.GetModelStatusRequest(), timeout=30)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", default=os.path.join(SOURCE_DIR, "build"))
    p.add_argument("--seconds", type=float, default=20, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=5, help="unmeasured seconds per level")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--forward-seconds", type=float, default=8)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--baseline-workers", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for every process measured (kennel-inference "
                        "picks PASSIVE itself when unset); empty leaves it unset")
    p.add_argument("--out", default="inference_bench.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
    batches = [int(x) for x in args.batches.split(",")]
    stubs = Stubs(args.build_dir)
    tmp = tempfile.mkdtemp(prefix="kennel-inference-bench-")
    report = {"cores": os.cpu_count(), "threads": args.threads,
              "omp_wait_policy": args.omp_wait_policy or "(unset)",
              "loadavg_start": loadavg(), "levels": levels}
    with open("/proc/cpuinfo") as f:
        cpu = f.read()
    report["cpu"] = next((l.split(":", 1)[1].strip() for l in cpu.splitlines()
                          if l.startswith("model name")), "?")
    report["cpu_bf16"] = "avx512_bf16" in cpu or "amx_bf16" in cpu
    try:
        image_dir = os.path.join(tmp, "images")
        os.makedirs(image_dir)
        images = make_images(image_dir, args.images)
        report["images"] = len(images)
        report["image_mean_bytes"] = int(np.mean([len(b) for b in images]))
        model = os.path.join(tmp, "resnet50.pt")
        log("exporting ResNet50 (random weights) ...")
        export_resnet50(model)

        # All three servers stay up and take turns, level by level, so that
        # other work on the machine drifting in or out during the run skews
        # them alike. An idle server waits on a condition variable (OpenMP
        # threads sleep with the PASSIVE policy) and costs nothing.
        servers = {}
        inference = os.path.join(args.build_dir, "services", "inference", "kennel-inference")
        specs = [
            ("kennel_fp32", [inference, "--precision=fp32"]),
            ("kennel_bf16", [inference, "--precision=bf16", "--bf16-min-agreement=0"]),
            ("baseline", [sys.executable, os.path.join(HERE, "python_baseline_server.py"),
                          f"--workers={args.baseline_workers}",
                          f"--stubs={os.path.join(args.build_dir, 'python')}"]),
        ]
        predictions = {}
        try:
            for name, cmd in specs:
                port = free_port()
                if name == "baseline":
                    cmd = cmd + [f"--model={model}", f"--port={port}"]
                else:
                    cmd = cmd + [f"--model-path={model}", f"--listen=127.0.0.1:{port}",
                                 "--metrics-listen=off", f"--threads={args.threads}",
                                 f"--max-batch-size={args.max_batch_size}",
                                 "--max-queue=256", f"--warmup-dir={image_dir}"]
                log(f"{name}: starting ...")
                servers[name] = Server(cmd, port, os.path.join(tmp, f"{name}.log"))
                servers[name].wait_ready(stubs, images[0])
                predictions[name] = top1(stubs, port, images)
                if name != "baseline":
                    status = model_status(stubs, port)
                    report[f"{name}_status"] = {
                        "precision": stubs.pb.ModelStatus.DESCRIPTOR.fields_by_name[
                            "precision"].enum_type.values_by_number[status.precision].name,
                        "bf16_agreement_at_load": status.bf16_agreement,
                        "load_seconds": status.load_seconds}
                    with open(os.path.join(tmp, f"{name}.log")) as f:
                        cap = re.search(r"batches up to (\d+)", f.read())
                    report[f"{name}_status"]["batch_cap"] = int(cap.group(1)) if cap else None
            for precision in ("fp32", "bf16"):
                log(f"raw forward {precision} at batch sizes {batches} ...")
                rows = raw_forward(args.build_dir, model, precision, batches,
                                   args.forward_seconds, args.threads)
                report[f"forward_{precision}"] = rows
                log("  " + ", ".join(f"b{r['batch']}: {r['images_per_second']:.1f}/s"
                                     for r in rows))
            for name, _ in specs:
                report[name] = []
            for c in levels:
                for name, _ in specs:
                    row = load(stubs, servers[name].port, images, c, args.warmup,
                               args.seconds)
                    row["loadavg"] = loadavg()
                    report[name].append(row)
                    log(f"  {name} c={c}: {row['images_per_second']:.1f} img/s, "
                        f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                        f"load {row['loadavg']:.1f} {row['errors'] or ''}")
        finally:
            for server in servers.values():
                server.stop()

        n = len(images)
        report["top1_agreement_bf16_vs_fp32"] = sum(
            a == b for a, b in zip(predictions["kennel_fp32"], predictions["kennel_bf16"])) / n
        report["top1_agreement_kennel_fp32_vs_baseline"] = sum(
            a == b for a, b in zip(predictions["kennel_fp32"], predictions["baseline"])) / n
        report["loadavg_end"] = loadavg()
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_report(report)


def print_report(r):
    def at(name, c):
        return next(x for x in r[name] if x["concurrency"] == c)

    def best(rows):
        return max(rows, key=lambda x: x["images_per_second"])

    print(f"\nkennel-inference benchmark: ResNet50 (random weights), {r['images']} JPEGs "
          f"(mean {r['image_mean_bytes'] // 1024} KiB), {r['cores']} cores, "
          f"{r['threads']} threads, OMP_WAIT_POLICY={r['omp_wait_policy']}, {r['cpu']}")
    print(f"load average {r['loadavg_start']:.1f} at start, {r['loadavg_end']:.1f} at end "
          f"(other work on the machine skews every figure alike)\n")
    header = f"{'server':<16}" + "".join(
        f"{'c=' + str(c):>28}" for c in r["levels"])
    print(header)
    print(f"{'':<16}" + "".join(f"{'img/s   p50 ms   p99 ms':>28}" for _ in r["levels"]))
    for name in ("kennel_fp32", "kennel_bf16", "baseline"):
        line = f"{name:<16}"
        for c in r["levels"]:
            x = at(name, c)
            line += f"{x['images_per_second']:>12.1f}{x['p50_ms']:>9.0f}{x['p99_ms']:>7.0f}"
        print(line)
    print()
    for precision in ("fp32", "bf16"):
        raw = best(r[f"forward_{precision}"])
        served = best(r[f"kennel_{precision}"])
        cap = r.get(f"kennel_{precision}_status", {}).get("batch_cap")
        print(f"kennel {precision}: batches capped at {cap} by the timing at load "
              f"(load took {r[f'kennel_{precision}_status']['load_seconds']:.0f} s)")
        print(f"raw forward {precision}: best {raw['images_per_second']:.1f} img/s at batch "
              f"{raw['batch']}; served best {served['images_per_second']:.1f} img/s "
              f"(c={served['concurrency']}) = {served['images_per_second'] / raw['images_per_second']:.2f} "
              f"of raw (goal >= 0.85)")
    if 8 in r["levels"]:
        base8 = at("baseline", 8)["images_per_second"]
        for precision, goal in (("fp32", 1.3), ("bf16", 3.0)):
            ratio = at(f"kennel_{precision}", 8)["images_per_second"] / base8
            print(f"kennel {precision} / python baseline at c=8: {ratio:.2f}x (goal >= {goal}x)")
    if 1 in r["levels"]:
        for precision in ("fp32", "bf16"):
            print(f"p50 at c=1: kennel {precision} {at(f'kennel_{precision}', 1)['p50_ms']:.0f} ms, "
                  f"baseline {at('baseline', 1)['p50_ms']:.0f} ms")
    f32, b16 = best(r["kennel_fp32"]), best(r["kennel_bf16"])
    print(f"bf16 vs fp32 served: {b16['images_per_second'] / f32['images_per_second']:.2f}x "
          f"throughput; top-1 agreement {r['top1_agreement_bf16_vs_fp32']:.2f} on the images "
          f"(at load: {r['kennel_bf16_status']['bf16_agreement_at_load']:.2f}, serving "
          f"{r['kennel_bf16_status']['precision']})")
    print(f"top-1 agreement kennel fp32 vs baseline: "
          f"{r['top1_agreement_kennel_fp32_vs_baseline']:.2f} (reduced-scale JPEG decode "
          f"and bilinear filtering differ slightly from PIL on full-size decodes)")


if __name__ == "__main__":
    main()
