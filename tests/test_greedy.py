"""docmem/greedy.py: decoding that drops each row when it has its tokens gives transformers' generate()
greedy tokens, on tiny random GPT-NeoX and Llama models, with left padding, ragged wanted lengths and
an end-of-text token that stops some rows early."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from docmem.evaluation.generation import prompt_batch
from docmem.greedy import decode_greedy

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
    got = decode_greedy(model, ids, mask, wanted, {stop}, narrowed.append)
    assert got == expected
    assert any(len(g) < w for g, w in zip(got, wanted))  # the stop token ended a row early
    assert narrowed and all(a > b for a, b in zip(map(len, narrowed), map(len, narrowed[1:])))  # rows only leave
    # without a stop token every row gets exactly its count
    assert decode_greedy(model, ids, mask, wanted, set()) == [row[:w] for row, w in zip(free, wanted)]


def test_bad_counts_are_refused():
    model = tiny_model("llama")
    ids, mask = prompt_batch([[1, 2], [3]], PAD)
    with pytest.raises(ValueError, match="token counts"):
        decode_greedy(model, ids, mask, [3], set())
    with pytest.raises(ValueError, match="at least one"):
        decode_greedy(model, ids, mask, [3, 0], set())
