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
term keeps the others' text likely under their own keys. The memory is updated with AdamW (beta1
0.5: a short memory of the forget phase's steps) and the run's gradient clipping; the random keys
come from a seeded generator (UnlearnSettings.seed).

Cost: a step scores every other document under its key and D under 1 + attackers keys. All of it
is one batch (`unlearn_batch`: each other document's rows once, then D's rows once per key, each
row with its own key) and one engine pass: one decoder call, one head, larger products than five
small passes; D's repeated rows share one prefix, computed once and cached for every step.
Per-document token means come from the pass's per-chunk means, so the loss is the same as
scoring each document alone (tests/test_unlearning.py).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from docmem.batching import Batch, one_batch
from docmem.engines import NO_MEMORY, FastEngine, KeySet
from docmem.evaluation.options import EvalOptions
from docmem.forgetting.edits import forget, forgotten_provenance
from docmem.run_folder import LoadedRun, load_run
from docmem.trained_memory import read_provenance


@dataclass(frozen=True)
class UnlearnSettings:
    steps: int = 9
    lr: float = 3e-3  # the memory's AdamW (the demo's training lr; 2e-2 wrecked every document in 12 steps)
    # AdamW's beta1: 0.5, not 0.9. The forget term acts in the first few steps; with 0.9 its momentum
    # kept pushing the others' recall down for ~10 steps after (12 steps were needed, 8 lost recall).
    beta1: float = 0.5
    forget_weight: float = 1.0
    random_keys: int = 1  # attacker keys starting at random points (besides one per other document)
    attacker_lr: float = 0.1  # Adam on the attacker keys
    seed: int = 0


UNLEARN_DEFAULTS = UnlearnSettings()


@dataclass(frozen=True)
class UnlearnBatch:
    """Every row a step scores, in one batch: each other document once, then D once per key it is
    asked about (its old key, then each attacker). Position p of `order` is row group p."""
    batch: Batch
    order: list[int]  # the document at each position: the others, then D repeated
    retained: int  # the first `retained` positions are the other documents
    tokens_of_chunk: torch.Tensor  # (C,) scored tokens of each chunk of the batch

    def keys_of_rows(self, key_of_position: torch.Tensor) -> torch.Tensor:
        """(positions, key_dim) -> (B, key_dim): each row gets its position's key (gradients flow back)."""
        return key_of_position[self.batch.doc_ids]

    def document_ce(self, engine: FastEngine, key_set: KeySet) -> torch.Tensor:
        """(positions,) each position's mean token CE under its key: one engine pass for all of them."""
        (chunk_ce,) = engine.losses(self.batch, [key_set], per_document=True)
        chunk_doc = self.batch.chunk_doc_ids.to(chunk_ce.device)
        tokens = self.tokens_of_chunk.to(chunk_ce.device)
        zeros = chunk_ce.new_zeros(len(self.order))
        # a document of several chunks: its token mean = the chunk means weighted by their tokens
        return zeros.index_add(0, chunk_doc, chunk_ce * tokens) / zeros.index_add(0, chunk_doc, tokens)


def unlearn_batch(run: LoadedRun, doc: int, copies: int) -> UnlearnBatch:
    """The other documents of the run once, then document `doc` `copies` times, as one batch
    (the engine runs the prefix of D's repeated rows once)."""
    order = [j for j in range(len(run.documents)) if j != doc] + [doc] * copies
    batch = one_batch([run.documents[j] for j in order], run.foundation.tokenizer, run.config.batch_size,
                      run.config.max_length)
    assert batch.chunk_of_row is not None and batch.chunk_doc_ids is not None
    scored = (batch.labels[:, 1:] != -100).sum(dim=1).float()
    tokens = torch.zeros(len(batch.chunk_doc_ids)).index_add(0, batch.chunk_of_row, scored)
    return UnlearnBatch(batch, order, len(order) - copies, tokens)


def unlearn(run: LoadedRun, doc: int, settings: UnlearnSettings) -> tuple[Any, dict[str, Any]]:
    """A new memory (the run's is left alone) fine-tuned to forget document `doc`; and what it did."""
    memory = copy.deepcopy(run.memory).train()
    engine = FastEngine(run.foundation, memory, run.config.hook_memory_layer, run.dtype, head_dtype=run.head_dtype)
    keys = memory.doc_keys.detach().clone()
    others = [j for j in range(len(run.documents)) if j != doc]
    rows = unlearn_batch(run, doc, 1 + len(others) + settings.random_keys)
    with torch.no_grad():
        target = float(rows.document_ce(engine, NO_MEMORY)[rows.retained])
    generator = torch.Generator().manual_seed(settings.seed)
    spread = float(keys.std()) if keys.numel() > 1 else 1.0
    randoms = (torch.randn(settings.random_keys, keys.shape[1], generator=generator) * spread).to(keys)
    attackers = torch.cat([keys[others], randoms]).requires_grad_(True)
    optimizer = torch.optim.AdamW(memory.trainable_parameters(), lr=settings.lr, betas=(settings.beta1, 0.999))
    attacker_opt = torch.optim.Adam([attackers], lr=settings.attacker_lr)
    history = []
    for step in range(settings.steps):
        # one pass: every other document under its own key, D under its old key and every attacker's
        ce = rows.document_ce(engine, rows.keys_of_rows(torch.cat([keys[others], keys[doc:doc + 1], attackers])))
        retain = ce[:rows.retained].mean()
        ce = ce[rows.retained:]
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
