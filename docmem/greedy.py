"""Greedy decoding of a batch of token rows with a key/value cache, each row dropped from the batch
as soon as it has its tokens (its own count, or an end-of-text token); the cache's layers with room
for the tokens to come (PreallocatedCacheLayer: written in place, not concatenated); and a prompt pass
that runs the blocks below a memory once per distinct prompt when rows repeat prompts under different
conditions.

transformers' generate() decodes every row of a batch until the longest is done; when the rows want
different lengths (recall's continuations are as long as their references), a fifth of those steps
decode rows that are already finished. The steps here are the model's own forward with its cache,
so the tokens are generate()'s greedy tokens: the same positions (from the attention mask), the same
last-token logits and the same argmax.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from docmem.decoder_slices import DecoderSlices, distinct_rows
from foundations import Foundation
from hook_lm import MemoryHook

# (input_ids, attention_mask, position_ids) -> (each row's last-position logits (rows, 1, vocab), the key/value
# cache of every block), or None: the model's own pass instead
Prefill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, Any] | None"]
SHARED_PROMPT_MODELS = ("llama", "gpt_neox")  # the architectures whose blocks the shared prompt pass is checked on


@dataclass
class DecodeHooks:
    on_rows: Callable[[list[int]], None] | None = None  # the rows still decoding, whenever some drop out
    on_tokens: Callable[[int], object] | None = None  # tokens decoded by a step (a progress bar)
    prefill: Prefill | None = None  # the prompt pass (None: the model's own forward)


def _cache_argument(module: nn.Module) -> str:
    """The forward's name for the key/value cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _returned_cache(output):
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


class PreallocatedCacheLayer(DynamicLayer):
    """One block's key/value cache with room for the tokens still to come. transformers' own layer
    concatenates every step, copying the whole cache; this one writes each step's keys and values in
    place and hands attention a view of the filled part (the same numbers: the values are the same, only
    their storage differs). A step past the room grows it by copying, as the own layer would."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.length = 0
        self.key_store = keys.new_empty(*keys.shape[:-2], keys.shape[-2] + room, keys.shape[-1])
        self.value_store = values.new_empty(*values.shape[:-2], values.shape[-2] + room, values.shape[-1])
        self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_store.shape[-2]:  # past the room: grow (never on the path decode_greedy takes)
            self.key_store = torch.cat([self.key_store[..., :self.length, :], key_states], dim=-2)
            self.value_store = torch.cat([self.value_store[..., :self.length, :], value_states], dim=-2)
        else:
            self.key_store[..., self.length:end, :] = key_states
            self.value_store[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self.key_store[..., :end, :], self.value_store[..., :end, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # keeping the first rows (recall's rows come longest-wanted first, so the last ones finish): a view
        if selects_first_rows(indices):
            count = len(indices)
            self.key_store, self.value_store = self.key_store[:count], self.value_store[:count]
        else:
            self.key_store, self.value_store = self.key_store[indices], self.value_store[indices]
        self.keys, self.values = self.key_store[..., :self.length, :], self.value_store[..., :self.length, :]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a PreallocatedCacheLayer is for greedy decoding, which never crops")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a PreallocatedCacheLayer is for greedy decoding, which never repeats rows")


def selects_first_rows(indices: torch.Tensor) -> bool:
    """Whether row indices select the first len(indices) rows in order (0, 1, ..., k-1)."""
    indices = indices.cpu()
    return torch.equal(indices, torch.arange(len(indices), dtype=indices.dtype))


def preallocate_cache(cache: Any, room: int) -> None:
    """Replace the cache's plain layers, in place, by PreallocatedCacheLayers holding the same keys and
    values, each with room for `room` more tokens (layers of other kinds, e.g. sliding windows, are kept)."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            cache.layers[i] = PreallocatedCacheLayer(layer.keys, layer.values, room)


