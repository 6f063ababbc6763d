"""The cross-entropy of the training batches under each document's own key and under negative
keys: what training reports before its first epoch and after its last (summary.json)."""
from __future__ import annotations

import math

import torch

from docmem.batching import Batch
from docmem.config import TrainConfig
from docmem.distributed import DistContext
from docmem.engines import LossEngine
from docmem.other_documents import drawn_other_documents
from document_memories import DocumentMemory
from utils import negative_keys

MAX_EVAL_OTHER_KEYS = 8  # up to this many other documents, `other` negatives are every other key
EVAL_OTHER_SAMPLES = 512  # past it, about this many (document, other key) pairs in all
MAX_EVAL_DOCUMENTS = 256  # past this many documents, about this many are measured (every k-th batch)


def batch_stride(num_docs: int) -> int:
    """Past MAX_EVAL_DOCUMENTS documents, only every `batch_stride`-th batch of the run's fixed list
    is measured (about MAX_EVAL_DOCUMENTS documents), so the CE before and after training costs
    what it costs at MAX_EVAL_DOCUMENTS however many documents the memory holds. A batch's index
    counts global groups (docs_per_step x processes), so every process picks the same groups."""
    return max(1, math.ceil(num_docs / MAX_EVAL_DOCUMENTS))


def measured_batches(batches: list[Batch], num_docs: int) -> list[Batch]:
    """The batches `ce_under_keys` measures: all of them up to MAX_EVAL_DOCUMENTS documents."""
    stride = batch_stride(num_docs)
    return [batch for batch in batches if batch.index % stride == 0]


def other_keys_per_document(num_docs: int) -> int:
    """How many other documents' keys each document is measured under, past MAX_EVAL_OTHER_KEYS
    documents: enough that the run's mean rests on about EVAL_OTHER_SAMPLES pairs, at most
    MAX_EVAL_OTHER_KEYS, at least one (past MAX_EVAL_DOCUMENTS, where one, only the measured
    documents count: fewer pairs, the same per-document definition)."""
    return max(1, min(MAX_EVAL_OTHER_KEYS, math.ceil(EVAL_OTHER_SAMPLES / num_docs)))


@torch.no_grad()
def ce_under_keys(engine: LossEngine, memory: DocumentMemory, batches: list[Batch], config: TrainConfig,
                  dist_ctx: DistContext | None = None) -> dict[str, float | None]:
    """Token-weighted mean CE under each document's own key, and under negative keys: for
    `other`, every other document's key when there are at most MAX_EVAL_OTHER_KEYS others (the
    expectation of the training draw), else `other_keys_per_document` other keys drawn for each
    document (`drawn_other_documents`), so the pass stays linear in the documents; for the other
    types, one draw from a fixed generator. Past MAX_EVAL_DOCUMENTS documents both means are over
    the documents of `measured_batches` only (about MAX_EVAL_DOCUMENTS of them), so the cost stops
    growing. Under torchrun every process evaluates its batches and the sums are combined."""
    n_docs = memory.config.num_docs
    sums = [0.0, 0.0, 0.0, 0.0]  # positive CE x tokens, tokens, negative CE x tokens, tokens
    generator = torch.Generator().manual_seed(12345)
    sampled = config.negative_key_type == "other" and n_docs - 1 > MAX_EVAL_OTHER_KEYS
    drawn_others = drawn_other_documents(n_docs, other_keys_per_document(n_docs)) if sampled else None
    for batch in measured_batches(batches, n_docs):
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
        if drawn_others is not None:
            columns = drawn_others[batch.doc_ids.cpu()]  # (rows, k): row r's j-th other document
            per_key = torch.stack(engine.losses(batch, [memory.keys_for(columns[:, j].to(batch.doc_ids.device))
                                                        for j in range(columns.shape[1])], per_document=True))
            neg = per_key.cpu().mean(0)
        elif config.negative_key_type == "other" and n_docs > 1:
            others = range(n_docs)
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
