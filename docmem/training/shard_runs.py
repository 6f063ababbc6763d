"""Training a sharded run (--memory_shards S > 1): one isolated sub-run per shard, then one memory/.

    run_N/config.yaml          the run's config; each document's draw position and shard
    run_N/shards/shard_K/run_0 shard K's sub-run: an ordinary run folder (config.yaml with
                               --shard_index K, checkpoint, metrics, memory/), trained on its
                               documents alone, with the seed of (--seed, K)
    run_N/memory/              the ShardedMemory (docmem/sharding.py) made of the shards' memories
    run_N/summary.json         wall time (the shards' sum) and each shard's summary

Shards train one after another through train_guidance's own loop, so each has its own AdamW
(no weight decay on another shard's steps), its own gradient clipping (its norm alone), its own
generators, and its own `other` negatives (its documents only). A shard holding one document has
no other document to draw a negative from: it uses `random` negatives (a normal key), since a key
borrowed from another shard would make it depend on that shard. A shard whose documents are all
excluded is not trained (SISA: forgetting its last document drops it). `--resume run_N` skips
finished shards and resumes or starts the others.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from docmem import run_folder
from docmem.atomic import whole_folder
from docmem.config import RUN_CONFIG_NAME, TrainConfig, load_run_config
from docmem.distributed import DistContext
from docmem.errors import Interrupted, UsageError
from docmem.provenance import provenance_from_saved
from docmem.sharding import ShardedMemory, shard_assignment
from document_memories import load_memory

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
TrainOne = Callable[[TrainConfig, DistContext], tuple[Path, "dict | None"]]


def shard_dir(run_dir: Path, shard: int) -> Path:
    return run_dir / SHARDS_DIR / f"shard_{shard}"


def shard_config(config: TrainConfig, run_dir: Path, shard: int, num_docs: int) -> TrainConfig:
    """Shard K's sub-run config: the run's, on shard K's documents, in its own folder."""
    negative = "random" if num_docs == 1 and config.negative_key_type == "other" else config.negative_key_type
    return replace(config, shard_index=shard, save_dir=str(shard_dir(run_dir, shard)), resume=None,
                   eval_at_end=False, report_to="none", negative_key_type=negative)


def _finished(folder: Path) -> Path | None:
    runs = sorted(folder.glob("run_*")) if folder.is_dir() else []
    return runs[0] if runs else None


def train_sharded(config: TrainConfig, dist_ctx: DistContext, train_one: TrainOne, run_dir: Path | None = None
                  ) -> tuple[Path, dict | None]:
    """Train every shard not yet finished in run_dir (new when None, config.resume when resuming), then
    write memory/ and summary.json. Returns (run folder, summary; None on other ranks)."""
    documents = run_folder.load_documents(config)
    assignment = shard_assignment(config.max_labels, config.memory_shards)
    if run_dir is None and config.resume:
        run_dir = Path(config.resume)
    if run_dir is None:
        run_dir = Path(dist_ctx.broadcast_object(str(run_folder.new_run_dir(config.save_dir)) if dist_ctx.is_main
                                                 else None))
    if dist_ctx.is_main and not (run_dir / RUN_CONFIG_NAME).is_file():
        run_folder.write_run_config(run_dir, replace(config, resume=None), {
            "run_dir": str(run_dir), "shard_assignment": assignment}, documents)
    sub_runs: dict[int, Path] = {}
    for shard in range(config.memory_shards):
        mine = [d for d in documents if assignment[d.index] == shard]
        if not mine:
            continue  # every document of this shard is excluded: nothing to train
        sub = shard_config(config, run_dir, shard, len(mine))
        existing = _finished(shard_dir(run_dir, shard))
        if existing is not None and not (existing / RUN_CONFIG_NAME).is_file():  # killed before it wrote anything
            shutil.rmtree(existing)
            existing = None
        if existing is not None and (existing / run_folder.MEMORY_DIR).is_dir():
            sub_runs[shard] = existing
            continue
        if existing is not None:
            sub = replace(sub, resume=str(existing))
        log.info(f"shard {shard}: {len(mine)} documents (draw positions {[d.index for d in mine]})")
        try:
            sub_runs[shard], _ = train_one(sub, dist_ctx)
        except Interrupted as err:  # resume the whole run, not the shard's sub-run alone
            where = str(err).split("; continue with")[0]
            raise Interrupted(f"shard {shard}: {where}; continue with --resume {run_dir}", err.exit_code) from err
    if not dist_ctx.is_main:
        return run_dir, None
    return run_dir, finish_sharded(run_dir, sub_runs)


