"""Train a document-wise memory with guidance on a frozen causal LM.

    python train_guidance.py --lm_name pythia --lm_size 1b --hook_memory_layer 15 ...
    python train_guidance.py --help

Per batch of document i's segments (METHOD.md section 2):
    L_pos = CE(LM with memory keyed by k_i)
    L_neg = CE(LM with memory keyed by a negative key)
    loss  = L_pos + alpha * guidance_term(L_pos, L_neg)
Only the memory trains. Writes save_dir/run_N/ (see README "What a run writes").

Interrupting and resuming (docs/interrupting_and_resuming.md): a checkpoint is written at the
start, every --save_freq epochs, at the end, and on SIGINT/SIGTERM (after the current optimizer
step); `--resume save_dir/run_N` continues that run in place, bit for bit on CPU in fp32.

Exit codes: 0 done; 1 model or data unavailable (offline); 2 bad flag, bad file or resume
mismatch (one stderr line); 3 non-finite loss (the last good checkpoint is kept);
130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from checkpoint import (CheckpointError, checkpoint_path, read_checkpoint, remove_stale_temporaries,
                        restore_checkpoint, save_checkpoint)
from config import RUN_CONFIG_NAME, ConfigError, TrainConfig, fail, parse_args, resolve_device, resume_config
from docmem.provenance import provenance_from_saved
from docmem.tensorboard_log import open_tensorboard
from document_memories import DocumentMemory, MemoryConfig, MemoryFileError
from batching import make_batches
from distributed import DistContext, init_distributed, shutdown, wrap_memory
from engines import Batch, FastEngine, ReferenceEngine
from utils import guidance_term, negative_keys, new_run_dir, seed_everything, selection_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXIT_NON_FINITE = 3
LOSS_PARTS = ("loss", "ce_positive", "ce_negative", "guidance_term")


def resolve_dtype(config: TrainConfig, device: str) -> torch.dtype:
    if config.precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[config.precision]


# ---- data ------------------------------------------------------------------------------------

def load_documents(config: TrainConfig) -> list:
    import wikitext

    try:
        articles = wikitext.load_articles(config.dataset, data_split=config.data_split, data_path=config.data_path,
                                          cache_dir=config.data_cache_dir, num_synthetic=config.synthetic_articles,
                                          seed=config.seed)
    except ValueError as err:  # a local copy without the asked-for config, split or column
        flag, value = ("data_path", config.data_path) if config.data_path else ("dataset", config.dataset)
        raise ConfigError(flag, value, str(err).removeprefix(f"--{flag} {value} ")) from err
    if config.max_labels > len(articles):
        raise ConfigError("max_labels", config.max_labels, f"only {len(articles)} articles are available")
    return wikitext.select_documents(articles, config.max_labels, config.seed, config.segment_length,
                                     config.max_segments)


# ---- training --------------------------------------------------------------------------------

def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
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


@dataclass
class StepResult:
    loss: float
    ce_positive: float
    ce_negative: float | None
    guidance_term: float | None


def train_step_losses(engine, memory: DocumentMemory, batch: Batch, config: TrainConfig,
                      generator: torch.Generator) -> tuple[torch.Tensor, StepResult]:
    """The loss of one batch (not yet backpropagated) and its parts.

    A batch holds one or more chunks (a chunk: one document's segments); each chunk has its own
    key and its own negative, and the loss is the mean over chunks of CE_pos + alpha * term, so
    P processes with K chunks each give the gradient of one process with K x P."""
    if not config.uses_keys:
        (ce_pos,) = engine.losses(batch, [None], per_document=True)
        loss = ce_pos.mean()
        return loss, StepResult(loss.item(), loss.item(), None, None)
    pos = memory.keys_for(batch.doc_ids)
    if not config.guidance_active:
        (ce_pos,) = engine.losses(batch, [pos], per_document=True)
        loss = ce_pos.mean()
        return loss, StepResult(loss.item(), loss.item(), None, None)
    if batch.chunk_doc_ids is not None:  # one draw per chunk of the global batch, every process alike
        drawn = negative_keys(config.negative_key_type, batch.chunk_doc_ids, memory.doc_keys, generator, config.delta)
        neg = drawn[batch.chunk_of_row.to(drawn.device)]
    else:
        neg = negative_keys(config.negative_key_type, batch.doc_ids, memory.doc_keys, generator, config.delta)
    ce_pos, ce_neg = engine.losses(batch, [pos, neg], per_document=True)
    term = guidance_term(ce_pos, ce_neg, config.target_negative_ce, config.guidance_loss)
    loss = (ce_pos + config.guidance * term).mean()
    return loss, StepResult(loss.item(), ce_pos.mean().item(), ce_neg.mean().item(), term.mean().item())


MAX_EVAL_OTHER_KEYS = 8  # past this many documents, `other` negatives are evaluated on a sample


@torch.no_grad()
def evaluate(engine, memory: DocumentMemory, batches: list[Batch], config: TrainConfig,
             dist_ctx: DistContext | None = None) -> dict[str, float | None]:
    """Token-weighted mean CE under each document's own key, and under negative keys: for
    `other`, every other document's key (the expectation of the training draw; a fixed sample of
    MAX_EVAL_OTHER_KEYS of them when there are more); for the other types, one draw from a fixed
    generator. Under torchrun every process evaluates its batches and the sums are combined."""
    n_docs = memory.config.num_docs
    sums = [0.0, 0.0, 0.0, 0.0]  # positive CE x tokens, tokens, negative CE x tokens, tokens
    generator = torch.Generator().manual_seed(12345)
    for batch in batches:
        doc_of_group = torch.unique_consecutive(batch.group_ids, return_inverse=True)[1]
        first_rows = torch.cat([torch.ones(1, dtype=torch.bool), batch.group_ids[1:] != batch.group_ids[:-1]])
        group_docs = batch.doc_ids[first_rows]
        valid = (batch.labels[:, 1:] != -100).sum(dim=1).float()
        tokens = torch.zeros(len(group_docs)).index_add(0, doc_of_group, valid)
        if not config.uses_keys:
            (ce,) = engine.losses(batch, [None], per_document=True)
            sums[0] += float((ce.cpu() * tokens).sum())
            sums[1] += float(tokens.sum())
            continue
        own = engine.losses(batch, [memory.keys_for(batch.doc_ids)], per_document=True)[0].cpu()
        if config.negative_key_type == "other" and n_docs > 1:
            others = range(n_docs)
            if n_docs - 1 > MAX_EVAL_OTHER_KEYS:
                others = torch.randperm(n_docs, generator=generator)[:MAX_EVAL_OTHER_KEYS + 1].tolist()
            per_key = torch.stack(engine.losses(batch, [memory.keys_for(torch.full_like(batch.doc_ids, j))
                                                        for j in others], per_document=True)).cpu()  # (keys, G)
            is_own = torch.tensor(list(others)).unsqueeze(1) == group_docs.unsqueeze(0)
            neg = (per_key * ~is_own).sum(0) / (~is_own).sum(0).clamp(min=1)
        else:
            drawn = negative_keys(config.negative_key_type, batch.doc_ids, memory.doc_keys, generator, config.delta)
            neg = engine.losses(batch, [drawn], per_document=True)[0].cpu()
        sums[0] += float((own * tokens).sum())
        sums[1] += float(tokens.sum())
        sums[2] += float((neg * tokens).sum())
        sums[3] += float(tokens.sum())
    if dist_ctx is not None and dist_ctx.enabled:
        sums = [v * dist_ctx.world_size for v in dist_ctx.mean(sums)]
    return {"ce_positive": sums[0] / max(sums[1], 1.0), "ce_negative": sums[2] / sums[3] if sums[3] else None}


# ---- stopping: non-finite losses and signals -------------------------------------------------

class NonFiniteLoss(RuntimeError):
    """The loss (or its gradient) became NaN or infinite; nothing of that step was saved."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: the run stopped after writing a checkpoint. `code` is 128 + the signal."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask the training loop to stop after the current optimizer
    step and write a checkpoint. A second signal stops at once (the last checkpoint stays whole)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        # os.write: a print here could re-enter a stderr write the signal interrupted
        os.write(2, f"\n{self.name}: finishing the current step, then writing a checkpoint "
                    "(send it again to stop at once)\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def interrupted(self, where: str, run_dir: Path | None) -> Interrupted:
        if run_dir is None:
            return Interrupted(f"stopped by {self.name} {where}; nothing was written", 128 + self.signum)
        return Interrupted(f"stopped by {self.name} {where}; checkpoint written to {checkpoint_path(run_dir)}; "
                           f"continue with --resume {run_dir}", 128 + self.signum)


# ---- the run folder: locking, resuming in place, atomic writes -------------------------------

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

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_to_resume(run_dir: Path, config: TrainConfig):
    """The run's checkpoint, verified, or None when it was stopped before writing one (it then
    starts over in place). Errors come before any model or data loads."""
    remove_stale_temporaries(run_dir)
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    ckpt = read_checkpoint(path)
    epoch = ckpt.state["epoch"]
    if epoch > config.num_epochs:
        raise ConfigError("num_epochs", config.num_epochs, f"the run in {run_dir} has already trained {epoch} epochs")
    if epoch == config.num_epochs and (run_dir / "summary.json").exists():
        raise ConfigError("resume", str(run_dir), f"the run has finished its {epoch} epochs; give a larger "
                                                  "--num_epochs to train it further")
    return ckpt


def check_same_documents(run_dir: Path, documents: list) -> None:
    saved = yaml.safe_load((run_dir / RUN_CONFIG_NAME).read_text()).get("documents")
    now = [{"title": d.title, "article_index": d.article_index, "segments": len(d.segments)} for d in documents]
    if saved != now:
        raise ConfigError("resume", str(run_dir), f"the documents drawn now differ from those in its {RUN_CONFIG_NAME} "
                                                  "(did the data change?)")


def update_num_epochs(run_dir: Path, num_epochs: int) -> None:
    path = run_dir / RUN_CONFIG_NAME
    data = yaml.safe_load(path.read_text())
    if data.get("num_epochs") != num_epochs:
        data["num_epochs"] = num_epochs
        write_text_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def rewind_run_dir(run_dir: Path, history: list[dict], frames: dict[str, list[Path]]) -> None:
    """Make the run folder agree with a checkpoint at epoch len(history): metrics.jsonl holds
    exactly its epochs, later summaries are removed, and the GIF frame lists (SummaryWriter.frames:
    GIF name -> its frames) are rebuilt from the summaries kept."""
    epoch = len(history)
    for tmp in run_dir.glob(".*.tmp"):  # half-written files of a process killed while writing
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    (run_dir / "summary.json").unlink(missing_ok=True)
    for folder in sorted((run_dir / "summaries").glob("epoch_*")):
        if not folder.name.removeprefix("epoch_").isdigit() or int(folder.name.removeprefix("epoch_")) > epoch:
            shutil.rmtree(folder)
            continue
        for kind, picture in (("losses", "losses.png"), ("docreps", "selection.png"), ("logits", "logit_lens.png")):
            if (folder / picture).is_file():
                frames[kind].append(folder / picture)


def save_memory(memory: DocumentMemory, run_dir: Path) -> None:
    """run_dir/memory/ (memory.safetensors + memory_config.json with the run's provenance), replaced as a whole."""
    final, tmp = run_dir / "memory", run_dir / ".memory.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    memory.save(tmp, provenance=provenance_from_saved(yaml.safe_load((run_dir / RUN_CONFIG_NAME).read_text())))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ---- the training loop -----------------------------------------------------------------------

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


def optimizer_step(memory: DocumentMemory, optimizer, scheduler, config: TrainConfig, where: str) -> None:
    """Clip, step, zero: refuses a non-finite gradient, so the weights never take a NaN."""
    params = memory.trainable_parameters()
    if config.grad_clip_coeff > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip_coeff)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not torch.isfinite(norm):
        raise NonFiniteLoss(f"non-finite gradient norm ({norm.item()}) {where}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_epoch(config: TrainConfig, engine, memory: DocumentMemory, batches: list[Batch], optimizer, scheduler,
                generator: torch.Generator, progress: Progress, save, stop: StopOnSignal, run_dir: Path) -> None:
    """The batches of epoch progress.epoch + 1, from batch progress.batch on (a mid-epoch resume).
    On a signal: finish the optimizer step, write a checkpoint, raise Interrupted."""
    epoch, acc = progress.epoch + 1, config.num_accumulation_steps
    memory.train()
    for i in range(progress.batch, len(batches)):
        where = f"at epoch {epoch}, step {progress.step + 1} (batch {i + 1} of {len(batches)})"
        loss, parts = train_step_losses(engine, memory, batches[i], config, generator)
        bad = [f"{k} = {getattr(parts, k)}" for k in LOSS_PARTS
               if getattr(parts, k) is not None and not math.isfinite(getattr(parts, k))]
        if bad:
            raise NonFiniteLoss(f"non-finite loss ({', '.join(bad)}) {where}")
        try:
            (loss / acc).backward()
        except RuntimeError as err:  # --detect_anomaly: a backward that produced NaN
            if not config.detect_anomaly:
                raise
            raise NonFiniteLoss(f"non-finite gradient {where} ({str(err).splitlines()[0]})") from err
        for key in LOSS_PARTS:
            value = getattr(parts, key)
            progress.sums[key] += value if value is not None else float("nan")
        progress.batch = i + 1
        if (i + 1) % acc == 0 or i + 1 == len(batches):
            optimizer_step(memory, optimizer, scheduler, config, where)
            progress.step += 1
            if stop.signum and progress.batch < len(batches):
                save()
                raise stop.interrupted(f"at epoch {epoch}, step {progress.step} (batch {progress.batch} of "
                                       f"{len(batches)})", run_dir)


