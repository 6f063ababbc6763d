"""docmem/greedy.py: decoding that drops each row when it has its tokens gives transformers' generate()
greedy tokens, on tiny random GPT-NeoX and Llama models, with left padding, ragged wanted lengths and
an end-of-text token that stops some rows early; the prompt pass that runs the blocks below the memory
once per distinct prompt gives the model's own logits, cache and tokens."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from conftest import tiny_model
from docmem.engines import NO_MEMORY
from docmem.evaluation.generation import RowConditions, prompt_batch
from docmem.greedy import (
    DecodeHooks,
    PreallocatedCacheLayer,
    _returned_cache,
    decode_greedy,
    preallocate_cache,
    prompt_pass_once_per_prompt,
    selects_first_rows,
)
from document_memories import DocumentMemory, MemoryConfig
from foundations import from_model
from hook_lm import attach_memory

PAD = 0


def _generate(model, ids, mask, max_new: int, stop: int | None) -> list[list[int]]:
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                         min_new_tokens=0, pad_token_id=PAD, eos_token_id=stop, num_beams=1, temperature=None,
                         top_p=None, top_k=None)
    return out[:, ids.shape[1]:].tolist()


def _cut(row: list[int], wanted: int, stop: int | None) -> list[int]:
    end = next((t + 1 for t, token in enumerate(row) if token == stop), len(row))
    return row[:min(end, wanted)]


@torch.no_grad()
def test_the_same_tokens_as_generate(arch):
    model = tiny_model(arch, seed=3)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (5, 9, 3, 9, 7, 1)]
    ids, mask = prompt_batch(prompts, PAD)
    wanted = [12, 4, 9, 1, 12, 7]
    free = _generate(model, ids, mask, max(wanted), None)
    # an end-of-text token that some rows produce part-way: those rows stop there
    stop = free[0][5]
    expected = [_cut(row, w, stop) for row, w in zip(_generate(model, ids, mask, max(wanted), stop), wanted)]
    narrowed: list[list[int]] = []
    got = decode_greedy(model, ids, mask, wanted, {stop}, DecodeHooks(on_rows=narrowed.append))
    assert got == expected
    assert any(len(g) < w for g, w in zip(got, wanted))  # the stop token ended a row early
    assert narrowed and all(a > b for a, b in zip(map(len, narrowed), map(len, narrowed[1:])))  # rows only leave
    # without a stop token every row gets exactly its count
    assert decode_greedy(model, ids, mask, wanted, set()) == [row[:w] for row, w in zip(free, wanted)]


def _keys_values(gen: torch.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 2, length, 3, generator=gen), torch.randn(rows, 2, length, 3, generator=gen)


def _plain_and_preallocated(gen: torch.Generator, rows: int, length: int, room: int
                            ) -> tuple[DynamicLayer, PreallocatedCacheLayer]:
    """A transformers layer and a PreallocatedCacheLayer holding the same first keys and values."""
    k0, v0 = _keys_values(gen, rows, length)
    plain = DynamicLayer()
    plain.update(k0, v0)
    return plain, PreallocatedCacheLayer(k0, v0, room)


def test_a_preallocated_layer_holds_what_a_plain_layer_holds():
    gen = torch.Generator().manual_seed(0)
    plain, preallocated = _plain_and_preallocated(gen, rows=4, length=5, room=2)
    store = preallocated.key_store
    for step in range(4):  # two steps within the room, then two past it (it grows)
        k, v = _keys_values(gen, 4, 1)
        want, got = plain.update(k, v), preallocated.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        assert preallocated.get_seq_length() == plain.get_seq_length() == 6 + step
        if step < 2:
            assert preallocated.key_store is store  # written in place, not a new tensor
    keep = torch.tensor([3, 1])
    plain.batch_select_indices(keep)
    preallocated.batch_select_indices(keep)
    assert torch.equal(plain.keys, preallocated.keys) and torch.equal(plain.values, preallocated.values)


def test_keeping_the_first_rows_takes_a_view_and_the_same_values():
    gen = torch.Generator().manual_seed(1)
    plain, preallocated = _plain_and_preallocated(gen, rows=5, length=4, room=3)
    store = preallocated.key_store
    for keep in (torch.tensor([0, 1, 2]), torch.tensor([0, 2])):  # the first rows, then not
        plain.batch_select_indices(keep)
        preallocated.batch_select_indices(keep)
        assert torch.equal(plain.keys, preallocated.keys) and torch.equal(plain.values, preallocated.values)
        k, v = _keys_values(gen, len(keep), 1)
        assert all(torch.equal(a, b) for a, b in zip(plain.update(k, v), preallocated.update(k, v)))
        if len(keep) == 3:
            assert preallocated.key_store.data_ptr() == store.data_ptr()  # the first rows: a view, nothing copied
        else:
            assert preallocated.key_store.data_ptr() != store.data_ptr()
    assert selects_first_rows(torch.tensor([0, 1, 2])) and selects_first_rows(torch.tensor([], dtype=torch.long))
    assert not selects_first_rows(torch.tensor([1, 2])) and not selects_first_rows(torch.tensor([0, 2]))
    assert not selects_first_rows(torch.tensor([0, 0, 2]))


@torch.no_grad()
def test_decoding_writes_the_cache_in_place():
    model = tiny_model("llama", seed=3)
    ids, mask = prompt_batch([[5, 6, 7], [8, 9]], PAD)
    cache = _returned_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
    preallocate_cache(cache, 3)
    assert all(isinstance(layer, PreallocatedCacheLayer) for layer in cache.layers)
    seen: list[DynamicCache] = []
    forward = model.forward

    @functools.wraps(forward)  # the same signature: decode_greedy names the cache argument from it
    def spy(*args, **kwargs):
        seen.extend(v for v in kwargs.values() if isinstance(v, DynamicCache))
        return forward(*args, **kwargs)

    model.forward = spy
    decode_greedy(model, ids, mask, [4, 4], set())
    assert seen and all(isinstance(layer, PreallocatedCacheLayer) for c in seen for layer in c.layers)


def test_bad_counts_are_refused():
    model = tiny_model("llama")
    ids, mask = prompt_batch([[1, 2], [3]], PAD)
    with pytest.raises(ValueError, match="token counts"):
        decode_greedy(model, ids, mask, [3], set())
    with pytest.raises(ValueError, match="at least one"):
        decode_greedy(model, ids, mask, [3, 0], set())


class _Tok:  # from_model only sets the padding of a tokenizer
    eos_token = pad_token = "<eos>"
    eos_token_id = pad_token_id = PAD
    padding_side = "left"


@pytest.mark.parametrize("layer", [1, 2])  # the last block too: nothing above it but the final norm
@torch.no_grad()
def test_the_prompt_pass_once_per_prompt_is_the_models_own(arch, layer):
    foundation = from_model(tiny_model(arch, seed=5, num_layers=3), _Tok())
    memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=3, memory_dim=16),
                            generator=torch.Generator().manual_seed(0)).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (6, 4, 6)]
    keys = memory.doc_keys.detach()
    conditions = [keys[0], keys[1], keys[2], None, NO_MEMORY]  # every prompt under each, as recall does
    rows = [p for p in prompts for _ in conditions]
    per_row = conditions * len(prompts)
    ids, mask = prompt_batch(rows, PAD)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    wanted = [3 + r % 5 for r in range(len(rows))]
    with attach_memory(foundation.block(layer), memory) as hook:
        hook.memory = RowConditions(memory, per_row)
        shared = prompt_pass_once_per_prompt(foundation, layer, hook)
        logits, cache = shared(ids, mask, positions)
        own = foundation.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               logits_to_keep=1)
        assert shared(ids[:1], mask[:1], positions[:1]) is None  # no prompt repeats: the model's own pass

        def narrow(alive: list[int]) -> None:
            hook.memory = RowConditions(memory, [per_row[a] for a in alive])

        hook.memory = RowConditions(memory, per_row)
        with_shared = decode_greedy(foundation.model, ids, mask, wanted, set(), DecodeHooks(on_rows=narrow, prefill=shared))
        hook.memory = RowConditions(memory, per_row)
        without = decode_greedy(foundation.model, ids, mask, wanted, set(), DecodeHooks(on_rows=narrow))
    torch.testing.assert_close(logits, own.logits, rtol=0, atol=1e-5)
    own_cache = _returned_cache(own)
    for i in range(foundation.num_blocks):
        torch.testing.assert_close(cache.layers[i].keys, own_cache.layers[i].keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(cache.layers[i].values, own_cache.layers[i].values, rtol=0, atol=1e-5)
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[0], logits[4])  # conditions differ
    assert with_shared == without


class _TiedLogits(torch.nn.Module):
    """A stand-in LM whose every step's logits tie at words 3 and 5 (in the dtype given)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep, past_key_values=None):
        logits = torch.zeros(input_ids.shape[0], 1, 8, dtype=self.dtype)
        logits[..., 3] = logits[..., 5] = 1.5
        return CausalLMOutputWithPast(logits=logits, past_key_values=DynamicCache())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tie_goes_to_the_first_word_as_argmax_gives_it(dtype):
    ids, mask = prompt_batch([[5, 6, 7], [8, 9]], PAD)
    assert decode_greedy(_TiedLogits(dtype), ids, mask, [3, 2], set()) == [[3, 3, 3], [3, 3]]
