"""Training the LoRA baselines (`--document_memory lora / lora_shared`) in the same harness as the memory:
the same documents, batches (docmem/batching.py), epochs, optimizer (AdamW, --lr, clipping, accumulation,
schedule) and run folder (config.yaml, metrics.jsonl, memory/, summary.json); the loss is the LM loss only
(no keys, no guidance).

A batch may hold several documents (--docs_per_step): for per-document LoRA each document's rows (a chunk)
run with that document's adapter active (peft's set_adapter), and the step's loss is the mean over chunks
of their token-mean CE, as the memory's is. Gradients are clipped per adapter, so an adapter's weights
depend only on its own document's text: deleting it forgets that document exactly.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from docmem import optimizer_step as optimizer_steps
from docmem import run_folder
from docmem.baselines.lora_memory import LoraAdapters, LoraEngine, adapter_seeds, attach_lora, plan_lora, save_adapters
from docmem.batching import Batch, make_batches
from docmem.config import TrainConfig
from docmem.errors import NonFiniteLoss
from docmem.provenance import provenance_from_saved
from docmem.training.run_state import LOSS_PARTS, make_scheduler
from docmem.training.signals import StopOnSignal
from foundations import placement
from utils import seed_everything

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """One document's rows of a batch, with the adapter that trains on them."""
    batch: Batch
    adapter: str
    groups: int  # the documents' chunks it holds (1 when split per document)


@dataclass
class LoraRun:
    config: TrainConfig
    run_dir: Path
    adapters: LoraAdapters
    engine: LoraEngine
    steps: list[list[Chunk]]  # per training batch, its chunks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    seconds_per_adapter: dict[str, float] = field(default_factory=dict)  # time spent in each adapter's chunks


def split_chunks(batches: list[Batch], adapters: LoraAdapters) -> list[list[Chunk]]:
    """Each batch as its chunks (per-document LoRA), or whole (one shared adapter); each part gets a
    batch index of its own (the prefix cache's key)."""
    steps, index = [], 0
    for batch in batches:
        if adapters.plan.kind == "lora_shared":
            parts = [(batch, adapters.adapter_of(0))]
        else:
            parts = []
            for group in torch.unique_consecutive(batch.group_ids).tolist():
                rows = (batch.group_ids == group).nonzero().squeeze(1)
                doc = int(batch.doc_ids[rows[0]])
                part = Batch(index=0, doc_ids=batch.doc_ids[rows], input_ids=batch.input_ids[rows],
                             attention_mask=batch.attention_mask[rows], labels=batch.labels[rows])
                parts.append((part, adapters.adapter_of(doc)))
        chunks = []
        for part, adapter in parts:
            chunks.append(Chunk(replace(part, index=index), adapter, len(torch.unique_consecutive(part.group_ids))))
            index += 1
        steps.append(chunks)
    return steps


@torch.no_grad()
def ce_own_adapter(run: LoraRun) -> float:
    """Token-weighted mean CE of the training rows under their own adapter (summary.json's ce_positive)."""
    total = tokens = 0.0
    for chunks in run.steps:
        for chunk in chunks:
            (ce,) = run.engine.losses(chunk.batch, [chunk.adapter], per_document=True)
            weights = _chunk_tokens(chunk.batch)
            total += float((ce.cpu() * weights).sum())
            tokens += float(weights.sum())
    return total / max(tokens, 1.0)


def _chunk_tokens(batch: Batch) -> torch.Tensor:
    valid = (batch.labels[:, 1:] != -100).sum(dim=1).float()
    _, group = torch.unique_consecutive(batch.group_ids, return_inverse=True)
    return torch.zeros(int(group.max()) + 1).index_add(0, group, valid)


def start_lora_run(config: TrainConfig, lock: run_folder.RunLock) -> LoraRun:
    """Documents, LM, batches, adapters and a new run_N with config.yaml (adapters' plan included)."""
    seed_everything(config.seed)
    documents = run_folder.load_documents(config)
    device = placement.resolve_device(config)
    precision = placement.resolve_precision(config, device)
    foundation = placement.open_foundation(config, device, precision.lm)
    batches = make_batches(documents, foundation.tokenizer, config.batch_size, config.max_length,
                           docs_per_step=config.docs_per_step)
    plan = plan_lora(config, foundation, documents)
    adapters = attach_lora(foundation, plan, adapter_seeds(config.seed, documents, plan.kind))
    engine = LoraEngine(adapters, precision.lm, int(config.cache_budget_gb * (1 << 30)), precision.head)
    run_dir = run_folder.new_run_dir(config.save_dir)
    lock.acquire(run_dir)
    run_folder.write_run_config(run_dir, config, {
        "device": device, **precision.record(), "lm": foundation.name, "num_blocks": foundation.num_blocks,
        "hidden_size": foundation.hidden_size, "num_segments": sum(len(d.segments) for d in documents),
        "num_batches": len(batches), "run_dir": str(run_dir), "lora": plan.record()}, documents)
    optimizer = optimizer_steps.adamw(adapters.parameters(), config.lr)
    steps_per_epoch = math.ceil(len(batches) / config.num_accumulation_steps)
    log.info(f"{plan.kind}: rank {plan.rank} on {', '.join(plan.targets)}: {plan.parameters} trainable parameters "
             f"({len(plan.adapters)} adapter(s)); the keyed memory would train {plan.keyed_parameters}")
    return LoraRun(config, run_dir, adapters, engine, split_chunks(batches, adapters), optimizer,
                   make_scheduler(optimizer, config, steps_per_epoch * config.num_epochs))


