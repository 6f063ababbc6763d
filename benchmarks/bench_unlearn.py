"""forget.py --method unlearn against the training it forgets from, side by side in one run (target: at most 0.25).

    python -m benchmarks.bench_unlearn                          # bash run.sh demo, then forget.py --method unlearn on it
    python -m benchmarks.bench_unlearn --run_dir RUN            # unlearn only, on a trained run (its summary.json's time)
    python -m benchmarks.bench_unlearn --run_dir RUN --train_seconds 57.5   # a run folder without summary.json

Trains the demo exactly as `bash run.sh demo` does (a subprocess, --save_dir in a temporary
folder), then runs `python forget.py --run_dir SAVE_DIR/run_0 --doc DOC --method unlearn --json`
(--repeats times, each into a new folder), each command timed by wall clock as a user would see it
(the LM's loading included). Prints two ratios: the unlearn fine-tuning (forget.py's
`unlearn_seconds`) over the training inside its process (summary.json's `wall_seconds`), and the
whole forget.py command over the whole `bash run.sh demo` command (with --run_dir: over
--train_seconds, when given). With --repeats > 1 the medians. Then one JSON object on the last line.
On a machine shared with other jobs the times are noisy: compare ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.bench_evaluate import timed, train_demo, work_folder
from benchmarks.record import write_record


def training_seconds(run_dir: Path) -> float | None:
    """The training's wall time inside its process, as the run folder records it (summary.json)."""
    path = run_dir / "summary.json"
    return float(json.loads(path.read_text())["wall_seconds"]) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", help="unlearn from this trained run instead of training the demo")
    parser.add_argument("--train_seconds", type=float, help="the training's wall time, when the run folder has none")
    parser.add_argument("--doc", default="0", help="the document to forget (title or index)")
    parser.add_argument("--steps", type=int, help="forget.py --steps (default: forget.py's)")
    parser.add_argument("--repeats", type=int, default=1, help="forget.py runs (medians reported)")
    parser.add_argument("--demo_args", default="", help="extra flags for run.sh demo, one string")
    parser.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    parser.add_argument("--record", metavar="JSON", help="also write the figures, stamped, to this result file "
                    "(docs/results/NAME.json; `python -m benchmarks.results` renders it)")
    args = parser.parse_args(argv)

    with work_folder(args.keep, "bench_unlearn_") as work:
        result: dict[str, object] = {"load_average_1m": os.getloadavg()[0]}
        if args.run_dir:
            run_dir = Path(args.run_dir)
            demo_s = args.train_seconds
        else:
            demo_s, run_dir = train_demo(work, args.demo_args)
        train_s = training_seconds(run_dir) or args.train_seconds
        if train_s is None:
            raise SystemExit(f"--run_dir {run_dir}: no summary.json with wall_seconds; give --train_seconds")
        steps = ["--steps", str(args.steps)] if args.steps else []
        unlearn_s, command_s = [], []
        for i in range(args.repeats):
            out = work / f"unlearn_{os.getpid()}_{i}"
            command_s.append(timed([sys.executable, "forget.py", "--run_dir", str(run_dir), "--doc", args.doc,
                                    "--method", "unlearn", "--out", str(out), "--json", *steps],
                                   work / f"forget_{i}.log", stdout=work / f"forget_{i}.json"))
            reply = json.loads((work / f"forget_{i}.json").read_text())
            unlearn_s.append(float(reply["unlearn_seconds"]))
            print(f"forget.py --method unlearn ({reply['unlearn_steps']} steps): fine-tuning {unlearn_s[-1]:.1f}s, "
                  f"command {command_s[-1]:.1f}s", flush=True)
        result.update(training_s=train_s, demo_s=demo_s, unlearn_s=statistics.median(unlearn_s),
                      forget_command_s=statistics.median(command_s), unlearn_runs_s=unlearn_s,
                      forget_command_runs_s=command_s, steps=reply["unlearn_steps"])
        result["unlearn_over_training"] = result["unlearn_s"] / train_s
        print(f"training (in its process, summary.json): {train_s:.1f}s; unlearn fine-tuning / training: "
              f"{result['unlearn_over_training']:.3f} (the issue asks at most 0.25)")
        if demo_s:
            result["command_over_command"] = result["forget_command_s"] / demo_s
            print(f"forget.py command / training command: {result['forget_command_s']:.1f}s / {demo_s:.1f}s = "
                  f"{result['command_over_command']:.3f}")
        result["load_average_1m_end"] = os.getloadavg()[0]
        print(json.dumps(result))
    if args.record:
        write_record(args.record, result, "benchmarks.bench_unlearn", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
