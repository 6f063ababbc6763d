"""A run folder, save_dir/run_N: everything that creates, locks, writes and reads one.

Training writes a run folder and evaluation reads it; both go through this module, so neither
script imports the other. What a run folder holds, file by file: docs/run_folder.md.

- creating: new_run_dir (run_N, the first free N), RunLock (one process per run),
  write_atomic (docmem/atomic.py: every file replaced whole, fsync'd), write_run_config (config.yaml).
- the run's inputs: load_documents, new_memory (the device, the precision and the LM come from
  foundations/placement.py).
- a saved run: resolve_run_dir, load_run -> LoadedRun (its config, LM, memory and documents,
  the documents checked against config.yaml).
- continuing: update_num_epochs, rewind_run_dir (the folder made to agree with a checkpoint),
  save_memory (memory/ replaced as a whole).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

import foundations
import wikitext
from docmem.atomic import remove_leftovers, write_atomic
from docmem.config import RUN_CONFIG_NAME, TrainConfig, load_run_config
from docmem.errors import ConfigError
from docmem.provenance import provenance_from_saved
from docmem.sharding import ShardedMemory, load_any_memory, run_positions, shard_assignment
from document_memories import DocumentMemory, MemoryConfig
from foundations import Foundation
from foundations.placement import open_foundation, resolve_device, resolve_precision

log = logging.getLogger(__name__)

MEMORY_DIR = "memory"
LORA_CONFIG_NAME = "lora_config.json"  # memory/ of a LoRA baseline run (docmem/baselines/lora_memory.py) holds it
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
# the picture of each summaries/epoch_NNNN/ folder that goes into each GIF (SummaryWriter.frames)
GIF_FRAMES = (("losses", "losses.png"), ("docreps", "selection.png"), ("logits", "logit_lens.png"))


# ---- creating and writing ----------------------------------------------------------------------

def new_run_dir(save_dir: str | Path) -> Path:
    """save_dir/run_N with N the first free number. mkdir is atomic, so two runs started at
    once into one save_dir never share a folder."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = root / f"run_{n}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


class RunLock:
    """An exclusive lock on the run folder (flock: released when the process ends, however it
    ends), so two processes never train the same run_N."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, run_dir: Path) -> None:
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("resume", str(run_dir), "another process is training this run right now") from None
        self.fd = fd

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def document_entries(documents: list[wikitext.Document]) -> list[dict[str, Any]]:
    """config.yaml's `documents`: what identifies each trained document, in key order."""
    return [{"title": d.title, "article_index": d.article_index, "segments": len(d.segments),
             "opening": wikitext.opening(d.segments[0], d.title)} for d in documents]


def write_run_config(run_dir: Path, config: TrainConfig, resolved: dict[str, Any],
                     documents: list[wikitext.Document]) -> None:
    """config.yaml: the TrainConfig, what it resolved to here, and the documents drawn."""
    entries = document_entries(documents)
    if is_subset_run(config):  # each document's draw position and shard (fixed: docmem/sharding.py)
        assignment = shard_assignment(config.max_labels, config.memory_shards)
        entries = [dict(e, draw_position=d.index, shard=assignment[d.index]) for e, d in zip(entries, documents)]
    write_atomic(run_dir / RUN_CONFIG_NAME, config.to_yaml({"resolved": resolved, "documents": entries}))


def update_num_epochs(run_dir: Path, num_epochs: int) -> None:
    path = run_dir / RUN_CONFIG_NAME
    data = yaml.safe_load(path.read_text())
    if data.get("num_epochs") != num_epochs:
        data["num_epochs"] = num_epochs
        write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def rewind_run_dir(run_dir: Path, history: list[dict], frames: dict[str, list[Path]]) -> None:
    """Make the run folder agree with a checkpoint at epoch len(history): metrics.jsonl holds
    exactly its epochs, later summaries are removed, and the GIF frame lists (SummaryWriter.frames:
    GIF name -> its frames) are rebuilt from the summaries kept."""
    epoch = len(history)
    remove_leftovers(run_dir)  # half-written files of a process killed while writing
    write_atomic(run_dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in history))
    (run_dir / SUMMARY_NAME).unlink(missing_ok=True)
    for folder in sorted((run_dir / "summaries").glob("epoch_*")):
        if not folder.name.removeprefix("epoch_").isdigit() or int(folder.name.removeprefix("epoch_")) > epoch:
            shutil.rmtree(folder)
            continue
        for kind, picture in GIF_FRAMES:
            if (folder / picture).is_file():
                frames[kind].append(folder / picture)


