"""The growing key/value cache (docmem/kv_cache.py) gives the same greedy tokens as transformers' own
cache, keeps working after the base class replaces its tensors, and steps aside for sliding windows."""
from __future__ import annotations

import torch
from transformers import MistralConfig
from transformers.cache_utils import DynamicLayer

from conftest import tiny_config, tiny_model
from docmem.kv_cache import MIN_CAPACITY, GrowingLayer, cache_kwargs, growing_cache


@torch.no_grad()
def test_same_greedy_tokens_as_the_models_own_cache(arch):
    model = tiny_model(arch, seed=3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (4, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    mask[3, :11] = 0
    settings = {"do_sample": False, "max_new_tokens": MIN_CAPACITY, "min_new_tokens": MIN_CAPACITY,
                "pad_token_id": 0, "num_beams": 1}
    own = model.generate(input_ids=ids, attention_mask=mask, **settings)
    kwargs = cache_kwargs(model)
    (cache,) = kwargs.values()
    grown = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **settings)
    assert torch.equal(own, grown)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    # the prompt and the continuation outgrew the first buffer: it was grown once, keeping what it held
    assert cache.layers[0].buffers[0].shape[-2] > MIN_CAPACITY


def test_a_replaced_view_is_copied_into_a_new_buffer():
    torch.manual_seed(0)
    grown, plain = GrowingLayer(), DynamicLayer()
    steps = [(torch.randn(3, 2, n, 4), torch.randn(3, 2, n, 4)) for n in (5, 1, 1)]
    for k, v in steps:
        got, want = grown.update(k, v), plain.update(k, v)
    for layer in (grown, plain):
        layer.batch_select_indices(torch.tensor([2, 0]))  # what beam search or a caller may do
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    got, want = grown.update(k, v), plain.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert grown.get_seq_length() == plain.get_seq_length() == 8


def test_sliding_window_models_keep_their_own_cache():
    sliding = MistralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, sliding_window=16)
    assert growing_cache(sliding) is None
    assert growing_cache(tiny_config("llama")) is not None