def finish_sharded(run_dir: Path, sub_runs: dict[int, Path]) -> dict[str, Any]:
    """memory/ (the ShardedMemory) and summary.json from the finished shards' sub-runs."""
    _, saved = load_run_config(run_dir, flag="run_dir")
    positions = [d["draw_position"] for d in saved["documents"]]
    shard_of = [d["shard"] for d in saved["documents"]]
    ids = sorted(sub_runs)
    memories, rows = [], []
    for shard in ids:
        _, sub_saved = load_run_config(sub_runs[shard], flag="run_dir")
        rows.append([d["draw_position"] for d in sub_saved["documents"]])
        memories.append(load_memory(sub_runs[shard] / run_folder.MEMORY_DIR))
    doc_shard = [ids.index(k) for k in shard_of]
    doc_row = [rows[s].index(p) for s, p in zip(doc_shard, positions)]
    memory = ShardedMemory(memories, ids, doc_shard, doc_row)
    first = load_run_config(sub_runs[ids[0]], flag="run_dir")[1]
    saved["resolved"] = {**first.get("resolved", {}), **saved.get("resolved", {})}
    run_folder.write_atomic(run_dir / RUN_CONFIG_NAME, load_run_config(run_dir, flag="run_dir")[0].to_yaml(
        {k: saved[k] for k in ("resolved", "documents")}))
    memory.save(run_dir / run_folder.MEMORY_DIR, provenance=provenance_from_saved(saved))
    shards = {str(k): json.loads((sub_runs[k] / run_folder.SUMMARY_NAME).read_text()) for k in ids}
    counts = {str(k): sum(1 for s in shard_of if s == k) for k in ids}

    def weighted(name: str) -> float | None:
        values = [(shards[k][name], counts[k]) for k in shards if shards[k].get(name) is not None]
        return sum(v * n for v, n in values) / sum(n for _, n in values) if values else None

    summary = {"initial_ce_positive": weighted("initial_ce_positive"),
               "initial_ce_negative": weighted("initial_ce_negative"),
               "final_ce_positive": weighted("final_ce_positive"), "final_ce_negative": weighted("final_ce_negative"),
               "epochs": saved.get("num_epochs"), "num_documents": len(positions), "num_shards": len(ids),
               "wall_seconds": sum(s["wall_seconds"] for s in shards.values()), "run_dir": str(run_dir),
               "shards": shards}
    run_folder.write_atomic(run_dir / run_folder.SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


def forget_by_retraining(run_dir: Path, position: int, out: Path, train_one: TrainOne) -> tuple[Path, dict]:
    """SISA's exact forgetting: a new run folder `out` equal to a fresh run with the document at draw
    `position` excluded. Every other shard's sub-run is copied unchanged; the document's shard is
    retrained from its initial state on its remaining documents (or dropped when none remain)."""
    config, _ = load_run_config(run_dir, flag="run_dir")
    if config.memory_shards < 2:
        raise UsageError(f"--method retrain_shard: {run_dir} has one shard (--memory_shards 1); use --method unlearn, "
                         "or train again with --exclude_docs")
    excluded = config.excluded_positions()
    if position in excluded:
        raise UsageError(f"--doc: draw position {position} is already forgotten in {run_dir}")
    new = replace(config, exclude_docs=",".join(str(p) for p in sorted([*excluded, position])),
                  save_dir=str(out.parent), resume=None)
    shard = retrained_shard(run_dir, position)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(config.memory_shards):  # each copy appears whole; one already there was made by a killed retrain
        if k != shard and shard_dir(run_dir, k).is_dir() and not shard_dir(out, k).exists():
            with whole_folder(shard_dir(out, k)) as tmp:
                shutil.copytree(shard_dir(run_dir, k), tmp, dirs_exist_ok=True)
    return train_sharded(new, DistContext(), train_one, run_dir=out)


def retrained_shard(run_dir: Path, position: int) -> int:
    """The shard that holds the document at draw `position` (the one forget_by_retraining trains again)."""
    config, _ = load_run_config(run_dir, flag="run_dir")
    return shard_assignment(config.max_labels, config.memory_shards)[position]


def unfinished_retrain(out: Path, run_dir: Path, position: int) -> bool:
    """Whether `out` holds what a killed forget_by_retraining of draw `position` left: its shard copies, at
    most its config.yaml (excluding that position) and memory/, no summary.json. Running it again continues it."""
    if not out.is_dir() or (out / run_folder.SUMMARY_NAME).exists():
        return False
    if any(p.name not in ("shards", RUN_CONFIG_NAME, run_folder.MEMORY_DIR) and not p.name.startswith(".")
           for p in out.iterdir()):
        return False
    if not (out / RUN_CONFIG_NAME).is_file():
        return True
    config, _ = load_run_config(out, flag="out")
    wanted = sorted({*load_run_config(run_dir, flag="run_dir")[0].excluded_positions(), position})
    return config.excluded_positions() == wanted
