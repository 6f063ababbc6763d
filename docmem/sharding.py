"""A sharded memory (SISA, Bourtoule et al. 2021): the documents split into isolated shards, each
its own DocumentMemory; the assignment of documents to shards, routing keys to shards, saving and loading.

Assignment: a document's shard is fixed by its position in the run's draw (contiguous blocks of
--max_labels positions, the first blocks one longer: 5 over 2 -> 0 0 0 1 1), so removing a
document moves no other. Each shard is trained as its own sub-run (docmem/training/shard_runs.py): its
own entries, key rows, AdamW state, gradient clipping and random generators, stepping only on its
own documents' batches, so no parameter of a shard depends on another shard's documents.

Routing: a key reads the memory of the shard whose document key is nearest to it (Euclidean);
every document's own key reads its own shard. A search over keys (docmem/forgetting/key_attack.py) thus
reaches every shard. With no key, the memory is the mean of the shards' unkeyed outputs.

Saved as memory/ with memory_config.json (the shards' common MemoryConfig, num_docs = all
documents, a `shards` block: each document's shard and row, and the shards' folders) and one
ordinary memory folder per non-empty shard (shard_K/). load_any_memory reads both kinds.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from docmem.atomic import whole_folder
from docmem.errors import MemoryFileError
from document_memories import (
    CONFIG_NAME,
    PROVENANCE_FIELD,
    DocumentMemory,
    load_memory,
    one_per_row,
    read_memory_json,
)

SHARDS_FIELD = "shards"


def shard_assignment(num_positions: int, num_shards: int) -> list[int]:
    """The shard of each draw position: contiguous blocks, the first num_positions % S one longer."""
    base, extra = divmod(num_positions, num_shards)
    out: list[int] = []
    for shard in range(num_shards):
        out += [shard] * (base + (shard < extra))
    return out


def run_positions(num_drawn: int, max_labels: int, num_shards: int, excluded: list[int], shard: int) -> list[int]:
    """The draw positions a run (shard -1) or one of its shards trains on."""
    assignment = shard_assignment(max_labels, num_shards)
    gone = set(excluded)
    return [p for p in range(num_drawn) if p not in gone and (shard < 0 or assignment[p] == shard)]


class ShardedMemory(nn.Module):
    """Several DocumentMemory shards behind the DocumentMemory interface (config, doc_keys, keys_for,
    selection, forward, readout). doc_shard[i] / doc_row[i]: the shard (index into `shards`) and the
    key row there of document i; shard_ids: each shard's number in the run's assignment."""

    def __init__(self, shards: list[DocumentMemory], shard_ids: list[int], doc_shard: list[int],
                 doc_row: list[int]) -> None:
        super().__init__()
        if not shards or len(doc_shard) != len(doc_row):
            raise ValueError("a sharded memory needs shards and one (shard, row) per document")
        self.shards = nn.ModuleList(shards)
        self.shard_ids = list(shard_ids)
        self.doc_shard, self.doc_row = list(doc_shard), list(doc_row)
        self.config = replace(shards[0].config, num_docs=len(doc_shard))

    @property
    def doc_keys(self) -> torch.Tensor:
        """(num_docs, key_dim): every document's key, in document order."""
        return torch.stack([self.shards[s].doc_keys[r] for s, r in zip(self.doc_shard, self.doc_row)])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def keys_for(self, doc_ids: torch.Tensor | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(doc_ids, dtype=torch.long, device=self.doc_keys.device)
        return self.doc_keys[ids]

    def route(self, keys: torch.Tensor) -> torch.Tensor:
        """(n, key_dim) -> (n,) the shard (index into `shards`) whose nearest document key it is."""
        doc_keys = self.doc_keys.detach().to(keys.device, torch.float32)
        nearest = torch.cdist(keys.detach().float().reshape(-1, doc_keys.shape[1]), doc_keys).argmin(dim=1)
        return torch.as_tensor(self.doc_shard, device=keys.device)[nearest]

    def _by_shard(self, keys: torch.Tensor, fn: Any) -> torch.Tensor:
        """fn(shard, its keys) for each shard's rows of keys (n, key_dim), put back in order."""
        shard_of = self.route(keys)
        parts, order = [], []
        for s in torch.unique(shard_of).tolist():
            rows = (shard_of == s).nonzero().squeeze(1)
            parts.append(fn(self.shards[s], keys[rows], rows))
            order.append(rows)
        out = torch.cat(parts)
        return out[torch.argsort(torch.cat(order))]

    def selection(self, keys: torch.Tensor) -> torch.Tensor:
        flat = keys.reshape(-1, keys.shape[-1])
        s = self._by_shard(flat, lambda shard, k, _: shard.selection(k))
        return s.reshape(*keys.shape[:-1], s.shape[-1])

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """As DocumentMemory.forward; each row goes through the shard its key routes to."""
        if keys is None:
            return torch.stack([shard(x) for shard in self.shards]).mean(dim=0)
        keys = one_per_row(keys.to(x.device), x.shape[0])
        return self._by_shard(keys, lambda shard, k, rows: shard(x[rows], k))

    def readout(self, keys: torch.Tensor | None = None) -> torch.Tensor:
        if keys is None:
            return torch.stack([shard.readout(None) for shard in self.shards]).mean(dim=0)
        return self._by_shard(keys, lambda shard, k, _: shard.readout(k))

    def without(self, doc: int, forget_row: Any) -> ShardedMemory:
        """A new sharded memory without document `doc`: forget_row(shard, row) gives its shard without
        the row; a shard left with no document is dropped whole (its weights included)."""
        s, r = self.doc_shard[doc], self.doc_row[doc]
        shards, ids = list(self.shards), list(self.shard_ids)
        doc_shard, doc_row = self.doc_shard[:doc] + self.doc_shard[doc + 1:], self.doc_row[:doc] + self.doc_row[doc + 1:]
        if shards[s].config.num_docs == 1:
            del shards[s], ids[s]
            doc_shard = [k - (k > s) for k in doc_shard]
        else:
            shards[s] = forget_row(shards[s], r)
            doc_row = [row - (k == s and row > r) for k, row in zip(doc_shard, doc_row)]
        return ShardedMemory(shards, ids, doc_shard, doc_row).eval()

    def shards_block(self) -> dict[str, Any]:
        return {"shard_of_doc": [self.shard_ids[s] for s in self.doc_shard], "row_of_doc": self.doc_row,
                "folders": [f"shard_{k}" for k in self.shard_ids]}

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """One memory folder per shard (shard_K/) and memory_config.json with the `shards` block."""
        directory = Path(directory)
        with whole_folder(directory) as tmp:  # the folder appears complete, or stays as it was
            for shard, folder in zip(self.shards, self.shards_block()["folders"]):
                shard.save(tmp / folder)
            data = {**self.config.to_dict(), SHARDS_FIELD: self.shards_block()}
            if provenance is not None:
                data[PROVENANCE_FIELD] = provenance
            (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return directory


def load_any_memory(directory: str | Path, device: str | torch.device = "cpu", expect_hidden_size: int | None = None,
                    expect_num_docs: int | None = None) -> DocumentMemory | ShardedMemory:
    """load_memory for a plain memory/ folder, or the ShardedMemory of a sharded one."""
    directory = Path(directory)
    data = read_memory_json(directory)
    block = data.get(SHARDS_FIELD)
    if block is None:
        return load_memory(directory, device, expect_hidden_size, expect_num_docs)
    try:
        folders, shard_of_doc, rows = block["folders"], block["shard_of_doc"], block["row_of_doc"]
        ids = [int(f.removeprefix("shard_")) for f in folders]
        doc_shard = [ids.index(k) for k in shard_of_doc]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MemoryFileError(f"{directory / CONFIG_NAME}: invalid shards block ({err})") from err
    if expect_num_docs is not None and len(doc_shard) != expect_num_docs:
        raise MemoryFileError(f"{directory / CONFIG_NAME}: {len(doc_shard)} documents, expected {expect_num_docs}")
    shards = [load_memory(directory / f, device, expect_hidden_size) for f in folders]
    for s, r in zip(doc_shard, rows):
        if not 0 <= r < shards[s].config.num_docs:
            raise MemoryFileError(f"{directory / CONFIG_NAME}: row {r} is beyond shard {ids[s]}'s keys")
    return ShardedMemory(shards, ids, doc_shard, rows).to(device)

