#!/usr/bin/env python3
"""Registry throughput: pushes and pulls one artifact (100 MB by default)
through kennel-registry with the shared RegistryClient (the registry_bench
program, timed in process), on a local folder and on S3
(a throwaway Ceph radosgw), and measures in the same run, on the same bytes,
the baseline each backend allows without the registry: `cp` of the file for
the folder, and curl PUT/GET (SigV4) to the same S3 server. Prints MB/s,
the registry/baseline ratio (goal: at least 0.7) and writes a JSON report.

    python3 bench/registry_bench.py [--build-dir build] [--size-mb 100] [--reps 5]
        [--compare OTHER_BUILD_DIR]

With --compare, a second registry and client from another build (say, the
binaries of an earlier commit) run beside the first on the same store kind,
each repetition timing both in random order, so a before/after comparison on
a busy machine sees the same load.
"""

import argparse
import json
import os
import random
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
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compare", default="",
                        help="another build dir whose registry and client run "
                             "interleaved with this one's")
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
    kt.binary("bench/registry_bench")  # fails early when it is not built
    builds = [("", os.path.abspath(args.build_dir))]
    if args.compare:
        builds.append((" [compare]", os.path.abspath(args.compare)))

    def build_binary(build, path):
        full = os.path.join(build, path)
        if not os.access(full, os.X_OK):
            raise FileNotFoundError(f"{full} is not built")
        return full

    def through_registry(addr, build=builds[0][1]):
        dest = os.path.join(tmp, "pulled.pt")
        _, out = timed([build_binary(build, "bench/registry_bench"), f"--addr={addr}",
                        f"--file={artifact}", f"--out={dest}"])
        os.remove(dest)
        figures = json.loads(out)
        return figures["push_s"], figures["pull_s"]

    def start_registries(*flags, env=None):
        """One registry per build, each on its own store (a suffix on the URL)."""
        started = []
        for i, (label, build) in enumerate(builds):
            workdir = os.path.join(tmp, f"registry{i}")
            os.makedirs(workdir, exist_ok=True)
            service = kt.Service("registry", *[f.format(i=i) for f in flags],
                                 workdir=workdir, metrics=False, env=env)
            # An absolute path is used as it is (os.path.join keeps it).
            kt.BINARIES["registry"] = build_binary(build, "services/registry/kennel-registry")
            try:
                service.start()
            finally:
                kt.BINARIES["registry"] = "services/registry/kennel-registry"
            cleanups.insert(0, service.stop)
            started.append((label, build, service))
        return started

    def registry_reps(started, push_r, pull_r):
        """Times every build once, in random order; lists are keyed by label."""
        order = list(started)
        random.shuffle(order)
        for label, build, service in order:
            push, pull = through_registry(service.addr, build)
            push_r.setdefault(label, []).append(push)
            pull_r.setdefault(label, []).append(pull)

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
            registries = start_registries(f"--storage=file://{store}{{i}}")
            push_b, push_r, pull_b, pull_r, dd_b = [], {}, [], {}, []
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
                registry_reps(registries, push_r, pull_r)
                pulled = os.path.join(tmp, "pulled-cp.pt")
                pull_b.append(timed(["cp", copy, pulled])[0])
                os.remove(pulled)
            for label, _ in builds:
                median_pair("file" + label, "push", "cp", push_b, push_r[label])
                median_pair("file" + label, "push", "dd bs=1M conv=fdatasync", dd_b,
                            push_r[label])
                median_pair("file" + label, "pull", "cp", pull_b, pull_r[label])

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
                registries = start_registries(
                    "--storage=s3://bench/registry{i}", f"--s3-endpoint={endpoint}",
                    "--s3-path-style", f"--spool-dir={tmp}",
                    env={"AWS_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
                         "AWS_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"]})
                push_b, push_r, pull_b, pull_r = [], {}, [], {}
                for rep in range(args.reps):
                    fresh()
                    url = f"{endpoint}/bench/baseline-{rep}"
                    push_b.append(timed(["curl", *sign, "-T", artifact, url, "-o",
                                         os.devnull])[0])
                    registry_reps(registries, push_r, pull_r)
                    dest = os.path.join(tmp, "pulled-curl.pt")
                    pull_b.append(timed(["curl", *sign, url, "-o", dest])[0])
                    os.remove(dest)
                for label, _ in builds:
                    median_pair("s3 (radosgw)" + label, "push", "curl PUT", push_b,
                                push_r[label])
                    median_pair("s3 (radosgw)" + label, "pull", "curl GET", pull_b,
                                pull_r[label])
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
    if args.compare:
        print(f"[compare]: {os.path.abspath(args.compare)}, timed in the same repetitions")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"size_mb": args.size_mb, "reps": args.reps, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
