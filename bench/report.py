#!/usr/bin/python3
"""Assembles bench/REPORT.md from the logs scripts/bench.sh leaves in var/bench:
the machine, then each benchmark's command, run time and printed figures (each
benchmark prints its baseline and ratios itself)."""
import argparse
import datetime
import json
import os
import platform
import subprocess

TITLES = {
    "registry": "Registry: push and pull an artifact (folder and S3) beside cp and curl",
    "inference": "Inference: kennel-inference beside the raw forward pass and the Python endpoint",
    "trainer": "Trainer: feature extraction beside the raw forward pass; fine-tune beside PyTorch",
    "tune": "Tuning: the 16-trial search beside one backbone pass",
}


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read()
    extras = [f for f in ("avx512_bf16", "amx_bf16", "sha_ni") if f in flags]
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- commit: {commit or 'unknown'}",
            f"- CPU: {cpu}, {os.cpu_count()} cores ({', '.join(extras) or 'no bf16/AMX'})",
            f"- memory: {mem_kb / 2**20:.1f} GiB; OS: {platform.platform()}",
            "- every ratio compares figures measured in the same run on this machine"]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("names", nargs="+")
    args = p.parse_args()
    lines = ["# Kennel benchmark report", "", "Written by `make bench` (scripts/bench.sh).", ""]
    lines += machine() + [""]
    for name in args.names:
        meta_path = os.path.join(args.dir, f"{name}.meta.json")
        log_path = os.path.join(args.dir, f"{name}.log")
        if not os.path.exists(meta_path):
            continue
        meta = json.load(open(meta_path))
        lines += [f"## {TITLES.get(name, name)}", "",
                  f"`{meta['command']}` — exit {meta['rc']}, {meta['seconds']} s, "
                  f"load average {meta['load_before']} at the start", "", "```"]
        log = open(log_path, errors="replace").read().rstrip().splitlines()
        lines += log[-80:] + ["```", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
