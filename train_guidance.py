"""Train a document-wise memory with guidance on a frozen causal LM.

    python train_guidance.py --lm_name pythia --lm_size 1b --hook_memory_layer 15 ...
    python train_guidance.py --help

Per batch of document i's segments (the method: README, "The method"):
    L_pos = CE(LM with memory keyed by k_i)
    L_neg = CE(LM with memory keyed by a negative key)
    loss  = L_pos + alpha * guidance_term(L_pos, L_neg)
Only the memory trains. Writes save_dir/run_N/ (docs/run_folder.md lists every file).

This file holds the command line, the loss of one step and the epoch loop. How a run starts
(new or resumed) and ends is docmem/training/run_state.py; the run folder is docmem/run_folder.py.

Interrupting and resuming: a checkpoint is written at the start, every --save_freq epochs, at
the end, and on SIGINT/SIGTERM (after the current optimizer step); `--resume save_dir/run_N`
continues that run in place, bit for bit on CPU in fp32.

Exit codes (docmem/errors.py): 0 done; 1 model or data unavailable (offline); 2 bad flag, bad
file or resume mismatch (one stderr line); 3 non-finite loss (the last good checkpoint is kept);
130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from docmem import optimizer_step as optimizer_steps
from docmem.batching import Batch
from docmem.cli import run_command
from docmem.config import TrainConfig, parse_args
from docmem.cuda_graphs import CudaRecorder, EagerRecorder, GraphedSteps, StepFunctions, Trainables
from docmem.distributed import DistContext, init_distributed, shutdown
from docmem.engines import LossEngine
from docmem.errors import NonFiniteLoss
from docmem.evaluation.options import EvalOptions
from docmem.evaluation.pipeline import evaluate_trained
from docmem.run_folder import METRICS_NAME, RunLock
from docmem.step_values import read_on_host
from docmem.training.checkpoint import checkpoint_path, read_checkpoint
from docmem.training.key_ce import ce_under_keys
from docmem.training.lora_runs import train_lora
from docmem.training.run_state import LOSS_PARTS, RunState, finish_run, start_run
from docmem.training.shard_runs import train_sharded
from docmem.training.signals import StopOnSignal
from docmem.training.step_loss import StepResult, losses_under_keys, refuse_non_finite_loss, step_keys
from document_memories import DocumentMemory
from foundations.placement import resolve_device
from utils import selection_stats

log = logging.getLogger("docmem.train")
EXIT_NON_FINITE = NonFiniteLoss.exit_code


# ---- the loss of one step ----------------------------------------------------------------------

def train_step_losses(engine: LossEngine, memory: DocumentMemory, batch: Batch, config: TrainConfig,
                      generator: torch.Generator) -> tuple[torch.Tensor, StepResult]:
    """The loss of one batch (not yet backpropagated) and its parts.

    A batch holds one or more chunks (a chunk: one document's segments); each chunk has its own
    key and its own negative, and the loss is the mean over chunks of CE_pos + alpha * term, so
    P processes with K chunks each give the gradient of one process with K x P."""
    return losses_under_keys(engine, batch, config, *step_keys(memory, batch, config, generator))


def optimizer_step(state: RunState, where: str, pending: Sequence[tuple[str, StepResult]] = ()
                   ) -> list[dict[str, float | None]]:
    """Clip, check, step, zero. `pending`: the step's batches (where, loss parts). Their parts and the
    gradient norm are read on the host together, once; a non-finite one is refused before the
    weights take it. Returns each batch's parts as floats."""
    def check(values: list[float | None]) -> None:
        for (at, _), j in zip(pending, range(len(pending))):
            refuse_non_finite_loss(dict(zip(LOSS_PARTS, values[j * len(LOSS_PARTS):])), at)

    values = optimizer_steps.step(state.optimizer, state.scheduler, [("", state.memory.trainable_parameters())],
                                  state.config.grad_clip_coeff, where,
                                  [getattr(p, k) for _, p in pending for k in LOSS_PARTS], check)
    return [dict(zip(LOSS_PARTS, values[j * len(LOSS_PARTS):])) for j in range(len(pending))]


# ---- the epoch loop ----------------------------------------------------------------------------

def graphed_steps(state: RunState) -> GraphedSteps:
    """--cuda_graphs: the run's steps captured per batch (docmem/cuda_graphs.py), with this script's key
    draw, loss and eager step."""
    config = state.config

    def eager_step(batch: Batch, pos: torch.Tensor | None, neg: torch.Tensor | None, where: str
                   ) -> list[float | None]:
        loss, parts = losses_under_keys(state.engine, batch, config, pos, neg)
        loss.backward()
        read = optimizer_step(state, where, [(where, parts)])[0]
        return [read[k] for k in LOSS_PARTS]

    def losses(batch: Batch, pos: torch.Tensor | None, neg: torch.Tensor | None
               ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        loss, parts = losses_under_keys(state.engine, batch, config, pos, neg)
        return loss, [getattr(parts, k) for k in LOSS_PARTS]

    engine = state.engine
    recorder = CudaRecorder(state.device) if state.device.startswith("cuda") else EagerRecorder()
    num_sets = 1 if not config.uses_keys or not config.guidance_active else 2
    trainables = Trainables(state.optimizer, state.scheduler, list(state.memory.trainable_parameters()),
                            config.grad_clip_coeff)
    functions = StepFunctions(keys=lambda batch: step_keys(state.memory, batch, config, state.generator),
                              losses=losses, prepare=lambda batch: engine.prepare(batch, num_sets, True),
                              eager_step=eager_step,
                              check=lambda parts, where: refuse_non_finite_loss(dict(zip(LOSS_PARTS, parts)), where))
    return GraphedSteps(trainables, functions, recorder, config.cuda_graphs)


def train_epoch(state: RunState) -> None:
    """The batches of epoch progress.epoch + 1, from batch progress.batch on (a mid-epoch resume).
    On a signal: finish the optimizer step, write a checkpoint, raise Interrupted."""
    config, progress, batches = state.config, state.progress, state.batches
    epoch, acc = progress.epoch + 1, config.num_accumulation_steps
    state.memory.train()
    pending: list[tuple[str, StepResult]] = []  # this step's batches, their loss parts not yet read
    for i in range(progress.batch, len(batches)):
        where = f"at epoch {epoch}, step {progress.step + 1} (batch {i + 1} of {len(batches)})"
        if state.graphs is not None:  # one batch a step (no accumulation): the whole step is one replay
            reads = [dict(zip(LOSS_PARTS, state.graphs.step(batches[i], where)))]
            progress.batch = i + 1
        else:
            loss, parts = train_step_losses(state.engine, state.memory, batches[i], config, state.generator)
            pending.append((where, parts))
            if config.detect_anomaly:  # read now: anomaly mode would stop in the backward of a non-finite loss
                refuse_non_finite_loss(dict(zip(LOSS_PARTS, read_on_host([getattr(parts, k) for k in LOSS_PARTS]))),
                                       where)
            try:
                (loss / acc).backward()
            except RuntimeError as err:  # --detect_anomaly: a backward that produced NaN
                if not config.detect_anomaly:
                    raise
                raise NonFiniteLoss(f"non-finite gradient {where} ({str(err).splitlines()[0]})") from err
            progress.batch = i + 1
            if (i + 1) % acc != 0 and i + 1 != len(batches):
                continue
            reads, pending = optimizer_step(state, where, pending), []
        for read in reads:
            for key, value in read.items():
                progress.sums[key] += value if value is not None else float("nan")
        progress.step += 1
        if state.stop.signum and progress.batch < len(batches):
            state.save_checkpoint()
            raise state.stop.interrupted(f"at epoch {epoch}, step {progress.step} (batch {progress.batch} of "
                                         f"{len(batches)})", state.run_dir)


def end_of_epoch(state: RunState) -> dict:
    """The epoch's metrics.jsonl record (mean losses over processes, selection statistics)."""
    progress, dist_ctx = state.progress, state.dist_ctx
    epoch = progress.epoch + 1
    means = dist_ctx.mean([progress.sums[k] / len(state.batches) for k in LOSS_PARTS])  # over processes
    record = {"epoch": epoch, "step": progress.step, **dict(zip(LOSS_PARTS, means))}
    record = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
    if state.config.uses_keys:
        with torch.no_grad():
            record.update(selection_stats(state.memory.selection(state.memory.doc_keys), state.config.l0_threshold))
    progress.history.append(record)
    progress.epoch, progress.batch, progress.sums = epoch, 0, dict.fromkeys(LOSS_PARTS, 0.0)
    if dist_ctx.is_main:
        with (state.run_dir / METRICS_NAME).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if state.tensorboard is not None:
            state.tensorboard.log_epoch(record, state.memory)
    return record


def train(state: RunState) -> None:
    """Epochs progress.epoch + 1 .. num_epochs: a metrics.jsonl line each, a summary and a
    checkpoint every save_freq epochs and at the end (rank 0 alone writes under torchrun)."""
    config, progress = state.config, state.progress
    if state.cuda_graphs and state.graphs is None:
        state.graphs = graphed_steps(state)
    bar = tqdm(total=config.num_epochs, initial=progress.epoch, desc="epochs", unit="epoch", dynamic_ncols=True,
               disable=not state.dist_ctx.is_main)
    try:
        while progress.epoch < config.num_epochs:
            started = time.perf_counter()
            train_epoch(state)
            progress.train_seconds += time.perf_counter() - started
            record = end_of_epoch(state)
            epoch = progress.epoch
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()
                             if k in ("loss", "ce_positive", "ce_negative") and v is not None}, refresh=False)
            bar.update(1)
            saved = epoch % config.save_freq == 0 or epoch == config.num_epochs
            if saved:
                state.memory.eval()
                if state.dist_ctx.is_main:
                    started = time.perf_counter()
                    state.writer.write(epoch, progress.history)
                    progress.summary_seconds += time.perf_counter() - started
                state.save_checkpoint()
            if state.stop.signum:
                if not saved:
                    state.save_checkpoint()
                raise state.stop.interrupted(f"after epoch {epoch} (step {progress.step})", state.run_dir)
    finally:
        bar.close()  # before any message, which would otherwise come out mid-bar
        if state.dist_ctx.is_main:  # GIFs, selection_stats.png: at the end, on a stop or a failure
            state.writer.write_run_pictures(progress.history)
        if state.tensorboard is not None:
            state.tensorboard.close()