def train(config: TrainConfig, engine, memory: DocumentMemory, batches: list[Batch], optimizer, scheduler,
          generator: torch.Generator, progress: Progress, writer, run_dir: Path, save, stop: StopOnSignal,
          dist_ctx: DistContext = DistContext(), tensorboard=None) -> None:
    """Epochs progress.epoch + 1 .. num_epochs: a metrics.jsonl line each, a summary and a
    checkpoint every save_freq epochs and at the end (rank 0 alone writes under torchrun)."""
    bar = tqdm(total=config.num_epochs, initial=progress.epoch, desc="epochs", unit="epoch", dynamic_ncols=True,
               disable=not dist_ctx.is_main)
    try:
        while progress.epoch < config.num_epochs:
            train_epoch(config, engine, memory, batches, optimizer, scheduler, generator, progress, save, stop, run_dir)
            epoch = progress.epoch + 1
            means = dist_ctx.mean([progress.sums[k] / len(batches) for k in LOSS_PARTS])  # over processes
            record = {"epoch": epoch, "step": progress.step, **dict(zip(LOSS_PARTS, means))}
            record = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
            with torch.no_grad():
                record.update(selection_stats(memory.selection(memory.doc_keys), config.l0_threshold)
                              if config.uses_keys else {})
            progress.history.append(record)
            progress.epoch, progress.batch, progress.sums = epoch, 0, dict.fromkeys(LOSS_PARTS, 0.0)
            if dist_ctx.is_main:
                with (run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if tensorboard is not None:
                    tensorboard.log_epoch(record, memory)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()
                             if k in ("loss", "ce_positive", "ce_negative") and v is not None}, refresh=False)
            bar.update(1)

            saved = epoch % config.save_freq == 0 or epoch == config.num_epochs
            if saved:
                memory.eval()
                if dist_ctx.is_main:
                    writer.write(epoch, progress.history)
                save()
            if stop.signum:
                if not saved:
                    save()
                raise stop.interrupted(f"after epoch {epoch} (step {progress.step})", run_dir)
    finally:
        bar.close()  # before any message, which would otherwise come out mid-bar
        if tensorboard is not None:
            tensorboard.close()