@torch.no_grad()
def decode_greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, wanted: Sequence[int],
                  stop_ids: Collection[int], hooks: DecodeHooks | None = None) -> list[list[int]]:
    """Each row's greedy continuation (new token ids): up to wanted[r] tokens, ending with the first
    stop token if one comes. Rows are left padded. hooks.on_rows(rows) is called with the indices of the
    rows still decoding whenever some drop out, before the next step (to narrow per-row state such as the
    memory's per-row keys to them); hooks.on_tokens(n) after each step with the tokens it decoded."""
    hooks = hooks or DecodeHooks()
    rows = input_ids.shape[0]
    if len(wanted) != rows:
        raise ValueError(f"{len(wanted)} token counts for {rows} rows")
    if min(wanted, default=1) < 1:
        raise ValueError("every row must want at least one token")
    device = input_ids.device
    cache_arg = _cache_argument(model)
    out: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows)
    left = torch.tensor(list(wanted))
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    shared = hooks.prefill(input_ids, mask, positions) if hooks.prefill is not None else None
    if shared is None:
        output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1)
        logits, cache = output.logits, _returned_cache(output)
    else:
        logits, cache = shared
    preallocate_cache(cache, max(wanted) - 1)  # each later step writes its keys and values in place
    positions = positions[:, -1:]
    while True:
        # the first largest logit, as argmax gives it (max(dim) takes half the time on a CPU; a bf16
        # logit compares as its exact fp32 value would)
        tokens = logits[:, -1, :].max(dim=-1).indices.cpu()
        for r, t in zip(alive.tolist(), tokens.tolist()):
            out[r].append(t)
        if hooks.on_tokens is not None:
            hooks.on_tokens(len(alive))
        left = left - 1
        done = (left <= 0) | torch.isin(tokens, stops)
        if bool(done.all()):
            return out
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)  # CPU indices: the layers may lie on several GPUs
            alive, tokens, left = alive[keep], tokens[keep], left[keep]
            mask, positions = mask[keep.to(mask.device)], positions[keep.to(positions.device)]
            if hooks.on_rows is not None:
                hooks.on_rows(alive.tolist())
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions + 1
        output = model(input_ids=tokens.view(-1, 1).to(device), attention_mask=mask, position_ids=positions,
                       use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        logits, cache = output.logits, _returned_cache(output)


def prompt_pass_once_per_prompt(foundation: Foundation, layer: int, hook: MemoryHook) -> Prefill | None:
    """A prompt pass for rows that repeat prompts under different memory conditions (recall's right key,
    other keys, no key, no memory). The blocks up to the hooked `layer` do not depend on the condition: they
    run once per distinct prompt, their cache copied to every row; `hook` then applies each row's memory
    condition to the block's output, and the blocks above run once per row. The same numbers as the model's
    own pass over every row (tests/test_greedy.py). The pass returns None (the model's own pass then) when
    no prompt repeats; for an architecture it has not been checked on there is no pass (None)."""
    model = foundation.model
    if getattr(model.config, "model_type", None) not in SHARED_PROMPT_MODELS:
        return None
    slices = DecoderSlices(foundation)
    cache_arg = _cache_argument(slices.decoder)

    def prefill(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        first, copy_of_row = distinct_rows(ids, mask)
        if copy_of_row is None:
            return None
        lower, upper = DynamicCache(), DynamicCache()
        enabled, hook.enabled = hook.enabled, False  # the memory comes after, row by row
        try:
            with slices.blocks(0, layer + 1, final_norm=False) as decoder:
                hidden = decoder(input_ids=ids[first], attention_mask=mask[first], position_ids=positions[first],
                                 use_cache=True, **{cache_arg: lower}).last_hidden_state
        finally:
            hook.enabled = enabled
        rows = copy_of_row.to(hidden.device)
        mixed = hook.apply(hidden[rows])
        with slices.blocks(layer + 1, foundation.num_blocks, final_norm=True) as decoder:
            final = decoder(inputs_embeds=mixed, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{cache_arg: upper}).last_hidden_state
        # the last position only, made contiguous: a strided (rows, 1, d) input sends the head through a
        # batched product that reads its weight once per row (0.3 s for 105 rows of SmolLM2, against 0.03 s)
        logits = model.get_output_embeddings()(final[:, -1:, :].contiguous())
        cache = DynamicCache()
        for i in range(foundation.num_blocks):
            if i <= layer:
                keys, values = lower.layers[i].keys, lower.layers[i].values
                keys, values = keys[rows.to(keys.device)], values[rows.to(values.device)]
            else:
                keys, values = upper.layers[i].keys, upper.layers[i].values
            cache.update(keys, values, i)
        return logits, cache

    return prefill