# ---- a run -------------------------------------------------------------------------------------

def run(config: TrainConfig) -> Path:
    """Train and write everything into a new save_dir/run_N, or continue config.resume in place;
    returns the run folder. The LoRA baselines (--document_memory lora, lora_shared) train in
    docmem/training/lora_runs.py: same documents, batches, epochs and run folder, the LM loss only."""
    if config.uses_lora:
        run_dir, summary = train_lora(config)
        log.info(f"run written to {run_dir}: CE own adapter {summary['initial_ce_positive']:.3f} -> "
                 f"{summary['final_ce_positive']:.3f}")
        return run_dir
    dist_ctx = init_distributed(use_cuda=resolve_device(config).startswith("cuda"))
    try:
        # train_and_finish returns only plain values: the run's state (and the DDP wrapper in it)
        # must be freed before the process group is destroyed, or DDP's reducer may hold the last
        # reference to the gloo group, whose destructor joins its threads while holding the GIL
        # one of them needs, and a non-main rank can hang at exit.
        if config.memory_shards > 1 and config.shard_index < 0:  # one isolated sub-run per shard
            run_dir, summary = train_sharded(config, dist_ctx, train_and_finish)
        else:
            run_dir, summary = train_and_finish(config, dist_ctx)
    finally:
        shutdown(dist_ctx)
    if summary is not None:
        negative = summary["final_ce_negative"]
        log.info(f"run written to {run_dir}: CE own key {summary['initial_ce_positive']:.3f} -> "
                 f"{summary['final_ce_positive']:.3f}" + (f", other keys {negative:.3f}" if negative is not None else ""))
    return run_dir


