"""Mixed precision under CUDA autocast's dtype rules, without a GPU: docmem.cuda_rules makes CPU
autocast run layer_norm, softmax, log_softmax and the losses in fp32 as CUDA does, and the
project's paths (fast path, reference loop, training, evaluation, generation) must still run
and agree, for tiny GPT-NeoX (LayerNorm) and Llama (RMSNorm) models in bf16 and fp16."""
from __future__ import annotations

import pytest
import torch
from test_engines import _Tok, make_batches

from conftest import tiny_model
from docmem.cuda_rules import imitate_cuda_autocast
from docmem.engines import NO_MEMORY, FastEngine, ReferenceEngine
from document_memories import DocumentMemory, MemoryConfig
from foundations import from_model

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fast path against reference loop in half precision: both round the LM's activations, in
# different places (the reference's head runs under autocast, the fast path's chunked CE not)
HALF_RTOL = 2e-2


@pytest.fixture(params=sorted(HALF))
def half(request) -> torch.dtype:
    return HALF[request.param]


def test_imitation_follows_cuda_and_is_restored():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    weight = torch.ones(8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (8,), weight).dtype == torch.bfloat16  # CPU's rule
    with imitate_cuda_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.nn.functional.layer_norm(x, (8,), weight).dtype == torch.float32
            assert torch.nn.LayerNorm(8).to(torch.bfloat16)(x).dtype == torch.float32
            assert x.softmax(-1).dtype == torch.float32 and torch.log_softmax(x, -1).dtype == torch.float32
            assert torch.nn.functional.softmax(x, -1).dtype == torch.float32
        # outside autocast the ops keep their dtype
        assert torch.nn.functional.layer_norm(x, (8,), weight).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert x.softmax(-1).dtype == torch.bfloat16  # restored


def _setup(arch: str, dtype: torch.dtype):
    model = tiny_model(arch, num_layers=4).to(dtype)
    foundation = from_model(model, _Tok())
    memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=3, memory_dim=8),
                            generator=torch.Generator().manual_seed(1))
    return foundation, memory


def test_fast_equals_reference_under_cuda_rules(arch, half):
    """The failing case before the fix: GPT-NeoX's final LayerNorm returns fp32 under CUDA
    autocast, and the fast path's head product met a half-precision weight."""
    foundation, memory = _setup(arch, half)
    batches = make_batches(True)
    with imitate_cuda_autocast():
        for layer in (1, 3):
            ref, fast = ReferenceEngine(foundation, memory, layer, half), FastEngine(foundation, memory, layer, half)
            for batch in batches:
                sets = [memory.keys_for(batch.doc_ids), memory.keys_for((batch.doc_ids + 1) % 3), None, NO_MEMORY]
                r = ref.losses(batch, sets)
                f = fast.losses(batch, sets)
                (fast.losses(batch, sets[:1])[0]).backward()  # the gradient reaches the memory
                for a, b in zip(r, f):
                    assert a.dtype == b.dtype == torch.float32
                    torch.testing.assert_close(b, a, rtol=HALF_RTOL, atol=0)
    grad = memory.up.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()
