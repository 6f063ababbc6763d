"""The demo (`bash run.sh demo`: SmolLM2-135M, five fictional articles) trained with --precision fp32
and with --precision auto, side by side in one invocation: end-to-end wall time of each training
process, their ratio, the CE curves, and the evaluation of each run (right-key recall, CE matrix).

    python -m benchmarks.bench_precision                      # the demo's 40 epochs, each precision once
    python -m benchmarks.bench_precision --rounds 2 --num_epochs 10

Each round trains fp32 then auto (alternating which goes first, so a drifting load on a shared
machine hits both alike), or with --concurrent both at once; the training processes are timed whole (model load, training, summaries,
GIFs), as `bash run.sh demo` runs. Each run is then evaluated (evaluate_memory.py --grid 0, untimed).
Lines, then ONE JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.record import write_record
from foundations.placement import cpu_native_bf16

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--lm_name", "smollm2", "--lm_size", "135m", "--num_gpus", "0", "--dataset", "synthetic",
        "--synthetic_articles", "20", "--max_labels", "5", "--max_segments", "3", "--segment_length", "48",
        "--max_length", "96", "--key_dim", "2", "--key_activation", "tanh", "--hook_memory_dim", "32",
        "--hook_memory_layer", "27", "--negative_key_type", "other", "--target_negative_ce", "4.5",
        "--guidance", "0.1", "--batch_size", "16", "--lr", "3e-3", "--save_freq", "10", "--seed", "1"]
PRECISIONS = ("fp32", "auto")


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def train(precisions: tuple[str, ...], work: Path, num_epochs: int, threads: int) -> dict[str, tuple[float, Path]]:
    """Demo training processes, one per precision, all started at once (one: alone); each one's
    wall time and run folder."""
    started, procs = time.perf_counter(), {}
    for precision in precisions:
        argv = [sys.executable, str(ROOT / "train_guidance.py"), *DEMO, "--num_epochs", str(num_epochs),
                "--precision", precision, "--save_dir", str(work / precision)]
        (work / precision).mkdir(parents=True, exist_ok=True)
        with open(work / precision / "train.log", "w") as log:  # a file: a full pipe would stall the process
            procs[precision] = subprocess.Popen(argv, cwd=ROOT, env=_env(threads), stdout=subprocess.DEVNULL,
                                                stderr=log, text=True)
    out = {}
    pending = dict(procs)
    while pending:  # poll, so each process's own end is timed
        for precision, proc in list(pending.items()):
            if proc.poll() is not None:
                wall = time.perf_counter() - started
                if proc.returncode != 0:
                    err = (work / precision / "train.log").read_text()
                    raise SystemExit(f"training with --precision {precision} failed: {err[-2000:]}")
                runs = sorted((work / precision).glob("run_*"), key=lambda p: int(p.name.removeprefix("run_")))
                out[precision] = (wall, runs[-1])
                del pending[precision]
        time.sleep(0.2)
    return out


def evaluate(run: Path, threads: int) -> dict:
    argv = [sys.executable, str(ROOT / "evaluate_memory.py"), "--run_dir", str(run), "--grid", "0"]
    done = subprocess.run(argv, cwd=ROOT, env=_env(threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"evaluating {run} failed: {done.stderr[-2000:]}")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    matrix = np.array(json.loads((run / "eval" / "ce_matrix.json").read_text())["matrix"], dtype=float)
    off = matrix[~np.eye(len(matrix), dtype=bool)]
    return {"right_key_rougeL_recall": summary["rougeL_recall"].get("right_key"),
            "other_keys_rougeL_recall": summary["rougeL_recall"].get("other_keys"),
            "ce_diagonal": np.diag(matrix).round(4).tolist(), "ce_diagonal_mean": float(np.diag(matrix).mean()),
            "ce_off_diagonal_mean": float(off.mean()), "ce_off_diagonal_min": float(off.min()),
            "ce_matrix": matrix.round(4).tolist()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_epochs", type=int, default=40, help="the demo's 40")
    p.add_argument("--rounds", type=int, default=1, help="trainings per precision (alternating order)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the processes (0: torch's default)")
    p.add_argument("--concurrent", action="store_true",
                   help="run the two trainings of a round at the same time (a busy shared machine: both see its "
                        "load; the one left running gets the CPU to itself at the end, which only narrows the ratio)")
    p.add_argument("--work_dir", default=None, help="where the runs go (default: a temporary folder, removed)")
    p.add_argument("--record", metavar="JSON", help="also write the figures, stamped, to this result file "
                    "(docs/results/NAME.json; `python -m benchmarks.results` renders it)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        walls: dict[str, list[float]] = {k: [] for k in PRECISIONS}
        runs: dict[str, Path] = {}
        for r in range(args.rounds):
            order = PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]
            for group in ([order] if args.concurrent else [(precision,) for precision in order]):
                for precision, (wall, runs[precision]) in train(group, work, args.num_epochs, args.threads).items():
                    walls[precision].append(wall)
                    print(f"round {r}: --precision {precision}: {wall:.1f} s", flush=True)
        result: dict = {"num_epochs": args.num_epochs, "rounds": args.rounds, "threads": args.threads or None,
                        "concurrent": args.concurrent,
                        "cpu_native_bf16": cpu_native_bf16(),
                        "load_average_1m": os.getloadavg()[0], "runs": {}}
        for precision in PRECISIONS:
            run = runs[precision]
            resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            curve = [round(m["ce_positive"], 4) for m in metrics]
            result["runs"][precision] = {
                "resolved": {k: resolved.get(k) for k in ("precision", "dtype", "head_dtype", "precision_reason")},
                "wall_s": walls[precision], "wall_s_median": statistics.median(walls[precision]),
                "ce_curve": curve, "final_ce": curve[-1], **evaluate(run, args.threads)}
        fp32, auto = result["runs"]["fp32"], result["runs"]["auto"]
        result["speedup_auto_vs_fp32"] = fp32["wall_s_median"] / auto["wall_s_median"]
        result["final_ce_diff"] = auto["final_ce"] - fp32["final_ce"]
        for precision in PRECISIONS:
            run = result["runs"][precision]
            print(f"--precision {precision} ({run['resolved']['precision']}: {run['resolved']['precision_reason']}): "
                  f"wall {run['wall_s_median']:.1f} s, final CE {run['final_ce']:.4f}, right-key R-L recall "
                  f"{run['right_key_rougeL_recall']:.3f}, CE diagonal {run['ce_diagonal_mean']:.4f} / off-diagonal "
                  f"{run['ce_off_diagonal_mean']:.4f}")
            print(f"  CE curve: {run['ce_curve']}")
        print(f"auto / fp32: {result['speedup_auto_vs_fp32']:.2f}x faster end to end, final CE "
              f"{result['final_ce_diff']:+.4f}")
        print(json.dumps(result))
        if args.record:
            write_record(args.record, result, "benchmarks.bench_precision", argv)


if __name__ == "__main__":
    main()
