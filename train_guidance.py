"""Train a document-wise memory with guidance on a frozen causal LM.

    python train_guidance.py --lm_name pythia --lm_size 1b --hook_memory_layer 15 ...
    python train_guidance.py --help

Per batch of document i's segments (METHOD.md section 2):
    L_pos = CE(LM with memory keyed by k_i)
    L_neg = CE(LM with memory keyed by a negative key)
    loss  = L_pos + alpha * guidance_term(L_pos, L_neg)
Only the memory trains. Writes save_dir/run_N/ (see README "What a run writes").
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import ConfigError, TrainConfig, fail, parse_args, resolve_device
from document_memories import DocumentMemory, MemoryConfig
from engines import Batch, FastEngine, ReferenceEngine
from utils import guidance_term, negative_keys, new_run_dir, seed_everything, selection_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(config: TrainConfig, device: str) -> torch.dtype:
    if config.precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[config.precision]


# ---- data ------------------------------------------------------------------------------------

def load_documents(config: TrainConfig) -> list:
    import wikitext

    articles = wikitext.load_articles(config.dataset, data_split=config.data_split, data_path=config.data_path,
                                      cache_dir=config.data_cache_dir, num_synthetic=config.synthetic_articles,
                                      seed=config.seed)
    if config.max_labels > len(articles):
        raise ConfigError("max_labels", config.max_labels, f"only {len(articles)} articles are available")
    return wikitext.select_documents(articles, config.max_labels, config.seed, config.segment_length,
                                     config.max_segments)


def make_batches(documents: list, tokenizer, batch_size: int, max_length: int) -> list[Batch]:
    """Each document's segments in batches of their own (one key per batch), documents in order."""
    import wikitext

    batches: list[Batch] = []
    for doc_id, doc in enumerate(documents):
        tokens = wikitext.tokenize_segments(tokenizer, doc.segments, max_length)
        for start in range(0, len(doc.segments), batch_size):
            rows = slice(start, start + batch_size)
            ids = tokens["input_ids"][rows]
            batches.append(Batch(index=len(batches), doc_ids=torch.full((ids.shape[0],), doc_id, dtype=torch.long),
                                 input_ids=ids, attention_mask=tokens["attention_mask"][rows],
                                 labels=tokens["labels"][rows]))
    return batches


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
    """The loss of one batch (not yet backpropagated) and its parts."""
    if not config.uses_keys:
        (ce_pos,) = engine.losses(batch, [None])
        return ce_pos, StepResult(ce_pos.item(), ce_pos.item(), None, None)
    pos = memory.keys_for(batch.doc_ids)
    if not config.guidance_active:
        (ce_pos,) = engine.losses(batch, [pos])
        return ce_pos, StepResult(ce_pos.item(), ce_pos.item(), None, None)
    neg = negative_keys(config.negative_key_type, batch.doc_ids, memory.doc_keys, generator, config.delta)
    ce_pos, ce_neg = engine.losses(batch, [pos, neg])
    term = guidance_term(ce_pos, ce_neg, config.target_negative_ce, config.guidance_loss)
    loss = ce_pos + config.guidance * term
    return loss, StepResult(loss.item(), ce_pos.item(), ce_neg.item(), term.item())


@torch.no_grad()
def evaluate(engine, memory: DocumentMemory, batches: list[Batch], config: TrainConfig) -> dict[str, float]:
    """Token-weighted mean CE under each document's own key, and under negative keys: for
    `other`, every other document's key (the expectation of the training draw); for the other
    types, one draw from a fixed generator."""
    n_docs = memory.config.num_docs
    pos_sum = neg_sum = 0.0
    pos_n = neg_n = 0
    generator = torch.Generator().manual_seed(12345)
    for batch in batches:
        tokens = int((batch.labels[:, 1:] != -100).sum())
        if not config.uses_keys:
            (ce,) = engine.losses(batch, [None])
            pos_sum += ce.item() * tokens
            pos_n += tokens
            continue
        key_sets = [memory.keys_for(batch.doc_ids)]
        if config.negative_key_type == "other" and n_docs > 1:
            own = int(batch.doc_ids[0])
            key_sets += [memory.keys_for(torch.full_like(batch.doc_ids, j)) for j in range(n_docs) if j != own]
        else:
            key_sets.append(negative_keys(config.negative_key_type, batch.doc_ids, memory.doc_keys, generator,
                                          config.delta))
        ces = engine.losses(batch, key_sets)
        pos_sum += ces[0].item() * tokens
        pos_n += tokens
        neg_sum += sum(c.item() for c in ces[1:]) / len(ces[1:]) * tokens
        neg_n += tokens
    return {"ce_positive": pos_sum / max(pos_n, 1), "ce_negative": neg_sum / neg_n if neg_n else float("nan")}


