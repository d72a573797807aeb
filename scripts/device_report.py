"""Summarises a device check's outputs (scripts/device_check.sh) into OUT/report.json and a short text table.

    python scripts/device_report.py OUT BUILD_STATUS TEST_STATUS KERNELS_STATUS STEP_STATUS
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def test_summary(path):
    """Counts from pytest's JUnit XML, and the names of the tests that failed or crashed."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed
    return counts


def main(argv):
    out = argv[1]
    statuses = dict(zip(("build", "tests", "kernels", "step"), map(int, argv[2:6])))
    device = Path(os.path.join(out, "device.txt")).read_text().strip() if os.path.exists(os.path.join(out, "device.txt")) else ""
    report = {"device": device, "status": statuses, "tests": test_summary(os.path.join(out, "tests.xml")),
              "kernels": load_json(os.path.join(out, "bench_kernels.json")),
              "step": {cov: load_json(os.path.join(out, f"bench_step_{cov}.json")) for cov in ("full", "diag")}}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)

    lines = [device, ""]
    t = report["tests"]
    lines.append("tests: " + ("none ran" if t is None else
                              f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"))
    for name in (t or {}).get("failed_tests", []):
        lines.append(f"  FAILED {name}")
    for r in report["kernels"] or []:
        if "speedup" in r:
            lines.append(f"{r['case']:<11} {r['ours']:>9} vs {r['baseline']:<9} {r['speedup']:7.2f}x time "
                         f"{r['memory_ratio']:8.1f}x memory  {r['target']} {'; '.join(r['verdict'])}")
        elif "bandwidth_share" not in r:
            lines.append(f"{r['case']:<11} {r['ours']:>9} vs {r['baseline']:<9} {'; '.join(r['verdict'])}")
        else:
            lines.append(f"{r['case']}: {100 * r['bandwidth_share']:.0f}% of copy bandwidth, {r['tflops']:.1f} "
                         f"TFLOP/s, {1e3 * r['time_s']:.3f} ms (memory floor {1e3 * r['memory_floor_s']:.3f} ms) "
                         f"{'; '.join(r['verdict'])}")
    for cov, s in report["step"].items():
        if s is None:
            lines.append(f"step ({cov}): no result")
            continue
        res = s["results"]
        share = res["adapt"].get("sdca_share")
        lines.append(f"step ({cov}, {s['scale']}): source {1e3 * res['source']['time_s']:.1f} ms, control "
                     f"{1e3 * res['control']['time_s']:.1f} ms, adapt {1e3 * res['adapt']['time_s']:.1f} ms "
                     f"({res['adapt']['peak_extra_bytes'] / 2**20:.0f} MiB), reference ops "
                     f"{1e3 * res['reference']['time_s']:.1f} ms ({res['reference']['peak_extra_bytes'] / 2**20:.0f} MiB); "
                     f"overhead {100 * s['overhead']:.1f}% (target <= 25%: {'met' if s['target_met'] else 'NOT met'})"
                     + (f"; sdca ops {100 * share:.1f}% of device time" if share is not None else ""))
    lines.append("status: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
