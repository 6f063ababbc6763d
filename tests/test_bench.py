"""benchmarks/bench_train_step.py runs end to end and the fast path matches the frozen two-pass loop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("released_s_per_step", "frozen_two_pass_s_per_step", "fast_s_per_step", "fast_first_step_s",
            "speedup_vs_released", "speedup_vs_frozen_two_pass", "peak_memory_bytes", "peak_memory_kind",
            "max_rel_diff_loss", "max_rel_diff_params", "equality_check", "device", "device_name", "shape",
            "layer", "batch", "seq", "precision", "torch_version")


def test_bench_tiny_reports_json_and_equal_losses():
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--shape", "tiny", "--steps", "2",
           "--batch", "2", "--seq", "32", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    missing = [k for k in REQUIRED if k not in report]
    assert not missing, missing
    assert set(report["peak_memory_bytes"]) == {"released", "frozen_two_pass", "fast"}
    assert all(report[k] > 0 for k in ("released_s_per_step", "frozen_two_pass_s_per_step", "fast_s_per_step"))
    assert report["equality_check"]["precision"] == "fp32"
    assert report["max_rel_diff_loss"] <= 1e-5, report["max_rel_diff_loss"]
    # loose: Adam turns round-off in a near-zero gradient (a zero-initialised bias) into a visible step
    assert report["max_rel_diff_params"] <= 1e-2, report["max_rel_diff_params"]
    assert (report["shape"], report["layer"], report["batch"], report["seq"]) == ("tiny", 1, 2, 32)
