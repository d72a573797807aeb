"""The kernel benchmark runs every case end to end (tiny sizes) and reports each target it is held to.

Speed itself is never asserted here: targets live in the benchmark's own output.
"""
import json
import os
import subprocess
import sys

import pytest

from sdca import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not ops.has_ops(), reason="the benchmark compares the compiled extension with its baselines")
def test_benchmark_quick_run(tmp_path):
    out_json = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_kernels.py"), "--quick", "--repeat", "1",
                          "--json", str(out_json)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out_json.read_text())
    assert {(r["case"], r["baseline"], r["ours"]) for r in rows} == {
        ("diag_loss", "public", "sdca"), ("diag_api", "bare", "sdca"), ("full_loss", "products", "sdca"),
        ("full_loss", "einsum", "sdca"),
        ("stats_diag", "public", "sdca"), ("stats_diag", "public", "reference"), ("stats_full", "gram", "sdca")}
    for r in rows:
        assert r["baseline_result"]["time_s"] > 0 and r["ours_result"]["time_s"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_result"]["time_s"] / r["ours_result"]["time_s"])
    assert "stats_full" in run.stdout and "target" in run.stdout
