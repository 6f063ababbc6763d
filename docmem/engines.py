"""Two ways to compute the token cross-entropy of batches under given document keys.

ReferenceEngine: the literal algorithm of the released code: one full forward pass of the
hooked LM per key set (positive, then negative), with the library's own loss.

FastEngine: the same numbers for a fraction of the cost. The LM is frozen and in eval mode,
so everything up to the hooked block is identical in every epoch and for every key. It runs
that prefix once per batch (no grad; a row repeated in the batch only once) and keeps its
output (the prefix cache); each step then runs only the memory, the blocks above it, the final
norm and a chunked linear+CE, on the rows of every key set concatenated into one batch. The
decoder's own forward runs both parts (its block list swapped for a slice), so attention masks
and rotary positions stay the library's. Where the scored tokens are is found once per batch
too (ScoredTokens): finding them from the labels makes the host wait for the GPU.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from docmem.batching import Batch
from docmem.chunked_ce import Workspace, linear_cross_entropy
from docmem.decoder_slices import DecoderSlices, distinct_rows
from document_memories import DocumentMemory
from foundations import Foundation, block_device
from hook_lm import attach_memory

NO_MEMORY = "no_memory"  # a key set meaning: the plain LM, memory bypassed


KeySet = torch.Tensor | None | str  # (B, key_dim) keys, None = memory without key, NO_MEMORY


class LossEngine(Protocol):
    """What training and evaluation ask of an engine: the token CE of a batch under key sets."""

    def losses(self, batch: Batch, key_sets: Sequence[KeySet], per_document: bool = False) -> list[torch.Tensor]:
        """One loss per key set: a scalar token mean, or with per_document one per chunk (G,)."""
        ...

    def clear_cache(self) -> None:
        """Drop whatever the engine caches between steps."""
        ...


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Buckets:
    """Which mean each scored token's loss goes into: (key set, group) for num_sets stacked copies of a
    batch, the groups being each run of rows with the same id (the batch's chunks where it has them,
    else its documents), or the whole batch."""
    index: torch.Tensor  # (N,) bucket of every scored token
    counts: torch.Tensor  # (num_sets * groups,) scored tokens per bucket
    num_sets: int
    groups: int
    per_document: bool

    def means(self, per_token: torch.Tensor) -> list[torch.Tensor]:
        """Per key set: the token mean over the batch (a scalar) or, per_document, over each group ((G,))."""
        sums = torch.zeros(self.num_sets * self.groups, device=per_token.device).index_add(0, self.index, per_token)
        means = (sums / self.counts).view(self.num_sets, self.groups)
        return [m if self.per_document else m[0] for m in means]


def _buckets(row_of_token: torch.Tensor, doc_ids: torch.Tensor, num_sets: int, per_document: bool) -> Buckets:
    rows = doc_ids.shape[0]
    device = row_of_token.device
    _, group_of_row = torch.unique_consecutive(doc_ids.cpu(), return_inverse=True)
    groups = int(group_of_row.max()) + 1 if per_document else 1
    group_of_row = group_of_row.to(device) if per_document else torch.zeros(rows, dtype=torch.long, device=device)
    set_of_token = torch.div(row_of_token, rows, rounding_mode="floor")
    index = set_of_token * groups + group_of_row[row_of_token % rows]
    counts = torch.zeros(num_sets * groups, device=device).index_add(0, index, torch.ones(index.shape, device=device))
    return Buckets(index, counts, num_sets, groups, per_document)


def _reduce(per_token: torch.Tensor, row_of_token: torch.Tensor, doc_ids: torch.Tensor, num_sets: int,
            per_document: bool) -> list[torch.Tensor]:
    """Per-token losses of num_sets stacked copies of a batch -> per key set, Buckets.means."""
    return _buckets(row_of_token.to(per_token.device), doc_ids, num_sets, per_document).means(per_token)


def _targets(labels: torch.Tensor, num_sets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of a (num_sets x B, T) stack: token t predicts label t+1; -100 is ignored."""
    targets = labels[:, 1:].repeat(num_sets, 1)
    valid = targets != -100
    row_of_token = torch.arange(targets.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[valid]
    return targets, valid, row_of_token


@dataclass
class ScoredTokens:
    """Everything of a batch's loss that is not the hidden states, for num_sets stacked copies of it:
    found once per batch, since finding the scored tokens (labels != -100) waits for the GPU."""
    batch: Batch  # what it was computed for (the cache holds it, so its id is never reused)
    mask: torch.Tensor  # (num_sets x B, T) attention mask, on the block device
    rows: torch.Tensor  # (N,) the scored tokens' rows and columns in the (num_sets x B, T) stack,
    cols: torch.Tensor  # on the block device
    targets: torch.Tensor  # (N,) on the head's device
    buckets: Buckets  # on the head's device
    every_token: bool  # every token but the last scored (no padding): a slice picks them, no gather

    def pick(self, final: torch.Tensor) -> torch.Tensor:
        """The scored tokens' hidden states (N, d), row after row."""
        if self.every_token:  # the same values in the same order; its backward is a copy, not a scatter
            return final[:, :-1].reshape(-1, final.shape[-1])
        return final[self.rows, self.cols]


def scored_tokens(batch: Batch, num_sets: int, per_document: bool, device: torch.device,
                  head_device: torch.device) -> ScoredTokens:
    targets = batch.labels.to(device)[:, 1:].repeat(num_sets, 1)
    rows, cols = (targets != -100).nonzero(as_tuple=True)  # row after row, as a boolean mask orders them
    buckets = _buckets(rows.to(head_device), batch.group_ids, num_sets, per_document)
    return ScoredTokens(batch, batch.attention_mask.to(device).repeat(num_sets, 1), rows, cols,
                        targets[rows, cols].to(head_device), buckets, rows.numel() == targets.numel())


class ReferenceEngine:
    """Two (or more) full passes through the hooked LM: the released algorithm, kept for checking."""

    def __init__(self, foundation: Foundation, memory: DocumentMemory, layer: int, dtype: torch.dtype) -> None:
        self.foundation, self.memory, self.layer, self.dtype = foundation, memory, layer, dtype

    def losses(self, batch: Batch, key_sets: Sequence[KeySet], per_document: bool = False) -> list[torch.Tensor]:
        model = self.foundation.model
        on_device = batch.to(self.foundation.input_device)
        per_token = []
        with attach_memory(self.foundation.block(self.layer), self.memory) as hook:
            for keys in key_sets:
                hook.enabled = not (isinstance(keys, str) and keys == NO_MEMORY)
                hook.keys = keys if isinstance(keys, torch.Tensor) else None
                with _autocast(on_device.input_ids.device, self.dtype):
                    logits = model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                                   use_cache=False).logits
                targets, valid, _ = _targets(on_device.labels.to(logits.device), 1)
                per_token.append(nn.functional.cross_entropy(logits[:, :-1][valid].float(), targets[valid],
                                                             reduction="none"))
        device = per_token[0].device
        targets, valid, row_of_token = _targets(batch.labels.to(device), len(key_sets))
        return _reduce(torch.cat(per_token), row_of_token, batch.group_ids, len(key_sets), per_document)

    def clear_cache(self) -> None:
        pass


