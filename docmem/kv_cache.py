"""A key/value cache for greedy generation that grows in place instead of by concatenation.

transformers' DynamicLayer appends each step's keys and values with torch.cat, so every decoding
step copies the whole cache of every layer: for a batch of 64 rows on a CPU that is hundreds of
megabytes per step. GrowingLayer keeps one buffer per layer with room to spare (doubling when
full), writes each step's keys and values into it, and hands attention a view of the filled
part: the same values, in the same shapes, so the same greedy tokens (tests/test_kv_cache.py).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_CAPACITY = 128  # positions allocated at first (a prompt plus a continuation usually fit)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of a buffer with spare positions."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.get_seq_length()
        new = key_states.shape[-2]
        buffers = getattr(self, "buffers", None)
        # a method of the base class (crop, batch_select_indices, ...) may have replaced the views
        # by tensors of their own: then the buffer no longer backs them and is made anew
        backed = (buffers is not None and used > 0 and self.keys.data_ptr() == buffers[0].data_ptr()
                  and self.keys.shape[:-2] == key_states.shape[:-2])
        if not backed or used + new > buffers[0].shape[-2]:
            capacity = max(2 * (used + new), MIN_CAPACITY)
            keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if used:
                keys[..., :used, :] = self.keys
                values[..., :used, :] = self.values
            self.buffers = buffers = (keys, values)
        buffers[0][..., used:used + new, :] = key_states
        buffers[1][..., used:used + new, :] = value_states
        self.keys, self.values = buffers[0][..., :used + new, :], buffers[1][..., :used + new, :]
        return self.keys, self.values


def growing_cache(config: Any) -> DynamicCache | None:
    """A cache of GrowingLayers for a model whose layers all attend to every position; None for a
    model with sliding-window layers (transformers' own cache handles those)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    if getattr(text, "sliding_window", None) is not None or any(t != "full_attention" for t in layer_types):
        return None
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def cache_kwargs(model: Any) -> dict[str, DynamicCache]:
    """generate()'s keyword for a growing cache: `cache` in recent transformers, `past_key_values`
    before (the forward's own parameter name tells which); {} for a sliding-window model."""
    cache = growing_cache(model.config)
    if cache is None:
        return {}
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