def optimizer_step(run: LoraRun, where: str) -> None:
    """Clip each adapter's gradient on its own, then step (a non-finite gradient is refused)."""
    groups = [(name, list(run.adapters.parameters(name))) for name in run.adapters.plan.adapters]
    optimizer_steps.step(run.optimizer, run.scheduler, groups, run.config.grad_clip_coeff, where)


def train_epoch(run: LoraRun, epoch: int, step: int) -> tuple[float, int]:
    """One pass over the batches; returns (mean loss over batches, optimizer steps so far)."""
    acc, total = run.config.num_accumulation_steps, 0.0  # (the LM stays in eval mode: no dropout, as the memory's)
    for i, chunks in enumerate(run.steps):
        where = f"at epoch {epoch}, batch {i + 1} of {len(run.steps)}"
        loss_sum, groups = 0.0, sum(c.groups for c in chunks)
        for chunk in chunks:  # the step's loss: the mean over its chunks; backward per part (same gradient)
            started = time.perf_counter()
            (ce,) = run.engine.losses(chunk.batch, [chunk.adapter], per_document=True)
            loss = ce.sum() / groups
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) {where}")
            (loss / acc).backward()
            loss_sum += loss.item()
            run.seconds_per_adapter[chunk.adapter] = (run.seconds_per_adapter.get(chunk.adapter, 0.0)
                                                      + time.perf_counter() - started)
        total += loss_sum
        if (i + 1) % acc == 0 or i + 1 == len(run.steps):
            optimizer_step(run, where)
            step += 1
    return total / len(run.steps), step


def train_lora(config: TrainConfig) -> tuple[Path, dict]:
    """A whole LoRA baseline run: (run folder, summary.json's content)."""
    started = time.time()
    with StopOnSignal() as stop, run_folder.RunLock() as lock:
        run = start_lora_run(config, lock)
        initial = ce_own_adapter(run)
        step, train_seconds = 0, 0.0
        for epoch in tqdm(range(1, config.num_epochs + 1), desc="epochs", unit="epoch", dynamic_ncols=True):
            t0 = time.perf_counter()
            loss, step = train_epoch(run, epoch, step)
            train_seconds += time.perf_counter() - t0
            record = {"epoch": epoch, "step": step, **dict.fromkeys(LOSS_PARTS), "loss": loss, "ce_positive": loss}
            with (run.run_dir / run_folder.METRICS_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if stop.signum:
                raise stop.interrupted(f"after epoch {epoch} (a LoRA baseline keeps no checkpoint: start it again)",
                                       None)
        final = ce_own_adapter(run)
        saved = run_folder.load_run_config(run.run_dir, flag="run_dir")[1]
        memory_dir = run.run_dir / run_folder.MEMORY_DIR
        save_adapters(run.adapters, memory_dir, {"provenance": provenance_from_saved(saved),
                                                 "titles": [d["title"] for d in saved["documents"]]})
        plan = run.adapters.plan
        per_adapter = [run.seconds_per_adapter.get(a, 0.0) for a in plan.adapters]
        summary = {
            "initial_ce_positive": initial, "initial_ce_negative": None, "final_ce_positive": final,
            "final_ce_negative": None, "epochs": config.num_epochs, "steps": step,
            "num_documents": len(saved["documents"]), "wall_seconds": time.time() - started,
            "train_seconds": train_seconds, "summary_seconds": 0.0, "peak_gpu_memory_gib": None,
            "run_dir": str(run.run_dir), "trainable_parameters": plan.parameters,
            "keyed_memory_parameters": plan.keyed_parameters, "lora_rank": plan.rank,
            "lora_targets": list(plan.targets), "parameters_per_adapter": plan.parameters_per_adapter,
            "train_seconds_per_adapter": dict(zip(plan.adapters, per_adapter)),
        }
        run_folder.write_atomic(run.run_dir / run_folder.SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return run.run_dir, summary
