"""Everything a training run carries from step to step, as one object (RunState), and how a
run starts (start_run: new or resumed) and ends (finish_run: memory/ and summary.json).

train_guidance.py holds the loss of one step and the epoch loop; they read and update a
RunState. The order of start_run is the order of the checks: first what needs no model (the
run to resume, the data), then the LM, the batches, the memory, the engine, the run folder,
the optimizer, and last the checkpoint that restores them.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import wikitext
from docmem import cuda_graphs, run_folder
from docmem import optimizer_step as optimizer_steps
from docmem.batching import Batch, make_batches
from docmem.config import RUN_CONFIG_NAME, TrainConfig, load_run_config, resume_config
from docmem.distributed import DistContext, wrap_memory
from docmem.engines import FastEngine, LossEngine, ReferenceEngine
from docmem.errors import ConfigError, NonFiniteLoss
from docmem.pictures.summary_drawing import draws_in_background
from docmem.training.checkpoint import checkpoint_to_resume, restore_checkpoint, save_checkpoint
from docmem.training.key_ce import ce_under_keys
from docmem.training.signals import StopOnSignal
from docmem.training.summaries import SummaryWriter
from docmem.training.tensorboard_log import TensorBoardLog, open_tensorboard
from document_memories import DocumentMemory
from foundations import Foundation, placement
from utils import seed_everything

log = logging.getLogger(__name__)

LOSS_PARTS = ("loss", "ce_positive", "ce_negative", "guidance_term")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in epoch + 1 (a checkpoint written mid-epoch on a signal)
    step: int = 0  # optimizer steps
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_PARTS, 0.0))
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl records so far
    initial: dict[str, float] = field(default_factory=dict)  # evaluation before training
    wall_seconds: float = 0.0  # training time of earlier sessions of this run
    train_seconds: float = 0.0  # of it, in the epochs' batches (steps); all sessions
    summary_seconds: float = 0.0  # of it, drawing the periodic summaries; all sessions
    prefix_seconds: float = 0.0  # of it, running the frozen LM below the hooked block once per batch


@dataclass
class RunState:
    """A run in progress: what it trains, with what, where it writes, and how far it got."""
    config: TrainConfig
    run_dir: Path
    device: str
    dtype: torch.dtype
    foundation: Foundation
    documents: list[wikitext.Document]
    batches: list[Batch]
    memory: DocumentMemory
    engine: LossEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # draws the negative keys; saved in the checkpoint
    writer: SummaryWriter
    stop: StopOnSignal
    dist_ctx: DistContext
    progress: Progress = field(default_factory=Progress)
    tensorboard: TensorBoardLog | None = None  # --report_to tensorboard (rank 0)
    cuda_graphs: bool = False  # --cuda_graphs resolved: the steps are captured (train_guidance.py builds them)
    graphs: cuda_graphs.GraphedSteps | None = None  # the captured steps, once built
    started: float = field(default_factory=time.time)  # this session's start (wall_seconds)

    def wall_seconds(self) -> float:
        return self.progress.wall_seconds + (time.time() - self.started)

    def save_checkpoint(self) -> None:
        """A checkpoint of everything, as training stands now (rank 0 writes it)."""
        if not self.dist_ctx.is_main:
            return
        state = asdict(self.progress)
        state["wall_seconds"] = self.wall_seconds()
        try:
            save_checkpoint(self.run_dir, self.memory, self.optimizer, self.scheduler, self.generator, state,
                            use_cuda=self.device.startswith("cuda"))
        except ValueError as err:  # non-finite memory weights: keep the last good checkpoint
            raise NonFiniteLoss(f"{err} at epoch {self.progress.epoch}, step {self.progress.step}") from err


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.num_warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if config.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _new_or_locked_run_dir(config: TrainConfig, lock: run_folder.RunLock, dist_ctx: DistContext) -> Path:
    """A new save_dir/run_N (rank 0 makes it; the other processes only learn its name)."""
    if not dist_ctx.is_main:
        return Path(dist_ctx.broadcast_object(None))
    run_dir = run_folder.new_run_dir(config.save_dir)
    dist_ctx.broadcast_object(str(run_dir))
    lock.acquire(run_dir)
    return run_dir


def start_run(config: TrainConfig, stop: StopOnSignal, lock: run_folder.RunLock,
              dist_ctx: DistContext | None = None) -> RunState:
    """Everything ready for the first (or the next) epoch: a new run_N with config.yaml and the
    evaluation before training in its first checkpoint, or config.resume restored in place."""
    started = time.time()
    dist_ctx = dist_ctx or DistContext()
    seed_everything(config.seed)
    # -- first what can be checked without the model: the run to resume, the data ----------------
    if config.resume:  # (parse_args did this already; a config built in Python must match too)
        config = resume_config(config)
    run_dir = Path(config.resume) if config.resume else None
    ckpt = None
    if run_dir is not None:
        lock.acquire(run_dir)
        ckpt = checkpoint_to_resume(run_dir, config)
    documents = run_folder.load_documents(config)
    if run_dir is not None:
        mismatch = run_folder.documents_mismatch(load_run_config(run_dir)[1].get("documents") or [], documents)
        if mismatch:
            raise ConfigError("resume", str(run_dir), f"the documents drawn now differ from those in its "
                                                      f"{RUN_CONFIG_NAME} ({mismatch}; did the data change?)")

    # -- the frozen LM, the batches, the memory and the loss engine --------------------------------
    device = placement.resolve_device(config)
    if dist_ctx.enabled and device.startswith("cuda"):
        device = f"cuda:{dist_ctx.local_rank}"
    precision = placement.resolve_precision(config, device)
    dtype = precision.lm
    # refused before the LM loads: the device and the flags decide
    why_not = cuda_graphs.refusal(config, device, dist_ctx.world_size)
    graphs = cuda_graphs.resolve(config.cuda_graphs, why_not)
    foundation = placement.open_foundation(config, device, dtype)
    if stop.signum:
        raise stop.interrupted("while loading the model", None)
    batches = make_batches(documents, foundation.tokenizer, config.batch_size, config.max_length,
                           docs_per_step=config.docs_per_step, rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    memory = run_folder.new_memory(config, foundation, documents)
    trained = wrap_memory(memory, dist_ctx)  # DistributedDataParallel under torchrun, else the memory
    engine: LossEngine
    if config.reference_loop:
        engine = ReferenceEngine(foundation, trained, config.hook_memory_layer, dtype)
    else:
        engine = FastEngine(foundation, trained, config.hook_memory_layer, dtype,
                            cache_budget_bytes=int(config.cache_budget_gb * (1 << 30)), head_dtype=precision.head)


    # -- the run folder (a new run_N, or the one being resumed) ------------------------------------
    if run_dir is None:
        run_dir = _new_or_locked_run_dir(config, lock, dist_ctx)
        if dist_ctx.is_main:
            run_folder.write_run_config(run_dir, config, {
                "device": device, **precision.record(), "lm": foundation.name,
                "num_blocks": foundation.num_blocks, "hidden_size": foundation.hidden_size,
                "num_segments": sum(len(d.segments) for d in documents), "num_batches": len(batches),
                "cuda_graphs_used": "on" if graphs else ("off (asked for)" if config.cuda_graphs == "off"
                                                         else f"off: {why_not}"),
                "run_dir": str(run_dir)}, documents)

    # -- optimizer, schedule and the negative keys' generator: restored from a checkpoint ----------
    optimizer = optimizer_steps.adamw(memory.trainable_parameters(), config.lr,
                                      capturable=graphs and device.startswith("cuda"))  # AdamW's rule
    steps_per_epoch = math.ceil(len(batches) / config.num_accumulation_steps)
    state = RunState(config=config, run_dir=run_dir, device=device, dtype=dtype, foundation=foundation,
                     documents=documents, batches=batches, memory=memory, engine=engine, optimizer=optimizer,
                     scheduler=make_scheduler(optimizer, config, steps_per_epoch * config.num_epochs),
                     generator=torch.Generator().manual_seed(config.train_seed),
                     writer=SummaryWriter(run_dir, foundation, memory, [d.title for d in documents], config,
                                          background=draws_in_background(config.summary_process, device)),
                     stop=stop, dist_ctx=dist_ctx, started=started, cuda_graphs=graphs,
                     tensorboard=open_tensorboard(config.report_to, run_dir, [d.title for d in documents],
                                                  config.key_activation) if dist_ctx.is_main else None)
    if ckpt is not None:  # continue from the checkpoint
        saved = restore_checkpoint(ckpt, memory, optimizer, state.scheduler, state.generator, len(batches))
        state.progress = Progress(**{k: saved[k] for k in Progress.__dataclass_fields__ if k in saved})
        log.info(f"resuming {run_dir} at epoch {state.progress.epoch}, step {state.progress.step}")
        run_folder.update_num_epochs(run_dir, config.num_epochs)
    else:  # a new run, or one stopped before its first checkpoint: start (over) here
        memory.eval()
        prefix_seconds = fill_prefix_cache(engine, batches, device)
        state.progress = Progress(initial=ce_under_keys(engine, memory, batches, config, dist_ctx),
                                  prefix_seconds=prefix_seconds)
        state.save_checkpoint()
    if dist_ctx.is_main:
        run_folder.rewind_run_dir(run_dir, state.progress.history, state.writer.frames)
    if stop.signum:
        raise stop.interrupted("before training", run_dir)
    return state


def fill_prefix_cache(engine: LossEngine, batches: list[Batch], device: str) -> float:
    """Run the frozen prefix of every batch once, before the first CE reads it, and return its time:
    the input every step of training reads from the cache, timed apart from the measurements."""
    if not isinstance(engine, FastEngine):
        return 0.0
    started = time.perf_counter()
    for batch in batches:
        engine.prefix(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # the time of the work, not of its launch
    seconds = time.perf_counter() - started
    log.info(f"the frozen prefix of {len(batches)} batches in {seconds:.1f} s")
    return seconds


def peak_gpu_memory_gib(device: str) -> float | None:
    """The most GPU memory this process held at once (torch.cuda.max_memory_allocated); None off CUDA."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated(torch.device(device)) / (1 << 30), 3)


def finish_run(state: RunState, final: dict[str, float | None]) -> dict[str, object]:
    """memory/ and summary.json of a finished run; returns the summary."""
    run_folder.save_memory(state.memory, state.run_dir)
    initial = state.progress.initial
    summary = {
        "initial_ce_positive": initial["ce_positive"], "initial_ce_negative": initial["ce_negative"],
        "final_ce_positive": final["ce_positive"], "final_ce_negative": final["ce_negative"],
        "epochs": state.config.num_epochs, "steps": state.progress.step, "num_documents": len(state.documents),
        "wall_seconds": state.wall_seconds(), "train_seconds": state.progress.train_seconds,
        "summary_seconds": state.progress.summary_seconds, "prefix_seconds": state.progress.prefix_seconds,
        "peak_gpu_memory_gib": peak_gpu_memory_gib(state.device),
        "run_dir": str(state.run_dir),
    }
    run_folder.write_atomic(state.run_dir / run_folder.SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary
