"""The periodic summaries drawn by a helper process (--summary_process on) against the training process
(off), side by side in one run.

    python -m benchmarks.bench_summary_process                 # the demo, 20 epochs, a summary every epoch
    python -m benchmarks.bench_summary_process --threads 2     # torch's 2 threads: the helper then competes

Trains the demo twice as `bash run.sh demo` does (`--num_epochs`, `--save_freq`, OMP_NUM_THREADS=--threads),
first with the pictures drawn in the training process, then by the helper, and prints each run's wall time
(the command, and `wall_seconds` of summary.json), its `summary_seconds` (the training's time on summaries:
drawing them, or waiting for the helper), the ratio on / off, and whether the two runs wrote the same
pictures, JSON files and GIFs, byte for byte. The last line is one JSON object. On a GPU the helper is the
default (`auto`); on a CPU it needs a core the training does not use, hence one training thread here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.bench_evaluate import timed, work_folder
from benchmarks.record import write_record

MODES = ("off", "on")


def written_files(run_dir: Path) -> dict[str, bytes]:
    """Every file a run's summaries wrote (summaries/, the GIFs, selection_stats.png), by relative path."""
    found = [p for p in (run_dir / "summaries").rglob("*") if p.is_file()]
    found += [run_dir / name for name in ("losses.gif", "docreps.gif", "logits.gif", "selection_stats.png")
              if (run_dir / name).is_file()]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_epochs", type=int, default=20, help="epochs of each demo run")
    parser.add_argument("--save_freq", type=int, default=1, help="a summary every this many epochs")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the trainings")
    parser.add_argument("--demo_args", default="", help="extra flags for run.sh demo, one string")
    parser.add_argument("--keep", help="train into this folder (kept) instead of a temporary one")
    parser.add_argument("--record", metavar="JSON", help="also write the figures, stamped, to this result file "
                    "(docs/results/NAME.json; `python -m benchmarks.results` renders it)")
    args = parser.parse_args(argv)
    if args.num_epochs < 1 or args.save_freq < 1 or args.threads < 1:
        parser.error("--num_epochs, --save_freq and --threads must be >= 1")
    load_start = os.getloadavg()[0]
    result: dict[str, dict[str, float]] = {}
    files = {}
    with work_folder(args.keep, "bench_summary_process_") as work:
        for mode in MODES:
            flags = ["--num_epochs", str(args.num_epochs), "--save_freq", str(args.save_freq),
                     "--summary_process", mode, "--save_dir", str(work / mode), *args.demo_args.split()]
            seconds = timed(["bash", "run.sh", "demo", *flags], work / f"{mode}.log",
                            env={"OMP_NUM_THREADS": str(args.threads)})
            summary = json.loads((work / mode / "run_0" / "summary.json").read_text())
            result[mode] = {"command_s": seconds, **{k: summary[k] for k in ("wall_seconds", "train_seconds",
                                                                              "summary_seconds")}}
            files[mode] = written_files(work / mode / "run_0")
            print(f"--summary_process {mode}: command {seconds:.1f}s, wall_seconds {summary['wall_seconds']:.1f}, "
                  f"train_seconds {summary['train_seconds']:.1f}, summary_seconds {summary['summary_seconds']:.1f}",
                  flush=True)
    same = sorted(files["off"]) == sorted(files["on"]) and all(files["off"][k] == files["on"][k] for k in files["off"])
    ratio = result["on"]["wall_seconds"] / result["off"]["wall_seconds"]
    print(f"on / off (wall_seconds): {ratio:.2f}; {len(files['off'])} files, "
          f"{'the same bytes' if same else 'DIFFERENT'} in both runs")
    report = {"runs": result, "ratio_wall_on_over_off": ratio, "files": len(files["off"]), "same_files": same,
              "threads": args.threads, "num_epochs": args.num_epochs, "save_freq": args.save_freq,
              "load_average_1m": [load_start, os.getloadavg()[0]]}
    print(json.dumps(report))
    if args.record:
        write_record(args.record, report, "benchmarks.bench_summary_process", argv)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