# ---- a run -----------------------------------------------------------------------------------

def run(config: TrainConfig) -> Path:
    """Train and write everything into a new save_dir/run_N, or continue config.resume in place;
    returns the run folder."""
    device = resolve_device(config)
    dist_ctx = init_distributed(use_cuda=device.startswith("cuda"))
    try:
        with StopOnSignal() as stop, RunLock() as lock:
            return train_run(config, stop, lock, dist_ctx)
    finally:
        shutdown(dist_ctx)


def train_run(config: TrainConfig, stop: StopOnSignal, lock: "RunLock", dist_ctx: DistContext = DistContext()) -> Path:
    """run(), with the signal handlers and the run folder's lock in place."""
    from foundations import load_foundation
    from summaries import SummaryWriter

    started = time.time()
    seed_everything(config.seed)
    # -- first what can be checked without the model: the run to resume, the data --------------
    if config.resume:  # (parse_args did this already; a config built in Python must match too)
        config = resume_config(config)
    run_dir = Path(config.resume) if config.resume else None
    ckpt = None
    if run_dir is not None:
        lock.acquire(run_dir)
        ckpt = checkpoint_to_resume(run_dir, config)
    documents = load_documents(config)
    if run_dir is not None:
        check_same_documents(run_dir, documents)

    # -- the frozen LM, the batches, the memory and the loss engine ------------------------------
    device = resolve_device(config)
    if dist_ctx.enabled and device.startswith("cuda"):
        device = f"cuda:{dist_ctx.local_rank}"
    dtype = resolve_dtype(config, device)
    num_gpus = 0 if device == "cpu" else config.num_gpus
    foundation = load_foundation(config.lm_name, config.lm_size, lm_path=config.lm_path,
                                 lm_cache_dir=config.lm_cache_dir, num_gpus=num_gpus, dtype=dtype)
    if config.hook_memory_layer >= foundation.num_blocks:
        raise ConfigError("hook_memory_layer", config.hook_memory_layer,
                          f"{foundation.name} has blocks 0..{foundation.num_blocks - 1}")
    if stop.signum:
        raise stop.interrupted("while loading the model", None)
    batches = make_batches(documents, foundation.tokenizer, config.batch_size, config.max_length,
                           docs_per_step=config.docs_per_step, rank=dist_ctx.rank, world_size=dist_ctx.world_size)

    block_device = next(foundation.block(config.hook_memory_layer).parameters()).device
    memory_config = MemoryConfig(
        hidden_size=foundation.hidden_size, num_docs=len(documents), memory_dim=config.hook_memory_dim,
        key_dim=config.key_dim, key_activation=config.key_activation, lm_act=config.lm_act,
        module_type=config.document_key_module_type, key_internal_dim=config.key_internal_dim,
        key_internal_layers=config.key_internal_layers, key_internal_activation=config.key_internal_activation,
        learn_doc_keys=config.learn_doc_keys, use_keys=config.uses_keys)
    memory = DocumentMemory(memory_config, generator=torch.Generator().manual_seed(config.seed)).to(block_device)

    trained = wrap_memory(memory, dist_ctx)  # DistributedDataParallel under torchrun, else the memory
    if config.reference_loop:
        engine = ReferenceEngine(foundation, trained, config.hook_memory_layer, dtype)
    else:
        engine = FastEngine(foundation, trained, config.hook_memory_layer, dtype,
                            cache_budget_bytes=int(config.cache_budget_gb * (1 << 30)))

    # -- the run folder (a new run_N, or the one being resumed) ----------------------------------
    if run_dir is None and not dist_ctx.is_main:  # rank 0 makes the folder; the others only learn its name
        run_dir = Path(dist_ctx.broadcast_object(None))
    elif run_dir is None:
        run_dir = new_run_dir(config.save_dir)
        dist_ctx.broadcast_object(str(run_dir))
        lock.acquire(run_dir)
        config.save_yaml(run_dir / RUN_CONFIG_NAME, extra={
            "resolved": {"device": device, "dtype": str(dtype).removeprefix("torch."), "lm": foundation.name,
                         "num_blocks": foundation.num_blocks, "hidden_size": foundation.hidden_size,
                         "num_segments": sum(len(d.segments) for d in documents),
                         "num_batches": len(batches), "run_dir": str(run_dir)},
            "documents": [{"title": d.title, "article_index": d.article_index, "segments": len(d.segments)}
                          for d in documents],
        })
    titles = [doc.title for doc in documents]
    writer = SummaryWriter(run_dir, foundation, memory, titles, config)

    # -- optimizer, schedule and the negative keys' generator: restored from a checkpoint --------
    optimizer = torch.optim.AdamW(memory.trainable_parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(batches) / config.num_accumulation_steps)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.num_epochs)
    generator = torch.Generator().manual_seed(config.seed)

    def save() -> None:  # a checkpoint of everything, as training stands now (rank 0 writes it)
        if not dist_ctx.is_main:
            return
        state = asdict(progress)
        state["wall_seconds"] = progress.wall_seconds + (time.time() - started)
        try:
            save_checkpoint(run_dir, memory, optimizer, scheduler, generator, state,
                            use_cuda=device.startswith("cuda"))
        except ValueError as err:  # non-finite memory weights: keep the last good checkpoint
            raise NonFiniteLoss(f"{err} at epoch {progress.epoch}, step {progress.step}") from err

    # -- start, or continue from the checkpoint --------------------------------------------------
    if ckpt is not None:  # continue from the checkpoint
        state = restore_checkpoint(ckpt, memory, optimizer, scheduler, generator, len(batches))
        progress = Progress(**{k: state[k] for k in Progress.__dataclass_fields__ if k in state})
        tqdm.write(f"resuming {run_dir} at epoch {progress.epoch}, step {progress.step}", file=sys.stderr)
        update_num_epochs(run_dir, config.num_epochs)
    else:  # a new run, or one stopped before its first checkpoint: start (over) here
        memory.eval()
        progress = Progress(initial=evaluate(engine, memory, batches, config, dist_ctx))
        save()
    if dist_ctx.is_main:
        rewind_run_dir(run_dir, progress.history, writer.frames)
    if stop.signum:
        raise stop.interrupted("before training", run_dir)

    # -- train -----------------------------------------------------------------------------------
    with torch.autograd.set_detect_anomaly(config.detect_anomaly):
        try:
            train(config, engine, memory, batches, optimizer, scheduler, generator, progress, writer,
                  run_dir, save, stop, dist_ctx, tensorboard=open_tensorboard(config.report_to, run_dir, titles,
                                                                              config.key_activation)
                  if dist_ctx.is_main else None)
        except NonFiniteLoss as err:
            last = read_checkpoint(checkpoint_path(run_dir)).state
            raise NonFiniteLoss(f"{err}; stopped, and kept the last good checkpoint {checkpoint_path(run_dir)} "
                                f"(epoch {last['epoch']}, step {last['step']}); try a lower --lr, or "
                                f"--detect_anomaly to find the operation") from err

    # -- final evaluation, the trained memory, summary.json -------------------------------------
    memory.eval()
    final = evaluate(engine, memory, batches, config, dist_ctx)
    if not dist_ctx.is_main:
        return run_dir
    save_memory(memory, run_dir)
    initial = progress.initial
    summary = {
        "initial_ce_positive": initial["ce_positive"], "initial_ce_negative": initial["ce_negative"],
        "final_ce_positive": final["ce_positive"], "final_ce_negative": final["ce_negative"],
        "epochs": config.num_epochs, "steps": progress.step, "num_documents": len(documents),
        "wall_seconds": progress.wall_seconds + (time.time() - started), "run_dir": str(run_dir),
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if config.eval_at_end:
        from evaluate_memory import EvalOptions, evaluate_trained

        evaluate_trained(run_dir, config, foundation, memory, documents, dtype,
                         EvalOptions(l0_threshold=config.l0_threshold))
    negative = summary["final_ce_negative"]
    tqdm.write(f"run written to {run_dir}: CE own key {summary['initial_ce_positive']:.3f} -> "
               f"{summary['final_ce_positive']:.3f}" + (f", other keys {negative:.3f}" if negative is not None else ""))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from foundations import FoundationUnavailableError
    from wikitext import DataUnavailableError

    try:
        config = parse_args(argv)
        run(config)
    except (ConfigError, CheckpointError, MemoryFileError) as err:
        fail(str(err))
    except (FoundationUnavailableError, DataUnavailableError) as err:
        fail(str(err), code=1)
    except NonFiniteLoss as err:
        fail(str(err), code=EXIT_NON_FINITE)
    except Interrupted as err:
        fail(str(err), code=err.code, label="stopped")
    except KeyboardInterrupt:
        fail("interrupted", code=128 + signal.SIGINT, label="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
