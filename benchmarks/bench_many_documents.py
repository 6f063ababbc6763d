"""A many-document run, timed: how much of its wall time goes outside the training steps.

    python -m benchmarks.bench_many_documents                       # 1,000 documents, the issue's shape
    python -m benchmarks.bench_many_documents --docs 200 --epochs 1  # a quicker look
    python -m benchmarks.bench_many_documents --profile              # adds the top functions by time

The shape: SmolLM2-135M (the offline GGUF), fictional documents of one 48-word segment, a keyed
memory of 256 entries on block 27, key_dim 8, tanh, lr 1e-2, `other` negatives, --docs_per_step 16,
batch 16. The run is `train_guidance.py` in a subprocess, as a user runs it; its summary.json gives
wall_seconds and train_seconds (the epochs' steps). Human-readable lines first, one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.record import write_record

ROOT = Path(__file__).resolve().parents[1]


def train_argv(args: argparse.Namespace, save_dir: Path) -> list[str]:
    return ["--lm_name", "smollm2", "--lm_size", "135m", "--num_gpus", "0",
            "--dataset", "synthetic", "--synthetic_articles", str(args.docs), "--max_labels", str(args.docs),
            "--max_segments", "1", "--segment_length", "48", "--max_length", "96",
            "--hook_memory_layer", "27", "--hook_memory_dim", str(args.entries), "--key_dim", str(args.key_dim),
            "--key_activation", "tanh", "--lr", "1e-2", "--negative_key_type", "other",
            "--target_negative_ce", "4.5", "--guidance", "0.1", "--docs_per_step", str(args.docs_per_step),
            "--batch_size", "16", "--num_epochs", str(args.epochs), "--save_freq", str(args.epochs),
            "--seed", "1", "--save_dir", str(save_dir), *args.extra]


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's shape, the flags train_argv reads (bench_retrain_shard shares them)."""
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--entries", type=int, default=256)
    parser.add_argument("--key_dim", type=int, default=8)
    parser.add_argument("--docs_per_step", type=int, default=16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    parser.add_argument("--record", metavar="JSON", help="also write the figures, stamped, to this result file "
                                                          "(docs/results/many_documents.json)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for train_guidance.py")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="docmem-many-") as tmp:
        save_dir = Path(tmp) / "runs"
        prefix = [sys.executable]
        profile = Path(tmp) / "profile.out"
        if args.profile:
            prefix += ["-m", "cProfile", "-o", str(profile)]
        start = time.perf_counter()
        done = subprocess.run([*prefix, str(ROOT / "train_guidance.py"), *train_argv(args, save_dir)], cwd=ROOT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True)
        process_seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        summary = json.loads((save_dir / "run_0" / "summary.json").read_text())
        config_bytes = (save_dir / "run_0" / "config.yaml").stat().st_size
        if args.profile:
            stats = pstats.Stats(str(profile))
            stats.sort_stats("cumulative").print_stats(40)
    outside = summary["wall_seconds"] - summary["train_seconds"]
    result = {"documents": args.docs, "epochs": args.epochs, "docs_per_step": args.docs_per_step,
              "entries": args.entries, "key_dim": args.key_dim, "process_seconds": round(process_seconds, 1),
              "wall_seconds": summary["wall_seconds"], "train_seconds": summary["train_seconds"],
              "summary_seconds": summary.get("summary_seconds"), "prefix_seconds": summary.get("prefix_seconds"),
              "outside_seconds": round(outside, 1),
              "outside_seconds_but_the_prefix": round(outside - (summary.get("prefix_seconds") or 0.0), 1),
              "config_yaml_bytes": config_bytes, "initial_ce_positive": summary["initial_ce_positive"],
              "final_ce_positive": summary["final_ce_positive"], "final_ce_negative": summary["final_ce_negative"]}
    print(f"{args.docs} documents, {args.epochs} epochs: wall {summary['wall_seconds']:.1f} s, training steps "
          f"{summary['train_seconds']:.1f} s, outside them {outside:.1f} s "
          f"({100 * outside / summary['wall_seconds']:.0f}%), of which the frozen prefix that the steps read "
          f"{summary.get('prefix_seconds') or 0.0:.1f} s; the process {process_seconds:.1f} s")
    if args.record:
        write_record(args.record, result, "benchmarks.bench_many_documents", argv)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
