"""Approximate forgetting for any memory (forget.py --method unlearn): a short fine-tuning of the
memory against a key-searching attacker, then the document's key is dropped.

    loss = mean_j CE(other document j | k_j)                    retain: every other document, every step
         + w * mean_k relu(tau - CE(D | k))                     forget: D under its old key and the attackers' keys

tau is D's CE under the plain LM: a memory never trained on D recalls it about as well as no memory,
so the forget term pushes D's CE up to that level under every key it is asked about, and no
further (pushing past it would make D *less* likely than never-trained, itself a trace, and would
cost the others' recall). The attackers are keys that move each step by gradient descent on D's
CE (they start at every other document's key and at random keys): the keys an attacker would
find, so the memory cannot hide D near the old key only. They take their gradient from the same
backward pass, sign flipped (an attacker whose CE already reached tau stays put). The retain
term keeps the others' text likely under their own keys. The memory is updated with AdamW and
the run's gradient clipping; the random keys come from a seeded generator (UnlearnSettings.seed).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from docmem.batching import make_batches
from docmem.engines import NO_MEMORY, FastEngine
from docmem.evaluation.options import EvalOptions
from docmem.forgetting import forget, forgotten_provenance
from docmem.run_folder import LoadedRun, load_run
from docmem.trained_memory import read_provenance


@dataclass(frozen=True)
class UnlearnSettings:
    steps: int = 12
    lr: float = 3e-3  # the memory's AdamW (the demo's training lr; 2e-2 wrecked every document in 12 steps)
    forget_weight: float = 1.0
    random_keys: int = 1  # attacker keys starting at random points (besides one per other document)
    attacker_lr: float = 0.1  # Adam on the attacker keys
    seed: int = 0


UNLEARN_DEFAULTS = UnlearnSettings()


def _mean_ce(engine: FastEngine, batches: list, key_sets: list) -> torch.Tensor:
    """(len(key_sets),) mean token CE over the batches, one per key (a (key_dim,) tensor) or NO_MEMORY."""
    total, tokens = 0, 0
    for batch in batches:
        rows = batch.input_ids.shape[0]
        n = int((batch.labels[:, 1:] != -100).sum())
        sets = [k.expand(rows, -1) if isinstance(k, torch.Tensor) else k for k in key_sets]
        total = total + torch.stack(engine.losses(batch, sets)) * n
        tokens += n
    return total / max(tokens, 1)


def unlearn(run: LoadedRun, doc: int, settings: UnlearnSettings) -> tuple[Any, dict[str, Any]]:
    """A new memory (the run's is left alone) fine-tuned to forget document `doc`; and what it did."""
    memory = copy.deepcopy(run.memory).train()
    engine = FastEngine(run.foundation, memory, run.config.hook_memory_layer, run.dtype, head_dtype=run.head_dtype)
    by_doc: list[list] = [[] for _ in run.documents]
    for batch in make_batches(run.documents, run.foundation.tokenizer, run.config.batch_size, run.config.max_length):
        by_doc[int(batch.doc_ids[0])].append(batch)
    keys = memory.doc_keys.detach().clone()
    others = [j for j in range(len(run.documents)) if j != doc]
    with torch.no_grad():
        target = float(_mean_ce(engine, by_doc[doc], [NO_MEMORY])[0])
    generator = torch.Generator().manual_seed(settings.seed)
    spread = float(keys.std()) if keys.numel() > 1 else 1.0
    randoms = (torch.randn(settings.random_keys, keys.shape[1], generator=generator) * spread).to(keys)
    attackers = torch.cat([keys[others], randoms]).requires_grad_(True)
    optimizer = torch.optim.AdamW(memory.trainable_parameters(), lr=settings.lr)
    attacker_opt = torch.optim.Adam([attackers], lr=settings.attacker_lr)
    history = []
    for step in range(settings.steps):
        retain = torch.stack([_mean_ce(engine, by_doc[j], [keys[j]])[0] for j in others]).mean()
        ce = _mean_ce(engine, by_doc[doc], [keys[doc], *attackers])
        forget_term = torch.relu(target - ce).mean()
        optimizer.zero_grad(set_to_none=True)
        attacker_opt.zero_grad(set_to_none=True)
        (retain + settings.forget_weight * forget_term).backward()
        if run.config.grad_clip_coeff > 0:
            torch.nn.utils.clip_grad_norm_(memory.trainable_parameters(), run.config.grad_clip_coeff)
        optimizer.step()
        if attackers.grad is not None:  # the memory ascends D's CE; the attackers descend it (Adam: scale-free)
            attackers.grad.neg_()
            attacker_opt.step()
        ce = ce.detach()
        history.append({"step": step + 1, "retain_ce": retain.item(), "old_key_ce": ce[0].item(),
                        "attacker_ce_min": ce[1:].min().item(), "forget_term": forget_term.item()})
    return memory.eval(), {"target_ce": target, "history": history, "settings": asdict(settings)}


def unlearn_run(run_dir: Path, doc: int, out: Path, steps: int, device: str = "auto") -> dict[str, Any]:
    """forget.py --method unlearn: the fine-tuned memory without the document's key, saved to `out`."""
    run = load_run(run_dir, EvalOptions(device=device))
    started = time.time()
    memory, stats = unlearn(run, doc, UnlearnSettings(steps=steps))
    seconds = time.time() - started
    provenance = read_provenance(run_dir / "memory", run_dir)
    forget(memory, doc, "drop_key").save(out, provenance=forgotten_provenance(provenance, doc, "unlearn"))
    return {"unlearn_steps": steps, "unlearn_seconds": seconds, "target_ce": stats["target_ce"],
            "last_step": stats["history"][-1] if stats["history"] else None}
