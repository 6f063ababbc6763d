"""Greedy decoding of a batch of token rows with a key/value cache, each row dropped from the batch
as soon as it has its tokens (its own count, or an end-of-text token).

transformers' generate() decodes every row of a batch until the longest is done; when the rows want
different lengths (recall's continuations are as long as their references), a fifth of those steps
decode rows that are already finished. The steps here are the model's own forward with its cache,
so the tokens are generate()'s greedy tokens: the same positions (from the attention mask), the same
last-token logits and the same argmax.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn


def _cache_argument(model: nn.Module) -> str:
    """The forward's name for the key/value cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def decode_greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, wanted: Sequence[int],
                  stop_ids: Collection[int], on_rows: Callable[[list[int]], None] | None = None,
                  on_tokens: Callable[[int], object] | None = None) -> list[list[int]]:
    """Each row's greedy continuation (new token ids): up to wanted[r] tokens, ending with the first
    stop token if one comes. Rows are left padded. on_rows(rows) is called with the indices of the rows
    still decoding whenever some drop out, before the next step (to narrow per-row state such as the
    memory's per-row keys to them); on_tokens(n) after each step with the tokens it decoded (a bar)."""
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
    output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    positions = positions[:, -1:]
    while True:
        tokens = output.logits[:, -1, :].float().argmax(-1).cpu()
        for r, t in zip(alive.tolist(), tokens.tolist()):
            out[r].append(t)
        if on_tokens is not None:
            on_tokens(len(alive))
        left = left - 1
        done = (left <= 0) | torch.isin(tokens, stops)
        if bool(done.all()):
            return out
        cache = _returned_cache(output)
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep.to(device))
            alive, tokens, left = alive[keep], tokens[keep], left[keep]
            mask, positions = mask[keep.to(mask.device)], positions[keep.to(positions.device)]
            if on_rows is not None:
                on_rows(alive.tolist())
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions + 1
        output = model(input_ids=tokens.view(-1, 1).to(device), attention_mask=mask, position_ids=positions,
                       use_cache=True, logits_to_keep=1, **{cache_arg: cache})
