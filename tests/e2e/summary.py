"""Prints the reliability suite's table: every scenario the e2e scripts ran
in this ctest run (their ledgers in RESULTS_DIR), with the requests each
sent, the errors by code, the versions checked and anything lost, then
the figures each scenario noted. Runs after the scenarios (a ctest fixture
cleanup); exits 77 when none ran."""

import glob
import json
import os
import sys

import e2e_lib as e2e

SCRIPTS = ["test_crash", "test_storage_outage", "test_overload", "test_bad_input",
           "test_security"]


def main():
    rows, seconds, missing = [], 0.0, []
    for script in SCRIPTS:
        path = os.path.join(e2e.RESULTS_DIR, script + ".json")
        if not os.path.exists(path):
            missing.append(script)
            continue
        with open(path) as f:
            report = json.load(f)
        rows += report["scenarios"]
        seconds += report["seconds"]
    for path in sorted(glob.glob(os.path.join(e2e.RESULTS_DIR, "*.json"))):
        if os.path.splitext(os.path.basename(path))[0] not in SCRIPTS:
            missing.append(f"(unknown results file {path})")
    if not rows:
        print(f"no e2e results in {e2e.RESULTS_DIR}; run the e2e_* tests first",
              file=sys.stderr)
        return e2e.kt.SKIP
    lines = [f"Kennel reliability suite: {len(rows)} scenarios in {seconds:.0f} s", "",
             e2e.format_table(rows)]
    if missing:
        lines.append("not run (or ended before writing results): " + ", ".join(missing))
    lines.append("")
    for r in rows:
        for k, v in sorted(r["notes"].items()):
            lines.append(f"  {r['scenario']}: {k} = {v}")
        for what in r["lost"]:
            lines.append(f"  {r['scenario']}: LOST {what}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(e2e.RESULTS_DIR, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
