"""The CE under own and other keys that training reports before and after (summary.json): every
other key for a few documents, a fixed per-document draw of other keys for many, so the pass stays
linear in the documents and does not depend on how the documents are batched."""
from __future__ import annotations

import pytest
import torch

from docmem.batching import Batch
from docmem.config import TrainConfig
from docmem.other_documents import drawn_other_documents
from docmem.training.key_ce import (
    MAX_EVAL_DOCUMENTS,
    MAX_EVAL_OTHER_KEYS,
    batch_stride,
    ce_under_keys,
    other_keys_per_document,
)
from document_memories import DocumentMemory, MemoryConfig


class KeyEngine:
    """A loss engine whose 'CE' of a row under a key is 10 + the key's first number: the expected
    means can be written down, and every call's key sets are recorded."""

    def __init__(self) -> None:
        self.key_sets_per_call: list[int] = []

    def losses(self, batch: Batch, key_sets: list, per_document: bool = False) -> list[torch.Tensor]:
        self.key_sets_per_call.append(len(key_sets))
        groups, inverse = torch.unique_consecutive(batch.group_ids, return_inverse=True)
        out = []
        for keys in key_sets:
            per_row = 10.0 + keys[:, 0].float()
            out.append(torch.zeros(len(groups)).index_add(0, inverse, per_row) / torch.bincount(inverse).float())
        return out


def memory_of(n_docs: int) -> DocumentMemory:
    return DocumentMemory(MemoryConfig(hidden_size=8, num_docs=n_docs, memory_dim=4, key_dim=2),
                          generator=torch.Generator().manual_seed(2))


def batches_of(n_docs: int, docs_per_batch: int, rows: int = 2, length: int = 6) -> list[Batch]:
    batches = []
    for index, start in enumerate(range(0, n_docs, docs_per_batch)):
        docs = torch.arange(start, min(start + docs_per_batch, n_docs)).repeat_interleave(rows)
        ids = torch.ones(len(docs), length, dtype=torch.long)
        batches.append(Batch(index, docs, ids, torch.ones_like(ids), ids.clone()))
    return batches


def key_ce(n_docs: int) -> torch.Tensor:
    return 10.0 + memory_of(n_docs).doc_keys.detach()[:, 0].float()


def test_a_few_documents_are_measured_under_every_other_key():
    n = MAX_EVAL_OTHER_KEYS + 1
    result = ce_under_keys(KeyEngine(), memory_of(n), batches_of(n, 1), TrainConfig(max_labels=n))
    ce = key_ce(n)
    expected_negative = torch.stack([(ce.sum() - ce[d]) / (n - 1) for d in range(n)]).mean()
    assert result["ce_positive"] == pytest.approx(float(ce.mean()), rel=1e-6)
    assert result["ce_negative"] == pytest.approx(float(expected_negative), rel=1e-6)


@pytest.mark.parametrize("n", [MAX_EVAL_OTHER_KEYS + 2, 40, MAX_EVAL_DOCUMENTS])
def test_many_documents_are_measured_under_their_drawn_other_keys(n):
    engine = KeyEngine()
    result = ce_under_keys(engine, memory_of(n), batches_of(n, 16), TrainConfig(max_labels=n))
    ce = key_ce(n)
    drawn = drawn_other_documents(n, other_keys_per_document(n))
    assert result["ce_positive"] == pytest.approx(float(ce.mean()), rel=1e-6)
    assert result["ce_negative"] == pytest.approx(float(ce[drawn].mean(1).mean()), rel=1e-6)
    # one call under the own key, one under the drawn keys: the work per row stays fixed
    assert set(engine.key_sets_per_call) == {1, other_keys_per_document(n)}


@pytest.mark.parametrize("n, docs_per_batch", [(700, 16), (1000, 1), (1000, 16), (MAX_EVAL_DOCUMENTS + 1, 4)])
def test_past_the_limit_every_kth_batch_is_measured(n, docs_per_batch):
    engine = KeyEngine()
    batches = batches_of(n, docs_per_batch)
    result = ce_under_keys(engine, memory_of(n), batches, TrainConfig(max_labels=n))
    stride = batch_stride(n)
    assert stride > 1
    measured = torch.cat([b.doc_ids.unique() for b in batches if b.index % stride == 0])
    assert len(measured) <= MAX_EVAL_DOCUMENTS + docs_per_batch  # the cost stops growing with n
    ce = key_ce(n)
    drawn = drawn_other_documents(n, other_keys_per_document(n))
    assert result["ce_positive"] == pytest.approx(float(ce[measured].mean()), rel=1e-6)
    assert result["ce_negative"] == pytest.approx(float(ce[drawn[measured]].mean(1).mean()), rel=1e-6)
    # two calls (own key, drawn keys) for each measured batch and none for the others
    assert len(engine.key_sets_per_call) == 2 * len([b for b in batches if b.index % stride == 0])


def test_up_to_the_limit_every_batch_is_measured():
    assert batch_stride(MAX_EVAL_DOCUMENTS) == 1 and batch_stride(MAX_EVAL_DOCUMENTS + 1) == 2


def test_the_draw_does_not_depend_on_the_batching():
    n = 30
    one = ce_under_keys(KeyEngine(), memory_of(n), batches_of(n, 1), TrainConfig(max_labels=n))
    grouped = ce_under_keys(KeyEngine(), memory_of(n), batches_of(n, 7), TrainConfig(max_labels=n))
    assert one["ce_negative"] == pytest.approx(grouped["ce_negative"], rel=1e-6)


def test_the_drawn_table_skips_the_document_and_covers_the_others():
    drawn = drawn_other_documents(50, 8)
    assert drawn.shape == (50, 8)
    assert not (drawn == torch.arange(50).unsqueeze(1)).any()
    assert drawn.min() >= 0 and drawn.max() <= 49 and len(drawn.unique()) > 45
    assert torch.equal(drawn, drawn_other_documents(50, 8))  # fixed


def test_keys_per_document_shrink_as_documents_grow():
    counts = {n: other_keys_per_document(n) for n in (10, 64, 100, 300, 1000, 5000)}
    assert counts == {10: 8, 64: 8, 100: 6, 300: 2, 1000: 1, 5000: 1}
