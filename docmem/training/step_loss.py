"""The loss of one training step: its keys (the document's, and a negative drawn on the host) and
the CE under them with the guidance term, as 0-dim tensors left on the device until the optimizer
step reads them. train_guidance.py's steps and the captured steps (docmem/cuda_graphs.py) share it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from docmem.batching import Batch
from docmem.config import TrainConfig
from docmem.engines import LossEngine
from docmem.errors import NonFiniteLoss
from document_memories import DocumentMemory
from utils import guidance_term, negative_keys


@dataclass
class StepResult:
    """The parts of a batch's loss as 0-dim tensors, left on the device until the optimizer step
    reads them (a float where a caller put one); None: not part of this run's loss."""
    loss: torch.Tensor | float
    ce_positive: torch.Tensor | float
    ce_negative: torch.Tensor | float | None
    guidance_term: torch.Tensor | float | None


def step_keys(memory: DocumentMemory, batch: Batch, config: TrainConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A step's positive keys (each row its document's) and negative keys (drawn from `generator`):
    None where the run's loss has none (a shared memory; no guidance)."""
    if not config.uses_keys:
        return None, None
    pos = memory.keys_for(batch.doc_ids)
    if not config.guidance_active:
        return pos, None
    if batch.chunk_doc_ids is not None:  # one draw per chunk of the global batch, every process alike
        drawn = negative_keys(config.negative_key_type, batch.chunk_doc_ids, memory.doc_keys, generator, config.delta)
        return pos, drawn[batch.chunk_of_row.to(drawn.device)]
    return pos, negative_keys(config.negative_key_type, batch.doc_ids, memory.doc_keys, generator, config.delta)


def losses_under_keys(engine: LossEngine, batch: Batch, config: TrainConfig, pos: torch.Tensor | None,
                      neg: torch.Tensor | None) -> tuple[torch.Tensor, StepResult]:
    """The loss of one batch under the step's keys (step_keys), not yet backpropagated, and its parts."""
    if pos is None:
        (ce_pos,) = engine.losses(batch, [None], per_document=True)
        loss = ce_pos.mean()
        return loss, StepResult(loss.detach(), loss.detach(), None, None)
    if neg is None:
        (ce_pos,) = engine.losses(batch, [pos], per_document=True)
        loss = ce_pos.mean()
        return loss, StepResult(loss.detach(), loss.detach(), None, None)
    ce_pos, ce_neg = engine.losses(batch, [pos, neg], per_document=True)
    term = guidance_term(ce_pos, ce_neg, config.target_negative_ce, config.guidance_loss)
    loss = (ce_pos + config.guidance * term).mean()
    return loss, StepResult(loss.detach(), ce_pos.mean().detach(), ce_neg.mean().detach(), term.mean().detach())


def refuse_non_finite_loss(parts: dict[str, float | None], where: str) -> None:
    bad = [f"{k} = {v}" for k, v in parts.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(f"non-finite loss ({', '.join(bad)}) {where}")
