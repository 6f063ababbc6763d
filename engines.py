"""Two ways to compute the token cross-entropy of batches under given document keys.

ReferenceEngine: the literal algorithm of the released code: one full forward pass of the
hooked LM per key set (positive, then negative), with the library's own loss.

FastEngine: the same numbers for a fraction of the cost. The LM is frozen and in eval mode,
so everything up to the hooked block is identical in every epoch and for every key. It runs
that prefix once per batch (no grad) and keeps its output (the prefix cache); each step then
runs only the memory, the blocks above it, the final norm and a chunked linear+CE, on the
rows of every key set concatenated into one batch. The decoder's own forward runs both parts
(its block list swapped for a slice), so attention masks and rotary positions stay the
library's.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from chunked_ce import linear_cross_entropy
from document_memories import DocumentMemory
from foundations import Foundation
from hook_lm import attach_memory
from utils import final_norm

NO_MEMORY = "no_memory"  # a key set meaning: the plain LM, memory bypassed


@dataclass
class Batch:
    index: int  # position in the run's fixed list of batches (the prefix cache's key)
    doc_ids: torch.Tensor  # (B,) document of each row
    input_ids: torch.Tensor  # (B, T), left padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 on padding

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.index, self.doc_ids, self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device))

    def num_bytes_hidden(self, hidden_size: int, dtype: torch.dtype) -> int:
        return self.input_ids.numel() * hidden_size * torch.tensor([], dtype=dtype).element_size()


KeySet = torch.Tensor | None | str  # (B, key_dim) keys, None = memory without key, NO_MEMORY


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mean_ce(per_token: torch.Tensor, row_of_token: torch.Tensor, rows: slice) -> torch.Tensor:
    pick = (row_of_token >= rows.start) & (row_of_token < rows.stop)
    return per_token[pick].mean()


class ReferenceEngine:
    """Two (or more) full passes through the hooked LM: the released algorithm, kept for checking."""

    def __init__(self, foundation: Foundation, memory: DocumentMemory, layer: int, dtype: torch.dtype) -> None:
        self.foundation, self.memory, self.layer, self.dtype = foundation, memory, layer, dtype

    def losses(self, batch: Batch, key_sets: Sequence[KeySet]) -> list[torch.Tensor]:
        model = self.foundation.model
        batch = batch.to(self.foundation.input_device)
        out: list[torch.Tensor] = []
        with attach_memory(self.foundation.block(self.layer), self.memory) as hook:
            for keys in key_sets:
                hook.enabled = not (isinstance(keys, str) and keys == NO_MEMORY)
                hook.keys = keys if isinstance(keys, torch.Tensor) else None
                with _autocast(batch.input_ids.device, self.dtype):
                    result = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   labels=batch.labels, use_cache=False)
                out.append(result.loss.float())
        return out

    def forget(self) -> None:
        pass


class FastEngine:
    """Prefix cache + one batched suffix pass for all key sets. Same losses as ReferenceEngine."""

    def __init__(self, foundation: Foundation, memory: DocumentMemory, layer: int, dtype: torch.dtype,
                 cache_budget_bytes: int = 8 << 30, chunk_size: int = 1024) -> None:
        self.foundation, self.memory, self.layer, self.dtype = foundation, memory, layer, dtype
        self.decoder = foundation.decoder()
        self.blocks_name = _child_name(self.decoder, foundation.blocks)
        norm = final_norm(self.decoder)
        self.norm_name = _child_name(self.decoder, norm) if not isinstance(norm, nn.Identity) else None
        self.head = foundation.model.get_output_embeddings()
        self.chunk_size = chunk_size
        self.cache_budget_bytes = cache_budget_bytes
        self.cache: dict[int, torch.Tensor] = {}
        self.cached_bytes = 0
        self.device_budget_used = 0
        self.block_device = next(foundation.block(layer).parameters()).device

    # ---- running slices of the decoder -----------------------------------------------------
    @contextmanager
    def _decoder_slice(self, blocks: nn.ModuleList, keep_norm: bool) -> Iterator[nn.Module]:
        original_blocks = getattr(self.decoder, self.blocks_name)
        original_norm = getattr(self.decoder, self.norm_name) if self.norm_name else None
        setattr(self.decoder, self.blocks_name, blocks)
        if self.norm_name and not keep_norm:
            setattr(self.decoder, self.norm_name, nn.Identity())
        try:
            yield self.decoder
        finally:
            setattr(self.decoder, self.blocks_name, original_blocks)
            if self.norm_name:
                setattr(self.decoder, self.norm_name, original_norm)

    @torch.no_grad()
    def prefix(self, batch: Batch) -> torch.Tensor:
        """Hidden state after the hooked block, memory not applied: (B, T, d)."""
        cached = self.cache.get(batch.index)
        if cached is not None:
            return cached.to(self.block_device, non_blocking=True)
        on_device = batch.to(self.foundation.input_device)
        lower = nn.ModuleList(list(self.foundation.blocks)[: self.layer + 1])
        with self._decoder_slice(lower, keep_norm=False) as decoder, _autocast(on_device.input_ids.device, self.dtype):
            hidden = decoder(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                             use_cache=False).last_hidden_state
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

    def forget(self) -> None:
        self.cache.clear()
        self.cached_bytes = 0

    def losses(self, batch: Batch, key_sets: Sequence[KeySet]) -> list[torch.Tensor]:
        hidden = self.prefix(batch)
        rows = hidden.shape[0]
        device = hidden.device
        mask = batch.attention_mask.to(device)
        labels = batch.labels.to(device)
        with _autocast(device, self.dtype):
            parts = []
            for keys in key_sets:
                if isinstance(keys, str) and keys == NO_MEMORY:
                    parts.append(hidden)
                else:
                    parts.append(self.memory(hidden, keys if isinstance(keys, torch.Tensor) else None))
            upper = nn.ModuleList(list(self.foundation.blocks)[self.layer + 1:])
            with self._decoder_slice(upper, keep_norm=True) as decoder:
                final = decoder(inputs_embeds=torch.cat(parts), attention_mask=mask.repeat(len(key_sets), 1),
                                use_cache=False).last_hidden_state
        # token t predicts label t+1; padding labels are -100
        targets = labels[:, 1:].repeat(len(key_sets), 1)
        valid = targets != -100
        row_of_token = torch.arange(final.shape[0], device=device).unsqueeze(1).expand_as(targets)[valid]
        head_device = self.head.weight.device
        per_token = linear_cross_entropy(final[:, :-1][valid].to(head_device), self.head.weight,
                                         targets[valid].to(head_device), bias=self.head.bias,
                                         chunk_size=self.chunk_size)
        row_of_token = row_of_token.to(head_device)
        return [_mean_ce(per_token, row_of_token, slice(i * rows, (i + 1) * rows)) for i in range(len(key_sets))]


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise ValueError(f"{type(child).__name__} is not a direct child of {type(parent).__name__}; "
                     "this architecture needs --reference_loop")
