"""benchmarks/bench_train_step.py runs end to end and the fast path matches the frozen two-pass loop;
bench_evaluate.py's repeated pairs report each ratio and their median."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_evaluate, bench_one_row, bench_quickstart, profile_step, results

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


def test_bench_evaluate_repeats_report_each_ratio_and_their_median(monkeypatch, capsys):
    ratios = iter([0.9, 0.7, 0.8])
    keeps = []

    def fake_pair(args, keep):  # the timing itself is the subprocesses'; here the bookkeeping around it
        keeps.append(keep)
        return {"demo_s": 10.0, "evaluate_s": 0.0, "ratio": next(ratios)}

    monkeypatch.setattr(bench_evaluate, "one_pair", fake_pair)
    assert bench_evaluate.main(["--repeats", "3", "--keep", "/tmp/k"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert keeps == ["/tmp/k/pair_0", "/tmp/k/pair_1", "/tmp/k/pair_2"]
    assert out[-2] == "ratios: 0.90, 0.70, 0.80; median 0.80"
    report = json.loads(out[-1])
    assert report["ratios"] == [0.9, 0.7, 0.8] and report["median_ratio"] == 0.8 and len(report["pairs"]) == 3
    for argv in (["--repeats", "0"], ["--repeats", "2", "--run_dir", "RUN"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_evaluate.main(argv)
        assert exit_info.value.code == 2 and "--repeats" in capsys.readouterr().err


def test_the_quickstart_benchmark_runs_the_readmes_commands_on_its_own_demo(tmp_path):
    """bench_quickstart times exactly the README's quick-start commands, on a demo it trains itself."""
    readme = (ROOT / "README.md").read_text()
    assert all(command in readme for command, _ in bench_quickstart.COMMANDS)
    assert [c for c, _ in bench_quickstart.COMMANDS] + [bench_quickstart.TESTS[0]] == list(results.QUICKSTART)
    demo = bench_quickstart.as_run("bash run.sh demo", tmp_path / "demo", tmp_path / "out")
    assert demo == ["bash", "run.sh", "demo", "--save_dir", str(tmp_path / "demo")]
    forget = bench_quickstart.as_run("python forget.py --run_dir outputs/demo/run_0 --doc 0 --method unlearn",
                                     tmp_path / "demo", tmp_path / "out")
    assert forget[1:] == ["forget.py", "--run_dir", str(tmp_path / "demo" / "run_0"), "--doc", "0", "--method",
                          "unlearn", "--out", str(tmp_path / "out")]


def test_the_one_row_benchmark_replays_the_steps_own_products():
    """bench_one_row times a one-row step against its matrix products, found by profiling it: the head's
    two, the memory's and the suffix block's, and the attention's six."""
    report = bench_one_row.main(["--shapes", "tiny", "--seq", "12", "--seconds", "0", "--min_rounds", "2",
                                 "--profile_steps", "1"])
    (row,) = report["rows"]
    assert (row["shape"], row["layer"], row["blocks"], row["seq"]) == ("tiny", 0, 2, 12)
    assert row["step_s"] > 0 and row["matmuls_s"] > 0 and row["ratio"] == row["step_s"] / row["matmuls_s"]
    # forward: memory 4 + block 4 linears + 2 attention + head 2; backward: block 4 + attention 4 + memory 6
    assert row["matrix_products"] == 26, row["matrix_products"]
    assert row["top_ops"] and 0 <= row["outside_ops_share"] <= 1



def test_the_step_profile_measures_the_union_of_busy_intervals():
    """profile_step: overlapping kernels count once, gaps not at all; shapes are NAME:BATCHxSEQ."""
    assert profile_step.busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert profile_step.busy_seconds([]) == 0
    assert profile_step.parse_shape("pythia-1b:16x256") == ("pythia-1b", 16, 256)
    with pytest.raises(Exception, match="NAME:BATCHxSEQ"):
        profile_step.parse_shape("pythia-1b:16")
