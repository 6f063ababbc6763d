"""Shared fixtures: tiny random GPT-NeoX / Llama models and the paths of ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository (pyproject.toml puts it on sys.path)
# DOCMEM_SHARED_DATA: the same data elsewhere (gpu_check.py points it at its kit on a GPU machine)
SHARED_DATA = Path(os.environ.get("DOCMEM_SHARED_DATA") or ROOT.parent / "shared" / "data")
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data is absent (only present in the project's workspace)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config) -> None:
    # registered here rather than in a pytest.ini: `pytest -m cuda` selects the GPU tests (gpu_check.py stage a); pyproject's addopts leaves them out otherwise
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run them with -m cuda")


def tiny_config(arch: str, vocab_size: int = 128, num_layers: int = 3, hidden: int = 32):
    """A config for a tiny randomly initialised causal LM of the given architecture."""
    from transformers import GPTNeoXConfig, LlamaConfig

    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=512,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
            max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    raise ValueError(f"unknown arch {arch!r}")


def tiny_model(arch: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    model.eval()
    return model


@pytest.fixture(params=["gpt_neox", "llama"])
def arch(request) -> str:
    return request.param