class FastEngine:
    """Prefix cache + one batched suffix pass for all key sets. Same losses as ReferenceEngine."""

    def __init__(self, foundation: Foundation, memory: DocumentMemory, layer: int, dtype: torch.dtype,
                 cache_budget_bytes: int = 8 << 30, chunk_size: int = 1024, head_dtype: torch.dtype | None = None) -> None:
        """head_dtype: the dtype of the vocabulary head's two products (logits, the hidden state's
        gradient); None = the head's own. An fp32 LM with head_dtype bf16 is --precision bf16_head:
        a bf16 copy of the head is made once, everything else stays fp32."""
        self.foundation, self.memory, self.layer, self.dtype = foundation, memory, layer, dtype
        self.slices = DecoderSlices(foundation)
        self.head = foundation.model.get_output_embeddings()
        head_dtype = head_dtype or self.head.weight.dtype
        self.head_weight = self.head.weight.detach().to(head_dtype)  # the head itself when no cast is needed
        self.head_bias = self.head.bias.detach().to(head_dtype) if self.head.bias is not None else None
        self.chunk_size = chunk_size
        self.head_workspace = Workspace()  # the head's chunk buffers, reused from step to step
        self.cache_budget_bytes = cache_budget_bytes
        self.cache: dict[int, torch.Tensor] = {}
        self.cached_bytes = 0
        self.scored: dict[tuple[int, int, bool], ScoredTokens] = {}  # per (batch index, key sets, per_document)
        self.block_device = block_device(foundation, layer)

    @torch.no_grad()
    def prefix(self, batch: Batch) -> torch.Tensor:
        """Hidden state after the hooked block, memory not applied: (B, T, d)."""
        cached = self.cache.get(batch.index)
        if cached is not None and cached.shape[:2] == batch.input_ids.shape:
            return cached.to(self.block_device, non_blocking=True)
        first, copy_of_row = distinct_rows(batch.input_ids, batch.attention_mask)
        input_ids, attention_mask = batch.input_ids[first], batch.attention_mask[first]
        device = self.foundation.input_device
        with self.slices.blocks(0, self.layer + 1, final_norm=False) as decoder, _autocast(device, self.dtype):
            hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             use_cache=False).last_hidden_state
        if copy_of_row is not None:
            hidden = hidden[copy_of_row.to(hidden.device)]
        self._store(batch.index, hidden)
        return hidden

    def _store(self, index: int, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self.cached_bytes + size <= self.cache_budget_bytes:
            self.cache[index] = hidden
            self.cached_bytes += size
        elif hidden.device.type == "cuda" and self.cached_bytes + size <= 2 * self.cache_budget_bytes:
            # past the device budget: keep it in pinned host memory (copied back per step)
            self.cache[index] = hidden.to("cpu").pin_memory()
            self.cached_bytes += size
        # else: it fits nowhere; recompute the prefix next time

    def clear_cache(self) -> None:
        self.cache.clear()
        self.cached_bytes = 0
        self.scored.clear()

    def prepare(self, batch: Batch, num_sets: int, per_document: bool) -> bool:
        """Fill the caches a step on `batch` reads (its prefix, its scored tokens); True when both stay on
        the block device, so a CUDA graph can read them where they are (docmem/cuda_graphs.py)."""
        hidden = self.prefix(batch)
        self._scored(batch, num_sets, per_document, hidden.device)
        cached = self.cache.get(batch.index)
        return cached is not None and cached.device == hidden.device

    def _scored(self, batch: Batch, num_sets: int, per_document: bool, device: torch.device) -> ScoredTokens:
        key = (batch.index, num_sets, per_document)
        found = self.scored.get(key)
        if found is None or found.batch is not batch or found.mask.device != device:
            found = self.scored[key] = scored_tokens(batch, num_sets, per_document, device, self.head.weight.device)
        return found

    def losses(self, batch: Batch, key_sets: Sequence[KeySet], per_document: bool = False) -> list[torch.Tensor]:
        hidden = self.prefix(batch)
        device = hidden.device
        n = len(key_sets)
        scored = self._scored(batch, n, per_document, device)
        with _autocast(device, self.dtype):
            if all(isinstance(keys, torch.Tensor) for keys in key_sets):
                # one memory call for every key set (one forward for DistributedDataParallel)
                mixed = self.memory(hidden.repeat(n, 1, 1), torch.cat([k.to(device) for k in key_sets]))
            else:
                mixed = torch.cat([hidden if isinstance(keys, str) and keys == NO_MEMORY
                                   else self.memory(hidden, keys if isinstance(keys, torch.Tensor) else None)
                                   for keys in key_sets])
            final = self.slices.top(self.layer + 1, mixed, scored.mask)
        per_token = linear_cross_entropy(scored.pick(final).to(self.head.weight.device), self.head_weight,
                                         scored.targets, bias=self.head_bias, chunk_size=self.chunk_size,
                                         workspace=self.head_workspace)
        return scored.buckets.means(per_token)
