#!/usr/bin/env python3
"""Registry throughput: pushes and pulls one artifact (100 MB by default)
through kennel-registry with the shared RegistryClient (the registry_bench
program, timed in process), on a local folder and on S3
(a throwaway Ceph radosgw), and measures in the same run, on the same bytes,
the baseline each backend allows without the registry: `cp` of the file for
the folder, and curl PUT/GET (SigV4) to the same S3 server. Prints MB/s,
the registry/baseline ratio (goal: at least 0.7) and writes a JSON report.

    python3 bench/registry_bench.py [--build-dir build] [--size-mb 100] [--reps 3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(SOURCE_DIR, "tests", "integration"))


def timed(cmd, **kwargs):
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return elapsed, result.stdout


def tag(path, value):
    """Makes the file's bytes unique for this measurement (first 16 bytes),
    so no store can skip the upload as a duplicate."""
    with open(path, "r+b") as f:
        f.write(f"{value:016d}".encode())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", default=os.path.join(SOURCE_DIR, "build"))
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", default="file,s3")
    parser.add_argument("--report", default="",
                        help="write the figures as JSON here as well")
    args = parser.parse_args()
    os.environ["KENNEL_BUILD_DIR"] = os.path.abspath(args.build_dir)
    import kennel_testlib as kt

    size = args.size_mb * 1000 * 1000
    tmp = tempfile.mkdtemp(prefix="kennel-registry-bench-")
    artifact = os.path.join(tmp, "artifact.pt")
    with open(artifact, "wb") as f:
        f.write(os.urandom(size))
    bench = kt.binary("bench/registry_bench")

    def through_registry(addr):
        dest = os.path.join(tmp, "pulled.pt")
        _, out = timed([bench, f"--addr={addr}", f"--file={artifact}", f"--out={dest}"])
        os.remove(dest)
        figures = json.loads(out)
        return figures["push_s"], figures["pull_s"]
    results = []  # (backend, direction, baseline name, baseline s, registry s)
    cleanups = []
    counter = [int(time.time())]

    def fresh():
        counter[0] += 1
        tag(artifact, counter[0])

    def median_pair(backend, direction, baseline_name, baseline, registry):
        b, r = statistics.median(baseline), statistics.median(registry)
        results.append({"backend": backend, "direction": direction,
                        "baseline": baseline_name,
                        "baseline_mb_s": size / 1e6 / b, "registry_mb_s": size / 1e6 / r,
                        "ratio": b / r, "baseline_s": baseline, "registry_s": registry})

    try:
        backends = args.backends.split(",")
        if "file" in backends:
            store = os.path.join(tmp, "store")
            registry = kt.Service("registry", f"--storage=file://{store}", workdir=tmp,
                                  metrics=False).start()
            cleanups.append(registry.stop)
            push_b, push_r, pull_b, pull_r, dd_b = [], [], [], [], []
            for rep in range(args.reps):
                fresh()
                # Copies are kept until the end, as the registry keeps its blobs.
                copy = os.path.join(tmp, f"copy-{rep}.pt")
                push_b.append(timed(["cp", artifact, copy])[0])
                # The path the registry's bytes take: write(2) into a new file,
                # then fdatasync before it counts as stored. (cp uses
                # copy_file_range, which no network service can.)
                dd_b.append(timed(["dd", f"if={artifact}", f"of={copy}.dd", "bs=1M",
                                   "conv=fdatasync", "status=none"])[0])
                push, pull = through_registry(registry.addr)
                push_r.append(push)
                pull_r.append(pull)
                pulled = os.path.join(tmp, "pulled-cp.pt")
                pull_b.append(timed(["cp", copy, pulled])[0])
                os.remove(pulled)
            median_pair("file", "push", "cp", push_b, push_r)
            median_pair("file", "push", "dd bs=1M conv=fdatasync", dd_b, push_r)
            median_pair("file", "pull", "cp", pull_b, pull_r)

        if "s3" in backends:
            if shutil.which("radosgw") is None:
                print("radosgw is not installed: skipping the S3 backend", file=sys.stderr)
            else:
                rgw_dir = os.path.join(tmp, "ceph")
                port = kt.free_port()
                started = subprocess.run(
                    [os.path.join(SOURCE_DIR, "tests", "s3", "rgw-start.sh"), rgw_dir,
                     str(port)], capture_output=True, text=True, timeout=120,
                    env=dict(os.environ, MONPORT=str(kt.free_port())))
                if started.returncode != 0:
                    raise RuntimeError("radosgw did not start:\n" + started.stderr)
                cleanups.append(lambda: subprocess.run(
                    [os.path.join(SOURCE_DIR, "tests", "s3", "rgw-stop.sh"), rgw_dir],
                    env=dict(os.environ, FAST="1")))
                creds = dict(line.split("=", 1) for line in started.stdout.split())
                endpoint = creds["S3_ENDPOINT"]
                sign = ["--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
                        f"{creds['AWS_ACCESS_KEY_ID']}:{creds['AWS_SECRET_ACCESS_KEY']}",
                        "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-sS", "--fail"]
                timed(["curl", *sign, "-X", "PUT", f"{endpoint}/bench"])
                registry = kt.Service(
                    "registry", "--storage=s3://bench/registry", f"--s3-endpoint={endpoint}",
                    "--s3-path-style", f"--spool-dir={tmp}", workdir=tmp, metrics=False,
                    env={"AWS_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
                         "AWS_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"]}).start()
                cleanups.insert(0, registry.stop)
                push_b, push_r, pull_b, pull_r = [], [], [], []
                for rep in range(args.reps):
                    fresh()
                    url = f"{endpoint}/bench/baseline-{rep}"
                    push_b.append(timed(["curl", *sign, "-T", artifact, url, "-o",
                                         os.devnull])[0])
                    push, pull = through_registry(registry.addr)
                    push_r.append(push)
                    pull_r.append(pull)
                    dest = os.path.join(tmp, "pulled-curl.pt")
                    pull_b.append(timed(["curl", *sign, url, "-o", dest])[0])
                    os.remove(dest)
                median_pair("s3 (radosgw)", "push", "curl PUT", push_b, push_r)
                median_pair("s3 (radosgw)", "pull", "curl GET", pull_b, pull_r)
    finally:
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception as e:  # keep cleaning up
                print(f"cleanup: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nkennel-registry throughput, {args.size_mb} MB artifact, median of {args.reps} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    rows = [("backend", "op", "baseline", "baseline MB/s", "registry MB/s", "ratio")]
    for r in results:
        rows.append((r["backend"], r["direction"], r["baseline"], f"{r['baseline_mb_s']:.0f}",
                     f"{r['registry_mb_s']:.0f}", f"{r['ratio']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("goal: ratio >= 0.70 (registry throughput / baseline on the same bytes)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"size_mb": args.size_mb, "reps": args.reps, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
