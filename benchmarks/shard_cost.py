"""The cost of sharding: recall (right key, other keys, plain LM), the CE matrix and attribution of
runs trained with different --memory_shards, side by side (each evaluated if it has no eval/ yet).

    bash run.sh demo --save_dir /tmp/s1 ; bash run.sh demo --memory_shards 2 --save_dir /tmp/s2
    bash run.sh demo --memory_shards 5 --save_dir /tmp/s5
    python -m benchmarks.shard_cost /tmp/s1/run_0 /tmp/s2/run_0 /tmp/s5/run_0 --grid 0

Prints one markdown table, then one JSON line with the same numbers and each run's training wall time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.record import table_cells, write_record
from docmem.config import load_run_config
from docmem.evaluation.options import EVAL_DIR, EvalOptions
from docmem.evaluation.pipeline import evaluate_run


def measure(run_dir: Path, options: EvalOptions) -> dict:
    path = run_dir / EVAL_DIR / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else evaluate_run(run_dir, options)
    config, _ = load_run_config(run_dir, flag="run_dir")
    recall = summary["rougeL_recall"]
    trained = json.loads((run_dir / "summary.json").read_text())
    return {"run": str(run_dir), "memory_shards": config.memory_shards,
            "right_key": recall.get("right_key"), "other_keys": recall.get("other_keys"),
            "no_memory": recall.get("no_memory"), "ce_diagonal": summary["ce"].get("diagonal_mean"),
            "ce_off_diagonal": summary["ce"].get("off_diagonal_mean"),
            "ce_diagonal_lowest_rows": summary["ce"].get("diagonal_lowest_rows"),
            "attribution_top1": summary.get("attribution_top1_accuracy"),
            "training_seconds": trained.get("wall_seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--grid", type=int, default=0, help="landscape grid (0: none; it is the slowest part)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--record", metavar="JSON", help="also write the table, stamped, to this result file "
                                                         "(docs/results/shard_cost.json)")
    args = parser.parse_args(argv)
    options = EvalOptions(grid=args.grid, threads=args.threads).validate()
    rows = [measure(run, options) for run in args.runs]
    keys = [k for k in rows[0] if k != "run"]
    table = "\n".join(["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
                      + ["| " + " | ".join(json.dumps(row[k]) for k in keys) + " |" for row in rows])
    print(table)
    if args.record:
        write_record(args.record, table_cells(table), "benchmarks.shard_cost", argv)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
