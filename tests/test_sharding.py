"""Sharded memories (--memory_shards) and exact forgetting by retraining one shard (SISA): isolation,
stable assignment and keys, bitwise equality with a fresh run without the document, and bad input."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import attribute as attribute_cli
import evaluate_memory as em
import forget as forget_cli
import generate as generate_cli
import train_guidance
from docmem import run_folder
from docmem.config import TrainConfig, build_parser, flags_markdown, parse_args
from docmem.errors import ConfigError
from docmem.forgetting.edits import forget
from docmem.run_folder import load_documents, new_memory
from docmem.sharding import ShardedMemory, load_any_memory, shard_assignment
from docmem.trained_memory import load_memory_run
from docmem.training.shard_runs import shard_config
from document_memories import DocumentMemory, MemoryConfig
from fixtures_memory import exit_code, tiny_lm_dir, tiny_run  # noqa: F401
from fixtures_tiny import load_tensors, run_training, tiny_argv


def test_assignment_is_by_draw_position_in_contiguous_blocks():
    assert shard_assignment(5, 2) == [0, 0, 0, 1, 1]
    assert shard_assignment(5, 5) == [0, 1, 2, 3, 4]
    assert shard_assignment(4, 1) == [0, 0, 0, 0]


def _memory(num_docs: int, seed: int) -> DocumentMemory:
    return DocumentMemory(MemoryConfig(hidden_size=8, num_docs=num_docs, memory_dim=6),
                          generator=torch.Generator().manual_seed(seed)).eval()


def test_sharded_memory_routes_each_key_to_its_shard_and_drops_an_emptied_shard(tmp_path):
    a, b = _memory(2, 0), _memory(1, 1)
    sharded = ShardedMemory([a, b], [0, 1], doc_shard=[0, 0, 1], doc_row=[0, 1, 0]).eval()
    x = torch.randn(3, 4, 8)
    keys = sharded.doc_keys
    assert torch.equal(keys, torch.cat([a.doc_keys, b.doc_keys]))
    y = sharded(x, keys)
    # (allclose: a matmul over fewer rows may round differently)
    assert torch.allclose(y[:2], a(x[:2], a.doc_keys), atol=1e-6) and torch.allclose(y[2:], b(x[2:], b.doc_keys), atol=1e-6)
    sharded.save(tmp_path / "m", provenance={"documents": []})
    loaded = load_any_memory(tmp_path / "m", expect_num_docs=3)
    assert isinstance(loaded, ShardedMemory) and torch.allclose(loaded(x, keys), y, atol=1e-6)
    dropped = forget(sharded, 2, "drop_key")  # the last document of shard 1: the shard goes, weights and all
    assert len(dropped.shards) == 1 and dropped.config.num_docs == 2 and dropped.shard_ids == [0]
    assert torch.allclose(dropped(x[:2], keys[:2]), y[:2], atol=1e-6)
    one = forget(sharded, 0, "drop_key")
    assert one.doc_row == [0, 0] and torch.equal(one.doc_keys, keys[1:])


@pytest.mark.parametrize("num_keys", [0, 2, 4])
def test_a_key_count_that_does_not_divide_the_batch_is_refused_by_both_memories(num_keys):
    a, b = _memory(2, 0), _memory(1, 1)
    sharded = ShardedMemory([a, b], [0, 1], doc_shard=[0, 0, 1], doc_row=[0, 1, 0]).eval()
    x = torch.randn(3, 4, 8)
    keys = sharded.doc_keys[[0, 1, 2, 0][:num_keys]]
    for memory in (a, sharded):
        with pytest.raises(ValueError, match=f"{num_keys} keys for a batch of 3 rows"):
            memory(x, keys)


def test_one_key_per_prompt_serves_each_of_its_sequences():
    a = _memory(2, 0)
    x = torch.randn(4, 3, 8)
    expanded = a(x, a.doc_keys)  # two keys for four rows: rows 0, 1 read key 0; rows 2, 3 key 1
    assert torch.allclose(expanded, a(x, a.doc_keys[[0, 0, 1, 1]]), atol=1e-6)
    assert torch.allclose(a(x, a.doc_keys[1]), a(x, a.doc_keys[[1, 1, 1, 1]]), atol=1e-6)


def test_a_subset_run_keeps_every_documents_key_and_weights(tiny_lm_dir, tmp_path, monkeypatch):  # noqa: F811
    full = parse_args(tiny_argv(tiny_lm_dir, tmp_path, "--max_labels", "4"))
    without = parse_args(tiny_argv(tiny_lm_dir, tmp_path, "--max_labels", "4", "--exclude_docs", "1"))
    docs, kept = load_documents(full), load_documents(without)
    assert [d.index for d in kept] == [0, 2, 3] and [d.title for d in kept] == [docs[i].title for i in (0, 2, 3)]

    class Found:  # what new_memory reads of the LM
        hidden_size, num_blocks = 16, 4

    monkeypatch.setattr(run_folder.foundations, "block_device", lambda foundation, layer: "cpu")
    memory_full = new_memory(full, Found, docs)
    memory_without = new_memory(without, Found, kept)
    assert torch.equal(memory_without.doc_keys, memory_full.doc_keys[[0, 2, 3]])
    assert torch.equal(memory_without.gate.weight, memory_full.gate.weight)


def _train(lm: Path, save_dir: Path, *extra: str) -> Path:
    done = run_training(tiny_argv(lm, save_dir, "--max_labels", "3", *extra, num_epochs=2, save_freq=2))
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted(save_dir.glob("run_*"))[-1]


def _same_memory(a: Path, b: Path) -> None:
    folders = sorted(p.name for p in (a / "memory").iterdir() if p.is_dir())
    assert folders == sorted(p.name for p in (b / "memory").iterdir() if p.is_dir())
    for folder in folders:
        wa = load_tensors(a / "memory" / folder / "memory.safetensors")
        wb = load_tensors(b / "memory" / folder / "memory.safetensors")
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (folder, name)


@pytest.mark.parametrize("shards", [2, 3])
def test_retrain_shard_equals_a_fresh_run_without_the_document(tiny_lm_dir, tmp_path, shards, capsys):  # noqa: F811
    run = _train(tiny_lm_dir, tmp_path / "runs", "--memory_shards", str(shards))
    assert isinstance(load_any_memory(run / "memory"), ShardedMemory)
    out = tmp_path / "forgotten"
    assert forget_cli.main(["--run_dir", str(run), "--doc", "0", "--method", "retrain_shard", "--out", str(out),
                            "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    if shards == 2:  # the retrained shard's own time, not the copied shards' too
        assert report["retrained_seconds"] == summary["shards"]["0"]["wall_seconds"] < summary["wall_seconds"]
    fresh = _train(tiny_lm_dir, tmp_path / "fresh", "--memory_shards", str(shards), "--exclude_docs", "0")
    _same_memory(out, fresh)
    if shards == 3:  # one document per shard: its shard is dropped, nothing is retrained
        assert not (out / "shards" / "shard_0").exists() and not (out / "memory" / "shard_0").exists()
    # the same document again, by title: already forgotten
    title = yaml.safe_load((run / "config.yaml").read_text())["documents"][0]["title"]
    assert exit_code(forget_cli.main, ["--run_dir", str(out), "--doc", title, "--method", "drop_key"]) == 2


def test_bad_shard_input_exits_2(tiny_lm_dir, tmp_path, capsys):  # noqa: F811
    for extra in (["--memory_shards", "0"], ["--memory_shards", "4"], ["--exclude_docs", "x"],
                  ["--exclude_docs", "0,1,2"]):
        assert exit_code(train_guidance.main, tiny_argv(tiny_lm_dir, tmp_path, "--max_labels", "3", *extra)) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert TrainConfig(max_labels=3, memory_shards=2, shard_index=1).train_seed != TrainConfig(max_labels=3).train_seed


def test_shard_index_is_set_by_the_sharded_run_not_by_a_flag(tmp_path):
    assert "shard_index" not in flags_markdown() and "--shard_index" not in build_parser().format_help()
    with pytest.raises(SystemExit):
        parse_args(["--shard_index", "1"])
    sub = shard_config(TrainConfig(max_labels=3, memory_shards=2), tmp_path, 1, num_docs=1)
    assert sub.shard_index == 1 and sub.validate() is sub
    with pytest.raises(ConfigError, match="--shard_index 2: allowed: -1..1"):
        replace(sub, shard_index=2).validate()


def test_retrain_shard_needs_a_sharded_run(tiny_run, tmp_path):  # noqa: F811
    assert exit_code(forget_cli.main, ["--run_dir", str(tiny_run), "--doc", "0", "--method", "retrain_shard",
                                       "--out", str(tmp_path / "x")]) == 2


def test_evaluation_generation_attribution_and_resume_on_a_sharded_run(tiny_lm_dir, tmp_path):  # noqa: F811
    run = _train(tiny_lm_dir, tmp_path / "runs", "--memory_shards", "2")
    before = {p: p.read_bytes() for p in (run / "memory").rglob("*.safetensors")}
    assert exit_code(train_guidance.main, ["--resume", str(run)]) == 0  # every shard finished: nothing moves
    assert before == {p: p.read_bytes() for p in (run / "memory").rglob("*.safetensors")}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert [d["shard"] for d in saved["documents"]] == [0, 0, 1] and saved["resolved"]["shard_assignment"] == [0, 0, 1]
    assert em.main(["--run_dir", str(run), "--grid", "3", "--new_tokens", "8", "--prompt_tokens", "8"]) == 0
    assert generate_cli.main(["--run_dir", str(run), "--doc", "2", "--max_new_tokens", "4", "--device", "cpu"]) == 0
    assert attribute_cli.main(["--run_dir", str(run), "--text", "a few words", "--device", "cpu"]) == 0
    tm = load_memory_run(run, device="cpu")
    assert isinstance(tm.memory, ShardedMemory) and len(tm.titles) == 3
