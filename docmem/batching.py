"""Turning documents into the fixed sequence of training batches.

docs_per_step = 1, one process (the released order): each document's segments in batches of
`batch_size`, documents in order, one key per batch.

docs_per_step = K over P processes: a step's *global* batch is a group of K x P chunks (a chunk
= up to `batch_size` segments of one document), taken round-robin over documents so a group
holds different documents; the last group wraps around to the first chunks so every group is
full (every process then has work in every step). Every process builds each group whole,
padded to the group's longest chunk, and keeps the rows of its own K chunks, so P processes
with K documents each see exactly the batches of one process with K x P.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import wikitext


@dataclass
class Batch:
    index: int  # position in the run's fixed list of batches (the prefix cache's key)
    doc_ids: torch.Tensor  # (B,) document of each row
    input_ids: torch.Tensor  # (B, T), left padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 on padding
    # With --docs_per_step / several processes, a step's global batch is a group of chunks (one
    # document's segments each); every process builds the whole group and keeps its own chunks.
    chunk_doc_ids: torch.Tensor | None = None  # (C,) document of every chunk of the global group
    chunk_of_row: torch.Tensor | None = None  # (B,) which of those chunks each local row belongs to

    @property
    def group_ids(self) -> torch.Tensor:
        """What per-document means group by: a chunk is one document's segments."""
        return self.chunk_of_row if self.chunk_of_row is not None else self.doc_ids

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       labels=self.labels.to(device))


def _chunks(documents: list, tokenizer, batch_size: int, max_length: int) -> list[list[dict[str, torch.Tensor]]]:
    # Each chunk is tokenized on its own, so it is padded to its own longest segment, as the
    # released code padded each batch.
    return [[wikitext.tokenize_segments(tokenizer, doc.segments[start:start + batch_size], max_length)
             for start in range(0, len(doc.segments), batch_size)] for doc in documents]


def left_pad(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """(rows, n) -> (rows, length): `value` added on the left, so every row ends with its last token."""
    return torch.nn.functional.pad(t, (length - t.shape[1], 0), value=value)


def make_batches(documents: list, tokenizer, batch_size: int, max_length: int, docs_per_step: int = 1,
                 rank: int = 0, world_size: int = 1) -> list[Batch]:
    per_doc = _chunks(documents, tokenizer, batch_size, max_length)
    group_size = docs_per_step * world_size
    if group_size == 1:
        order = [(d, c) for d, chunks in enumerate(per_doc) for c in range(len(chunks))]
    else:
        rounds = max(len(chunks) for chunks in per_doc)
        order = [(d, r) for r in range(rounds) for d in range(len(per_doc)) if r < len(per_doc[d])]
        order += order[: (-len(order)) % group_size]  # wrap around: every group full
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for g in range(0, len(order), group_size):
        group = order[g:g + group_size]
        length = max(per_doc[d][c]["input_ids"].shape[1] for d, c in group)
        mine = group[rank * docs_per_step:(rank + 1) * docs_per_step]
        parts = [per_doc[d][c] for d, c in mine]
        rows = [p["input_ids"].shape[0] for p in parts]
        batches.append(Batch(
            index=len(batches),
            doc_ids=torch.cat([torch.full((n,), d, dtype=torch.long) for (d, _), n in zip(mine, rows)]),
            input_ids=torch.cat([left_pad(p["input_ids"], length, pad_id) for p in parts]),
            attention_mask=torch.cat([left_pad(p["attention_mask"], length, 0) for p in parts]),
            labels=torch.cat([left_pad(p["labels"], length, -100) for p in parts]),
            chunk_doc_ids=torch.tensor([d for d, _ in group], dtype=torch.long),
            chunk_of_row=torch.cat([torch.full((n,), rank * docs_per_step + i, dtype=torch.long)
                                    for i, n in enumerate(rows)]),
        ))
        batches[-1] = _own_targets(batches[-1], [p["input_ids"].shape[1] for p in parts])
    return batches


def _own_targets(batch: Batch, chunk_lengths: list[int]) -> Batch:
    """Every chunk scores the tokens it scores alone. Alone, a chunk is padded to its longest row,
    whose first token is never a target (nothing precedes it); padded further to a longer chunk of
    its group, that token would be scored, predicted from a pad token. One chunk per batch (the
    released order) is never padded further: the batch is returned as it is."""
    length = batch.input_ids.shape[1]
    if all(n == length for n in chunk_lengths):
        return batch
    assert batch.chunk_of_row is not None
    local = batch.chunk_of_row - int(batch.chunk_of_row.min())  # this process's chunks, in order
    first = length - torch.tensor(chunk_lengths)[local]  # each row's chunk's first column
    labels = batch.labels.clone()
    labels[torch.arange(labels.shape[0]), first] = -100
    return replace(batch, labels=labels)


def one_batch(documents: list, tokenizer, batch_size: int, max_length: int) -> Batch:
    """Every chunk of every document in one batch, scoring exactly the tokens each chunk scores in
    its own batch of make_batches: make_batches with a step as large as all the chunks (no
    wrap-around), rows left padded to the longest chunk; `chunk_of_row` / `chunk_doc_ids` tell each
    row's chunk and each chunk's document (its position in `documents`)."""
    chunks = sum(-(-len(doc.segments) // batch_size) for doc in documents)
    (batch,) = make_batches(documents, tokenizer, batch_size, max_length, docs_per_step=chunks)
    return batch