def save_memory(memory: DocumentMemory | ShardedMemory, run_dir: Path) -> None:
    """run_dir/memory/ (memory.safetensors + memory_config.json with the run's provenance, from its
    config.yaml), replaced as a whole."""
    memory.save(run_dir / MEMORY_DIR, provenance=provenance_from_saved(load_run_config(run_dir, flag="run_dir")[1]))


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records (one per epoch); [] when the run has none yet."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the run's inputs: documents, the memory ------------------------------

def load_documents(config: TrainConfig) -> list[wikitext.Document]:
    """The config's documents, drawn from its data source exactly as in training."""
    try:
        articles = wikitext.load_articles(config.dataset, data_split=config.data_split, data_path=config.data_path,
                                          cache_dir=config.data_cache_dir, num_synthetic=config.synthetic_articles,
                                          seed=config.seed)
    except ValueError as err:  # a local copy without the asked-for config, split or column
        flag, value = ("data_path", config.data_path) if config.data_path else ("dataset", config.dataset)
        raise ConfigError(flag, value, str(err).removeprefix(f"--{flag} {value} ")) from err
    if config.max_labels > len(articles):
        raise ConfigError("max_labels", config.max_labels, f"only {len(articles)} articles are available")
    try:  # the released draw (docs/fidelity.md): NumPy's seeded choice, in draw order
        drawn = wikitext.select_documents(articles, config.max_labels, config.seed, config.segment_length,
                                          config.max_segments)
    except ValueError as err:
        raise ConfigError("max_labels", config.max_labels, str(err)) from err
    if not is_subset_run(config):
        return drawn
    if config.memory_shards > len(drawn):
        raise ConfigError("memory_shards", config.memory_shards, f"more shards than the {len(drawn)} documents drawn")
    # a document keeps its draw position (Document.index): its shard and key row never move
    kept = [drawn[p] for p in run_positions(len(drawn), config.max_labels, config.memory_shards,
                                            config.excluded_positions(), config.shard_index)]
    if not kept:
        raise ConfigError("exclude_docs", config.exclude_docs, f"leaves none of the {len(drawn)} documents drawn")
    if (config.shard_index < 0 and config.memory_shards == 1 and len(kept) < 2 and config.guidance_active
            and config.negative_key_type == "other"):
        raise ConfigError("exclude_docs", config.exclude_docs, "leaves one document, and --negative_key_type other "
                          "needs at least 2: use --negative_key_type random (as a one-document shard does)")
    return kept


def is_subset_run(config: TrainConfig) -> bool:
    """Whether the run trains a part of its draw (a shard, or without --exclude_docs)."""
    return config.memory_shards > 1 or bool(config.excluded_positions())


def documents_mismatch(saved: list[Any], documents: list[wikitext.Document]) -> str | None:
    """How the documents drawn now differ from config.yaml's `documents` (None: they agree).
    Entries written before article_index was recorded compare on what they hold."""
    now = document_entries(documents)
    if len(saved) != len(now):
        return f"{len(now)} documents now, {len(saved)} in {RUN_CONFIG_NAME}"
    for i, (old, new) in enumerate(zip(saved, now)):
        old = old if isinstance(old, dict) else {"title": str(old)}
        for key in ("title", "article_index", "segments"):
            if key in old and old[key] != new[key]:
                return f"document {i}: {key} {new[key]!r} now, {old[key]!r} in {RUN_CONFIG_NAME}"
    return None


def memory_config_for(config: TrainConfig, hidden_size: int, num_docs: int) -> MemoryConfig:
    """The MemoryConfig a run's flags ask for."""
    return MemoryConfig(
        hidden_size=hidden_size, num_docs=num_docs, memory_dim=config.hook_memory_dim,
        key_dim=config.key_dim, key_activation=config.key_activation, lm_act=config.lm_act,
        module_type=config.document_key_module_type, key_internal_dim=config.key_internal_dim,
        key_internal_layers=config.key_internal_layers, key_internal_activation=config.key_internal_activation,
        learn_doc_keys=config.learn_doc_keys, use_keys=config.uses_keys, init=config.memory_init)


