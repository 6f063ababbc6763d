"""Flags and an end-to-end training run on a tiny model; SmolLM2 memorises a document."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT
from docmem.config import ConfigError, TrainConfig, build_parser, flag_fields, parse_args
from fixtures_tiny import tiny_lm_dir  # noqa: F401


def test_defaults_are_the_released_run_sh():
    c = parse_args([])
    assert (c.lm_name, c.lm_size, c.max_labels, c.max_segments, c.segment_length, c.max_length) == \
        ("pythia", "1b", 10, 10, 128, 256)
    assert (c.key_dim, c.key_activation, c.hook_memory_dim, c.hook_memory_layer, c.lm_act) == (2, "tanh", 32, 15, "gelu")
    assert (c.negative_key_type, c.document_key_module_type, c.target_negative_ce, c.guidance) == \
        ("other", "linear", 4.5, 0.1)
    assert (c.batch_size, c.lr, c.num_accumulation_steps, c.grad_clip_coeff, c.num_epochs, c.save_freq, c.seed) == \
        (16, 1e-3, 1, 5.0, 500, 10, 1)
    assert c.guidance_loss == "clamped_mse" and not c.learn_doc_keys and not c.reference_loop


def test_both_spellings_and_none_values():
    assert parse_args(["--max_segements", "4"]).max_segments == 4
    assert parse_args(["--max_segments", "5"]).max_segments == 5
    c = parse_args(["--lm_cache_dir", "none", "--data_cache_dir", "/x", "--learn_doc_keys"])
    assert c.lm_cache_dir is None and c.data_cache_dir == "/x" and c.learn_doc_keys


@pytest.mark.parametrize("argv, flag", [
    (["--lm_size", "3b"], "lm_size"),
    (["--lm_name", "gpt5"], "lm_name"),
    (["--key_activation", "wiggle"], "key_activation"),
    (["--negative_key_type", "opposite"], "negative_key_type"),
    (["--lr", "0"], "lr"),
    (["--guidance", "-1"], "guidance"),
    (["--max_labels", "1"], "max_labels"),
    (["--key_internal_layers", "0"], "key_internal_layers"),
    (["--dataset", "wikitext-7"], "dataset"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert err.value.flag == flag and f"--{flag}" in str(err.value)


def test_help_lists_every_flag_with_default():
    text = build_parser().format_help()
    flags = [f.name for f in flag_fields()]
    assert flags and set(flags) < set(TrainConfig.__dataclass_fields__)  # a field or two (shard_index) are not flags
    for name in flags:
        assert f"--{name}" in text
    assert "--max_segements" in text and "(default: 0.1)" in text


def test_end_to_end_tiny_run(tiny_lm_dir, tmp_path):
    """A short real run through the command line: every output of a run exists and opens."""
    cmd = [sys.executable, str(ROOT / "train_guidance.py"), "--lm_path", str(tiny_lm_dir), "--num_gpus", "0",
           "--dataset", "synthetic", "--max_labels", "3", "--max_segments", "2", "--segment_length", "24",
           "--max_length", "48", "--hook_memory_layer", "1", "--num_epochs", "4", "--save_freq", "2",
           "--lr", "1e-2", "--save_dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1",
                          "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "out" / "run_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["max_labels"] == 3 and len(config["documents"]) == 3
    assert all(doc["title"] for doc in config["documents"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"loss", "ce_positive", "ce_negative", "guidance_term"} <= set(lines[0])
    summary = json.loads((run / "summary.json").read_text())
    for key in ("initial_ce_positive", "final_ce_positive", "final_ce_negative", "wall_seconds"):
        assert isinstance(summary[key], float)
    assert summary["final_ce_positive"] < summary["initial_ce_positive"]
    # the frozen prefix is run once before the first CE, timed apart from the steps and the rest
    assert 0 < summary["prefix_seconds"] < summary["wall_seconds"] - summary["train_seconds"]
    for epoch in ("epoch_0002", "epoch_0004"):
        folder = run / "summaries" / epoch
        for name in ("losses.png", "selection.png", "logit_lens.png"):
            with Image.open(folder / name) as im:
                assert im.format == "PNG"
        lens = json.loads((folder / "logit_lens.json").read_text())
        assert len(lens["documents"]) == 3 and len(lens["documents"][0]["top_tokens"]) == 20
    for name in ("losses.gif", "docreps.gif", "logits.gif"):
        with Image.open(run / name) as im:
            assert im.format == "GIF" and im.n_frames == 2
    from document_memories import load_memory

    memory = load_memory(run / "memory", expect_hidden_size=32, expect_num_docs=3)
    assert not memory.doc_keys.requires_grad


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from foundations import load_foundation

    return load_foundation("smollm2", "135m", num_gpus=0)


def test_smollm2_memory_learns_one_document(smollm2):
    """The real pretrained LM: a memory trained on one fictional document lowers its loss."""
    import wikitext
    from docmem.batching import Batch
    from docmem.engines import FastEngine
    from document_memories import DocumentMemory, MemoryConfig

    article = wikitext.load_articles("synthetic", num_synthetic=1, seed=3)[0]
    segments = wikitext.segment_article(article, 40, 2)
    tokens = wikitext.tokenize_segments(smollm2.tokenizer, segments, 64)
    batch = Batch(0, torch.zeros(len(segments), dtype=torch.long), tokens["input_ids"], tokens["attention_mask"],
                  tokens["labels"])
    memory = DocumentMemory(MemoryConfig(hidden_size=576, num_docs=1, memory_dim=16),
                            generator=torch.Generator().manual_seed(0))
    engine = FastEngine(smollm2, memory, 27, torch.float32)
    opt = torch.optim.AdamW(memory.trainable_parameters(), lr=3e-3)
    keys = memory.keys_for(batch.doc_ids)
    losses = []
    for _ in range(12):
        (ce,) = engine.losses(batch, [keys])
        opt.zero_grad()
        ce.backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < 0.7 * losses[0], losses
