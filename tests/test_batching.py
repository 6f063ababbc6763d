"""Batches: the released per-document order, and K documents per step / P processes."""
from __future__ import annotations

import pytest
import torch

from docmem.batching import make_batches, one_batch
from fixtures_tiny import build_tokenizer
from foundations import prepare_tokenizer
from wikitext import Document


@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer(build_tokenizer())


def docs(n: int = 5, segments: int = 3) -> list[Document]:
    return [Document(index=i, article_index=i, title=f"doc {i}",
                     segments=[" ".join(f"w{i}x{s}y{k}" for k in range(4 + s + i)) for s in range(segments)])
            for i in range(n)]


def test_default_order_is_per_document(tokenizer):
    batches = make_batches(docs(3, 5), tokenizer, batch_size=2, max_length=64)
    assert [b.doc_ids.tolist() for b in batches] == [[0, 0], [0, 0], [0], [1, 1], [1, 1], [1], [2, 2], [2, 2], [2]]
    assert [b.index for b in batches] == list(range(9))
    assert all(b.chunk_doc_ids.tolist() == [b.doc_ids[0].item()] for b in batches)


def test_docs_per_step_groups_different_documents_and_wraps(tokenizer):
    batches = make_batches(docs(5, 3), tokenizer, batch_size=3, max_length=64, docs_per_step=2)
    groups = [b.chunk_doc_ids.tolist() for b in batches]
    assert groups == [[0, 1], [2, 3], [4, 0]]  # the last group wraps around to document 0
    for b in batches:
        assert len(set(b.doc_ids.tolist())) == 2
        assert b.input_ids.shape == b.attention_mask.shape == b.labels.shape
        assert (b.labels[b.attention_mask == 0] == -100).all()
        # a real token goes unscored only where a chunk padded further keeps its own targets: one per row at most
        assert ((b.labels == -100) & (b.attention_mask == 1)).sum(dim=1).le(1).all()
        assert (b.attention_mask[:, -1] == 1).all()  # left padding


def test_processes_split_the_single_process_batches(tokenizer):
    whole = make_batches(docs(5, 2), tokenizer, batch_size=1, max_length=64, docs_per_step=4)
    shards = [make_batches(docs(5, 2), tokenizer, batch_size=1, max_length=64, docs_per_step=2, rank=r, world_size=2)
              for r in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1])
    for w, a, b in zip(whole, *shards):
        assert torch.equal(w.input_ids, torch.cat([a.input_ids, b.input_ids]))
        assert torch.equal(w.labels, torch.cat([a.labels, b.labels]))
        assert torch.equal(w.chunk_doc_ids, a.chunk_doc_ids) and torch.equal(w.chunk_doc_ids, b.chunk_doc_ids)
        assert torch.equal(w.chunk_of_row, torch.cat([a.chunk_of_row, b.chunk_of_row]))


def test_one_batch_scores_what_each_chunk_scores_alone(tokenizer):
    """All chunks in one batch, padded to the longest: each row keeps exactly its own targets (a
    chunk's longest row's first token, predicted from nothing alone, is not scored when padded)."""
    documents = docs(3, 5)
    alone = make_batches(documents, tokenizer, batch_size=2, max_length=64)
    whole = one_batch(documents, tokenizer, batch_size=2, max_length=64)
    assert whole.chunk_doc_ids.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]  # round robin over documents
    assert whole.input_ids.shape == (15, max(b.input_ids.shape[1] for b in alone))
    for chunk, doc in enumerate(whole.chunk_doc_ids.tolist()):
        batch = [b for b in alone if b.doc_ids[0] == doc][chunk // 3]
        rows = whole.chunk_of_row == chunk
        assert torch.equal(whole.doc_ids[rows], batch.doc_ids)
        for mine, own in zip(whole.labels[rows], batch.labels):
            assert torch.equal(mine[1:][mine[1:] != -100], own[1:][own[1:] != -100])
        # the padding only moved: the same tokens, as many real ones
        assert torch.equal(whole.attention_mask[rows].sum(1), batch.attention_mask.sum(1))


def test_a_chunk_in_a_group_scores_what_it_scores_alone(tokenizer):
    """docs_per_step > 1: a chunk padded to its group's longest chunk scores exactly the tokens it
    scores in its own batch, so its loss does not depend on the documents it is grouped with."""
    documents = docs(5, 3)
    alone = make_batches(documents, tokenizer, batch_size=3, max_length=64)  # one batch per document
    grouped = make_batches(documents, tokenizer, batch_size=3, max_length=64, docs_per_step=2)
    padded_further = 0
    for b in grouped:
        for chunk, doc in enumerate(b.chunk_doc_ids.tolist()):
            rows = b.chunk_of_row == chunk
            own = alone[doc]
            padded_further += b.input_ids.shape[1] > own.input_ids.shape[1]
            for mine, ref in zip(b.labels[rows], own.labels):
                assert torch.equal(mine[1:][mine[1:] != -100], ref[1:][ref[1:] != -100])
    assert padded_further > 0  # the case that needs it occurs
