"""Exact forgetting at scale, timed and checked: `forget.py --method retrain_shard` on a many-document
sharded run, against the full training, bitwise against a fresh run without the document, and the
key-searching attacker's table.

    python -m benchmarks.bench_retrain_shard                         # 1,000 documents, 10 shards
    python -m benchmarks.bench_retrain_shard --docs 100 --shards 5   # a quicker look

The runs have bench_many_documents' shape (SmolLM2-135M, fictional documents of one 48-word
segment, 256 entries on block 27, key_dim 8, 16 documents a step) with `--memory_shards S`:
1. the full sharded training (`train_guidance.py`, as a user runs it);
2. `forget.py --run_dir FULL --doc D --method retrain_shard` (it retrains the document's shard);
3. a fresh sharded training with `--exclude_docs D`: every shard's memory must equal (torch.equal)
   the forgotten run's;
4. `evaluate_memory.py --run_dir FULL --forget D --reference FRESH --forgotten FORGOTTEN` (the attack
   table), unless --no_attack.
The cost ratio is the forgetting's process wall time (LM load included) over the full training's,
and the same for the runs' own `wall_seconds`. Human-readable lines first, one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.bench_many_documents import add_shape_arguments, train_argv
from benchmarks.record import table_cells, write_record

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> tuple[float, str]:
    """Run one of the project's scripts as a user does; its wall time and stdout (exit on failure)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"bench_retrain_shard: {argv[0]} exited {done.returncode}")
    return time.perf_counter() - start, done.stdout


def shard_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every shard memory's tensors, named shard/tensor."""
    out = {}
    for file in sorted((run / "memory").glob("*/memory.safetensors")):
        out.update({f"{file.parent.name}/{name}": t for name, t in load_file(str(file)).items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--doc", type=int, default=0, help="the document forgotten (its index)")
    parser.add_argument("--no_attack", action="store_true", help="leave out the attack table")
    parser.add_argument("--keep", type=Path, help="write the runs here (default: a temporary folder)")
    parser.add_argument("--record", metavar="JSON", help="also write the cost table, stamped, to this result file "
                                                          "(docs/results/retrain_shard_scale.json)")
    parser.add_argument("--record_attack", metavar="JSON", help="also write the attack table, stamped "
                                                                 "(docs/results/key_attack_scale.json)")
    args = parser.parse_args(argv)
    args.docs_per_step = max(1, min(args.docs_per_step, args.docs // args.shards))  # a step within one shard
    with tempfile.TemporaryDirectory(prefix="docmem-retrain-") as tmp:
        root = args.keep or Path(tmp)
        args.extra = ["--memory_shards", str(args.shards)]
        full_s, _ = timed(["train_guidance.py", *train_argv(args, root / "full")])
        full = root / "full" / "run_0"
        forgot = root / "forgotten"
        forget_s, out = timed(["forget.py", "--run_dir", str(full), "--doc", str(args.doc), "--method",
                               "retrain_shard", "--out", str(forgot), "--json"])
        forget = json.loads(out)
        args.extra += ["--exclude_docs", str(args.doc)]
        fresh_s, _ = timed(["train_guidance.py", *train_argv(args, root / "fresh")])
        fresh = root / "fresh" / "run_0"
        a, b = shard_tensors(forgot), shard_tensors(fresh)
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        full_summary = json.loads((full / "summary.json").read_text())
        result = {"documents": args.docs, "shards": args.shards, "epochs": args.epochs, "doc": args.doc,
                  "full_process_seconds": round(full_s, 1), "forget_process_seconds": round(forget_s, 1),
                  "fresh_process_seconds": round(fresh_s, 1),
                  "full_wall_seconds": full_summary["wall_seconds"], "retrained_seconds": forget["retrained_seconds"],
                  "process_ratio": round(forget_s / full_s, 4),
                  "wall_ratio": round(forget["retrained_seconds"] / full_summary["wall_seconds"], 4),
                  "shard_tensors": len(a), "bitwise_equal_to_fresh": bool(equal)}
        print(f"{args.docs} documents in {args.shards} shards: full training {full_s:.1f} s, retrain_shard "
              f"{forget_s:.1f} s (ratio {result['process_ratio']:.3f}; the runs' own wall_seconds "
              f"{result['wall_ratio']:.3f}); {len(a)} shard tensors, bitwise equal to a fresh run without "
              f"document {args.doc}: {equal}")
        if args.record:
            cells = {"columns": ["", "wall time (process)", "the run's wall_seconds"],
                     "rows": [[f"full training, {args.docs} documents, --memory_shards {args.shards}",
                               f"{full_s:.1f} s", f"{full_summary['wall_seconds']:.1f} s"],
                              [f"`forget.py --method retrain_shard` (document {args.doc}'s shard)",
                               f"{forget_s:.1f} s", f"{forget['retrained_seconds']:.1f} s"],
                              ["retraining / the full training", f"**{result['process_ratio']:.3f}**",
                               f"**{result['wall_ratio']:.3f}**"],
                              ["every shard's memory torch.equal to a fresh run with --exclude_docs",
                               f"**{equal}** ({len(a)} tensors)", ""]]}
            write_record(args.record, {**cells, "measured": result}, "benchmarks.bench_retrain_shard", argv)
        if not args.no_attack:
            start = time.perf_counter()
            _, table = timed(["evaluate_memory.py", "--run_dir", str(full), "--forget", str(args.doc),
                              "--reference", str(fresh), "--forgotten", str(forgot), "--grid", "0"])
            result["attack_seconds"] = round(time.perf_counter() - start, 1)
            print(table)
            if args.record_attack:
                write_record(args.record_attack, table_cells(table), "benchmarks.bench_retrain_shard", argv)
    print(json.dumps(result))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