def new_memory(config: TrainConfig, foundation: Foundation, documents: list[wikitext.Document]) -> DocumentMemory:
    """A freshly initialised memory for the config and documents, on the device of its hooked block.

    A run on part of its draw (a shard, --exclude_docs) draws the key matrix for all --max_labels
    positions and keeps its documents' rows: a document's key does not depend on which others exist."""
    subset = is_subset_run(config)
    memory_config = memory_config_for(config, foundation.hidden_size, config.max_labels if subset else len(documents))
    memory = DocumentMemory(memory_config, generator=torch.Generator().manual_seed(config.train_seed))
    if subset:
        state = memory.state_dict()
        state["doc_keys"] = state["doc_keys"][[d.index for d in documents]]
        memory = DocumentMemory(replace(memory_config, num_docs=len(documents)))
        memory.load_state_dict(state)
    return memory.to(foundations.block_device(foundation, config.hook_memory_layer))


# ---- a saved run ---------------------------------------------------------------------------------

@dataclass
class LoadedRun:
    run_dir: Path
    config: TrainConfig
    saved: dict[str, Any]  # config.yaml as written (with resolved and documents)
    foundation: Foundation
    memory: DocumentMemory | ShardedMemory | None  # None: a baseline (LoRA, the prompt), scored by its own engine
    documents: list[wikitext.Document]  # in key order
    dtype: torch.dtype
    head_dtype: torch.dtype | None = None  # the vocabulary head's products when scoring (None: the head's own)


class DeviceChoice(Protocol):
    device: str  # auto, cpu, cuda, cuda:N (evaluation.options.EvalOptions has it)


FoundationCache = dict[tuple, Foundation]


def resolve_run_dir(path: str | Path, flag: str = "run_dir") -> Path:
    """A run folder (has config.yaml), or a save_dir: its highest-numbered run_N with a memory."""
    path = Path(path)
    if (path / RUN_CONFIG_NAME).is_file():
        return path
    if path.is_dir():
        runs = sorted((p for p in path.glob("run_*") if p.name[4:].isdigit() and (p / MEMORY_DIR).is_dir()),
                      key=lambda p: int(p.name[4:]))
        if runs:
            return runs[-1]
        raise ConfigError(flag, str(path), f"neither a run folder (no {RUN_CONFIG_NAME}) nor a save_dir holding "
                                           "a finished run_N")
    raise ConfigError(flag, str(path), "no such folder")


def load_run(run_dir: str | Path, options: DeviceChoice | None = None,
             foundation_cache: FoundationCache | None = None) -> LoadedRun:
    """The run's LM (from its config), its documents (checked against config.yaml) and its
    memory. options.device picks the device (auto: the run's own choice). A foundation_cache
    shares one loaded LM between runs that use the same one."""
    run_dir = Path(run_dir)
    config, saved = load_run_config(run_dir, flag="run_dir")
    device = resolve_device(config, options.device if options is not None else "auto")
    precision = resolve_precision(config, device)
    dtype = precision.lm
    cache_key = (config.lm_name, config.lm_size, config.lm_path, config.lm_cache_dir, device, str(dtype))
    foundation = (foundation_cache or {}).get(cache_key)
    if foundation is None:
        log.info(f"loading the LM ({config.lm_path or f'{config.lm_name}-{config.lm_size}'}) on {device}")
        foundation = open_foundation(config, device, dtype)
        if foundation_cache is not None:
            foundation_cache[cache_key] = foundation
    documents = load_documents(config)
    mismatch = documents_mismatch(saved.get("documents", []), documents) if "documents" in saved else None
    if mismatch:
        raise ConfigError("run_dir", str(run_dir), f"the documents rebuilt from {RUN_CONFIG_NAME} differ from those "
                                                   f"it was trained on ({mismatch}): the data source or the "
                                                   "segmentation code changed")
    if not (run_dir / MEMORY_DIR).is_dir():
        raise ConfigError("run_dir", str(run_dir), f"no {MEMORY_DIR}/ folder (the run has not finished, or it crashed)")
    memory = load_any_memory(run_dir / MEMORY_DIR, device=foundations.block_device(foundation, config.hook_memory_layer),
                         expect_hidden_size=foundation.hidden_size, expect_num_docs=len(documents))
    memory.eval()
    return LoadedRun(run_dir, config, saved, foundation, memory, documents, dtype, precision.head)
