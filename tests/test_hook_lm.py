"""Attaching the memory to a block: removal, tensor/tuple outputs, generate(), errors."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from document_memories import DocumentMemory, MemoryConfig
from hook_lm import attach_memory


def blocks_of(model):
    return model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers


def memory_for(model, num_docs: int = 3) -> DocumentMemory:
    return DocumentMemory(MemoryConfig(hidden_size=model.config.hidden_size, num_docs=num_docs, memory_dim=8),
                          generator=torch.Generator().manual_seed(0))


def test_hook_changes_output_and_is_removed(arch):
    model = tiny_model(arch)
    mem = memory_for(model)
    ids = torch.randint(1, 100, (2, 6))
    block = blocks_of(model)[1]
    with torch.no_grad():
        plain = model(ids).logits
        with attach_memory(block, mem, mem.keys_for([0, 1])) as hook:
            hooked = model(ids).logits
            hook.keys = mem.keys_for([2, 2])
            other = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(plain, hooked)
    assert not torch.allclose(hooked, other)
    assert torch.equal(plain, after)
    assert len(block._forward_hooks) == 0


def test_hook_removed_when_body_raises(arch):
    model = tiny_model(arch)
    block = blocks_of(model)[0]
    with pytest.raises(RuntimeError, match="boom"):
        with attach_memory(block, memory_for(model)):
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == 0


def test_memory_errors_propagate(arch):
    model = tiny_model(arch)
    mem = memory_for(model)
    block = blocks_of(model)[0]
    bad_keys = torch.zeros(1, 5)  # key_dim is 2
    with pytest.raises(RuntimeError):
        with attach_memory(block, mem, bad_keys):
            model(torch.randint(1, 100, (1, 4)))
    assert len(block._forward_hooks) == 0


def test_tuple_and_tensor_outputs():
    mem = DocumentMemory(MemoryConfig(hidden_size=4, num_docs=2, memory_dim=3))
    k = mem.keys_for([1])

    class TupleBlock(torch.nn.Module):
        def forward(self, x):
            return (x * 2, "extra")

    class TensorBlock(torch.nn.Module):
        def forward(self, x):
            return x * 2

    x = torch.randn(1, 3, 4)
    with attach_memory(TupleBlock_ := TupleBlock(), mem, k):
        out = TupleBlock_(x)
    assert out[1] == "extra" and torch.allclose(out[0], mem(x * 2, k))
    tb = TensorBlock()
    with attach_memory(tb, mem, k):
        assert torch.allclose(tb(x), mem(x * 2, k))

    class DictBlock(torch.nn.Module):
        def forward(self, x):
            return {"h": x}

    with pytest.raises(TypeError, match="tensor or a tuple"):
        with attach_memory(db := DictBlock(), mem, k):
            db(x)


def test_generate_passes_every_token_through_memory(arch):
    model = tiny_model(arch)
    mem = memory_for(model)
    with torch.no_grad():
        for p in mem.parameters():
            p.mul_(20)  # a strong memory, so the generations differ visibly
    ids = torch.randint(1, 100, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    plain = model.generate(ids, **kwargs)
    outs = []
    for doc in (0, 1):
        with attach_memory(blocks_of(model)[2], mem, mem.keys_for([doc])) as hook:
            outs.append(model.generate(ids, **kwargs))
        # one call for the prompt, one per further token (the last token needs no extra pass)
        assert hook.calls == 6
    assert not torch.equal(outs[0], plain) or not torch.equal(outs[1], plain)
    assert not torch.equal(outs[0], outs[1])