def run(config: TrainConfig) -> Path:
    """Train and write everything into a new save_dir/run_N; returns that folder."""
    from foundations import load_foundation
    from summaries import SummaryWriter

    started = time.time()
    seed_everything(config.seed)
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    num_gpus = 0 if device == "cpu" else config.num_gpus
    foundation = load_foundation(config.lm_name, config.lm_size, lm_path=config.lm_path,
                                 lm_cache_dir=config.lm_cache_dir, num_gpus=num_gpus, dtype=dtype)
    if config.hook_memory_layer >= foundation.num_blocks:
        raise ConfigError("hook_memory_layer", config.hook_memory_layer,
                          f"{foundation.name} has blocks 0..{foundation.num_blocks - 1}")
    documents = load_documents(config)
    batches = make_batches(documents, foundation.tokenizer, config.batch_size, config.max_length)

    block_device = next(foundation.block(config.hook_memory_layer).parameters()).device
    memory_config = MemoryConfig(
        hidden_size=foundation.hidden_size, num_docs=len(documents), memory_dim=config.hook_memory_dim,
        key_dim=config.key_dim, key_activation=config.key_activation, lm_act=config.lm_act,
        module_type=config.document_key_module_type, key_internal_dim=config.key_internal_dim,
        key_internal_layers=config.key_internal_layers, key_internal_activation=config.key_internal_activation,
        learn_doc_keys=config.learn_doc_keys, use_keys=config.uses_keys)
    memory = DocumentMemory(memory_config, generator=torch.Generator().manual_seed(config.seed)).to(block_device)

    if config.reference_loop:
        engine = ReferenceEngine(foundation, memory, config.hook_memory_layer, dtype)
    else:
        engine = FastEngine(foundation, memory, config.hook_memory_layer, dtype,
                            cache_budget_bytes=int(config.cache_budget_gb * (1 << 30)))

    run_dir = new_run_dir(config.save_dir)
    titles = [doc.title for doc in documents]
    config.save_yaml(run_dir / "config.yaml", extra={
        "resolved": {"device": device, "dtype": str(dtype).removeprefix("torch."), "lm": foundation.name,
                     "num_blocks": foundation.num_blocks, "hidden_size": foundation.hidden_size,
                     "num_segments": sum(len(d.segments) for d in documents), "num_batches": len(batches),
                     "run_dir": str(run_dir)},
        "documents": [{"title": d.title, "article_index": d.article_index, "segments": len(d.segments)}
                      for d in documents],
    })
    writer = SummaryWriter(run_dir, foundation, memory, titles, config)

    optimizer = torch.optim.AdamW(memory.trainable_parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(batches) / config.num_accumulation_steps)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.num_epochs)
    generator = torch.Generator().manual_seed(config.seed)

    memory.eval()
    initial = evaluate(engine, memory, batches, config)
    history: list[dict] = []
    metrics_path = run_dir / "metrics.jsonl"
    step = 0
    bar = tqdm(range(1, config.num_epochs + 1), desc="epochs", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        memory.train()
        sums = {"loss": 0.0, "ce_positive": 0.0, "ce_negative": 0.0, "guidance_term": 0.0}
        for i, batch in enumerate(batches):
            loss, parts = train_step_losses(engine, memory, batch, config, generator)
            (loss / config.num_accumulation_steps).backward()
            if (i + 1) % config.num_accumulation_steps == 0 or i + 1 == len(batches):
                if config.grad_clip_coeff > 0:
                    torch.nn.utils.clip_grad_norm_(memory.trainable_parameters(), config.grad_clip_coeff)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            for key in sums:
                value = getattr(parts, key)
                sums[key] += value if value is not None else float("nan")
        record = {"epoch": epoch, "step": step, **{k: v / len(batches) for k, v in sums.items()}}
        record = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        with torch.no_grad():
            record.update(selection_stats(memory.selection(memory.doc_keys)) if config.uses_keys else {})
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()
                         if k in ("loss", "ce_positive", "ce_negative") and v is not None})
        if epoch % config.save_freq == 0 or epoch == config.num_epochs:
            memory.eval()
            writer.write(epoch, history)

    memory.eval()
    final = evaluate(engine, memory, batches, config)
    memory.save(run_dir / "memory")
    summary = {
        "initial_ce_positive": initial["ce_positive"], "initial_ce_negative": initial["ce_negative"],
        "final_ce_positive": final["ce_positive"], "final_ce_negative": final["ce_negative"],
        "epochs": config.num_epochs, "steps": step, "num_documents": len(documents),
        "wall_seconds": time.time() - started, "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tqdm.write(f"run written to {run_dir}: CE own key {summary['initial_ce_positive']:.3f} -> "
               f"{summary['final_ce_positive']:.3f}, other keys {summary['final_ce_negative']:.3f}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from foundations import FoundationUnavailableError
    from wikitext import DataUnavailableError

    try:
        config = parse_args(argv)
        run(config)
    except ConfigError as err:
        fail(str(err))
    except (FoundationUnavailableError, DataUnavailableError) as err:
        fail(str(err), code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