def train_and_finish(config: TrainConfig, dist_ctx: DistContext) -> tuple[Path, dict | None]:
    """The run from start to memory/ and summary.json: (run folder, summary; None on other ranks)."""
    with StopOnSignal() as stop, RunLock() as lock:
        state = start_run(config, stop, lock, dist_ctx)
        with torch.autograd.set_detect_anomaly(config.detect_anomaly):
            try:
                train(state)
            except NonFiniteLoss as err:
                path = checkpoint_path(state.run_dir)
                last = read_checkpoint(path).state
                raise NonFiniteLoss(f"{err}; stopped, and kept the last good checkpoint {path} (epoch "
                                    f"{last['epoch']}, step {last['step']}); try a lower --lr, or "
                                    "--detect_anomaly to find the operation") from err
        state.memory.eval()
        final = ce_under_keys(state.engine, state.memory, state.batches, state.config, dist_ctx)
        if not dist_ctx.is_main:
            return state.run_dir, None
        summary = finish_run(state, final)
        if state.config.eval_at_end:
            evaluate_trained(state.run_dir, state.config, state.foundation, state.memory, state.documents,
                             state.dtype, EvalOptions(l0_threshold=state.config.l0_threshold))
        return state.run_dir, summary


def main(argv: list[str] | None = None) -> int:
    code = run_command("train_guidance.py", lambda: run(parse_args(argv)))
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
