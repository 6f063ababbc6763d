"""The LoRA baselines (--document_memory lora / lora_shared): trained by train_guidance.py on the same
batches into the same run folder layout, rank matched to the keyed memory's parameters, one adapter file per
document, and forgetting by deleting a file is exact (the adapter never depended on other documents)."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from docmem.baselines.lora_memory import LORA_CONFIG_NAME, keyed_parameter_count, load_adapters, remove_document
from docmem.config import parse_args
from docmem.run_folder import load_documents
from fixtures_tiny import run_training, tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)
from foundations.placement import open_foundation

_RUNS: dict[str, object] = {}


def train(lm_dir, save_dir, *extra: str):
    done = run_training(tiny_argv(lm_dir, save_dir, "--precision", "fp32", "--lr", "3e-2", *extra,
                                  num_epochs=4, save_freq=4))
    assert done.returncode == 0, done.stderr[-3000:]
    return save_dir / "run_0"


@pytest.fixture(scope="module")
def lora_run(tiny_lm_dir, tmp_path_factory):  # noqa: F811
    if "lora" not in _RUNS:
        _RUNS["lora"] = train(tiny_lm_dir, tmp_path_factory.mktemp("lora") / "runs", "--document_memory", "lora")
    return _RUNS["lora"]


def test_lora_run_folder_and_parameter_counts(lora_run):
    config = yaml.safe_load((lora_run / "config.yaml").read_text())
    lora = config["resolved"]["lora"]
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["final_ce_positive"] < summary["initial_ce_positive"]
    assert len((lora_run / "metrics.jsonl").read_text().splitlines()) == 4
    # auto rank: no other rank comes closer to the keyed memory's parameter count
    per_rank = lora["parameters_per_adapter"] // lora["rank"] * len(lora["adapters"])
    keyed = lora["keyed_parameters"]
    assert summary["keyed_memory_parameters"] == keyed and summary["trainable_parameters"] == lora["parameters"]
    assert all(abs(lora["rank"] * per_rank - keyed) <= abs(r * per_rank - keyed) for r in range(1, 33))
    files = sorted(p.name for p in (lora_run / "memory" / "adapters").iterdir())
    assert files == ["doc_00.safetensors", "doc_01.safetensors", "doc_02.safetensors"]
    tensors = load_file(str(lora_run / "memory" / "adapters" / "doc_01.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == lora["parameters_per_adapter"]
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())  # trained away from B = 0


def test_keyed_parameter_count_matches_a_built_memory(tiny_lm_dir, tmp_path):  # noqa: F811
    config = parse_args(tiny_argv(tiny_lm_dir, tmp_path))
    from docmem.run_folder import new_memory

    foundation = open_foundation(config, "cpu", torch.float32)
    documents = load_documents(config)
    built = sum(p.numel() for p in new_memory(config, foundation, documents).trainable_parameters())
    assert keyed_parameter_count(config, foundation.hidden_size, len(documents)) == built


def test_forgetting_by_deleting_the_adapter_is_exact(lora_run, tiny_lm_dir, tmp_path):  # noqa: F811
    # the same document trained alone (the others excluded) gives its adapter bit for bit
    rank = yaml.safe_load((lora_run / "config.yaml").read_text())["resolved"]["lora"]["rank"]
    alone = train(tiny_lm_dir, tmp_path / "alone", "--document_memory", "lora", "--exclude_docs", "0,2",
                  "--lora_rank", str(rank))
    full = load_file(str(lora_run / "memory" / "adapters" / "doc_01.safetensors"))
    single = load_file(str(alone / "memory" / "adapters" / "doc_00.safetensors"))
    assert full.keys() == single.keys()
    for name in full:
        assert torch.equal(full[name], single[name]), name
    # deleting its file leaves the other adapters, which still load
    memory = tmp_path / "memory"
    import shutil

    shutil.copytree(lora_run / "memory", memory)
    removed = remove_document(memory, 1)
    assert not removed.exists()
    config = parse_args(tiny_argv(tiny_lm_dir, tmp_path))
    adapters = load_adapters(open_foundation(config, "cpu", torch.float32), memory)
    assert adapters.plan.adapters == ("doc_00", "doc_02")


def test_shared_lora_has_one_adapter(tiny_lm_dir, tmp_path):  # noqa: F811
    run = train(tiny_lm_dir, tmp_path / "shared", "--document_memory", "lora_shared", "--docs_per_step", "3")
    data = json.loads((run / "memory" / LORA_CONFIG_NAME).read_text())
    assert data["adapters"] == ["shared"] and len(data["adapter_files"]) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_ce_positive"] < summary["initial_ce_positive"]


def test_engine_and_mixed_generation_match_the_adapted_lm(lora_run, tiny_lm_dir, tmp_path):  # noqa: F811
    from docmem.baselines.lora_memory import LoraEngine
    from docmem.batching import make_batches
    from docmem.engines import NO_MEMORY

    config = parse_args(tiny_argv(tiny_lm_dir, tmp_path))
    foundation = open_foundation(config, "cpu", torch.float32)
    adapters = load_adapters(foundation, lora_run / "memory")
    batch = make_batches(load_documents(config), foundation.tokenizer, 16, 64)[1]
    engine = LoraEngine(adapters, torch.float32)
    own, plain = engine.losses(batch, ["doc_01", NO_MEMORY])
    labels = batch.labels[:, 1:]

    def full_ce() -> torch.Tensor:
        logits = adapters.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])

    with torch.no_grad():
        adapters.model.set_adapter("doc_01")
        assert torch.allclose(own, full_ce(), atol=1e-5)
        with adapters.model.disable_adapter():
            assert torch.allclose(plain, full_ce(), atol=1e-5)
        assert not torch.allclose(own, plain)
        # one mixed batch (peft's adapter_names) gives each row what its adapter alone gives
        ids = batch.input_ids[:2, -12:]
        kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        mixed = adapters.model.generate(input_ids=ids, adapter_names=["doc_00", "__base__"], **kw)
        adapters.model.set_adapter("doc_00")
        first = adapters.model.generate(input_ids=ids[:1], **{**kw, "attention_mask": kw["attention_mask"][:1]})
        with adapters.model.disable_adapter():
            second = adapters.model.generate(input_ids=ids[1:], **{**kw, "attention_mask": kw["attention_mask"][1:]})
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[1], second[0])


@pytest.mark.parametrize("extra, flag", [
    (["--document_memory", "rag"], "--document_memory"),
    (["--document_memory", "lora", "--lora_rank", "-1"], "--lora_rank"),
    (["--document_memory", "lora", "--lora_rank", "33"], "--lora_rank"),  # the tiny MLP: 32 -> 64 -> 32
    (["--document_memory", "lora", "--lora_targets", "mlp.gate_proj"], "--lora_targets"),
    (["--document_memory", "lora", "--lora_targets", "embed_in"], "--lora_targets"),
    (["--document_memory", "lora", "--resume", "nowhere"], "--resume"),
])
def test_bad_lora_input_exits_2_in_one_line(extra, flag, tiny_lm_dir, tmp_path, capsys):  # noqa: F811
    import train_guidance

    with pytest.raises(SystemExit) as stop:
        train_guidance.main(tiny_argv(tiny_lm_dir, tmp_path, *extra))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (a model's loading bar may come first)
    assert last.startswith("train_guidance.py: error: ") and flag in last and "Traceback" not in err
    assert not list(tmp_path.glob("run_*"))  # refused before a run folder was made


@pytest.mark.parametrize("script", ["generate", "attribute", "forget"])
def test_the_memory_scripts_refuse_a_lora_run_in_one_line(script, lora_run, capsys):
    """generate.py, attribute.py and forget.py take keyed and shared memories: a LoRA run is named as such
    (it used to read as a run that had not finished)."""
    argv = {"generate": ["--doc", "0"], "attribute": ["--text", "some words here"],
            "forget": ["--doc", "0", "--method", "drop_key", "--out", str(lora_run.parent / "forgotten")]}[script]
    for target in (lora_run, lora_run / "memory"):
        code = importlib.import_module(script).main(["--run_dir", str(target), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1, err
        assert err[0].startswith(f"{script}.py: error: ") and "LoRA baseline run" in err[0] and "evaluate_memory.py" in err[0]
