"""--memory_init zero_output: a new memory leaves the LM unchanged (logits equal the plain LM's), training
still lowers the loss, and the choice is saved so a loaded memory rebuilds with it."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_model
from docmem.config import parse_args
from document_memories import DocumentMemory, MemoryConfig, load_memory
from fixtures_tiny import run_training, tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)
from hook_lm import attach_memory


def memory(hidden: int, init: str) -> DocumentMemory:
    return DocumentMemory(MemoryConfig(hidden_size=hidden, num_docs=3, memory_dim=8, init=init),
                          generator=torch.Generator().manual_seed(0))


def test_zero_output_leaves_the_lm_unchanged(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 100, (2, 7))
    block = (model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers)[1]
    with torch.no_grad():
        plain = model(ids).logits
        for init, same in (("zero_output", True), ("released", False)):
            mem = memory(model.config.hidden_size, init)
            with attach_memory(block, mem, mem.keys_for([0, 2])):
                hooked = model(ids).logits
            assert torch.equal(plain, hooked) is same, init


def test_zero_output_keeps_the_other_weights_of_the_released_init():
    released, zero = memory(16, "released").state_dict(), memory(16, "zero_output").state_dict()
    for name in released:
        if name.startswith("out."):
            assert not zero[name].any()
            assert name == "out.bias" or released[name].abs().sum() > 0  # (biases start at zero anyway)
        else:
            assert torch.equal(released[name], zero[name]), name


def test_bad_memory_init_is_refused():
    with pytest.raises(ValueError, match="init"):
        MemoryConfig(hidden_size=8, num_docs=1, init="ones")


def test_training_from_zero_output_lowers_the_loss_and_saves_the_choice(tiny_lm_dir, tmp_path):  # noqa: F811
    save_dir = tmp_path / "runs"
    done = run_training(tiny_argv(tiny_lm_dir, save_dir, "--memory_init", "zero_output", "--precision", "fp32",
                                  num_epochs=4, save_freq=4))
    assert done.returncode == 0, done.stderr[-3000:]
    run = save_dir / "run_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_ce_positive"] < summary["initial_ce_positive"]
    assert yaml.safe_load((run / "config.yaml").read_text())["memory_init"] == "zero_output"
    assert json.loads((run / "memory" / "memory_config.json").read_text())["init"] == "zero_output"
    loaded = load_memory(run / "memory")
    assert loaded.config.init == "zero_output" and loaded.out.weight.abs().sum() > 0  # trained away from zero


def test_memory_init_flag_default_and_choices():
    assert parse_args(["--dataset", "synthetic"]).memory_init == "released"


def test_bad_memory_init_flag_exits_2(capsys):
    import train_guidance

    with pytest.raises(SystemExit) as stop:
        train_guidance.main(["--dataset", "synthetic", "--memory_init", "ones"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--memory_init" in err[0] and "zero_output" in err[0]
