"""Safe loading (no pickle; corrupt, tampered and mismatched files give one clear error),
non-finite losses, determinism across processes, and concurrent runs into one --save_dir."""
from __future__ import annotations

import json
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import foundations
import train_guidance
from conftest import ROOT
from docmem.config import parse_args
from docmem.run_folder import new_run_dir
from docmem.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from document_memories import DocumentMemory, MemoryConfig, MemoryFileError, load_memory
from fixtures_tiny import load_tensors, reference_runs, tiny_argv, tiny_lm_dir  # noqa: F401  (fixtures)


def training_objects(hidden_size=16, num_docs=3, seed=0):
    memory = DocumentMemory(MemoryConfig(hidden_size=hidden_size, num_docs=num_docs, memory_dim=8),
                            generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(memory.trainable_parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(seed)
    return memory, optimizer, scheduler, generator


def state(epoch=1):
    return {"epoch": epoch, "batch": 0, "step": 2 * epoch, "sums": {"loss": 0.0}, "wall_seconds": 1.5,
            "history": [{"epoch": e + 1, "loss": 1.0} for e in range(epoch)], "initial": {"ce_positive": 5.0}}


@pytest.fixture
def checkpoint_file(tmp_path) -> Path:
    memory, optimizer, scheduler, generator = training_objects()
    x = torch.randn(2, 3, 16)
    memory(x, memory.keys_for([0, 1])).sum().backward()
    optimizer.step()
    scheduler.step()
    return save_checkpoint(tmp_path, memory, optimizer, scheduler, generator, state())


def resign(path: Path, tensors: dict, meta: dict) -> None:
    """Write a well-formed checkpoint with these contents (a valid checksum), as a buggy or
    foreign writer might."""
    from docmem.training.checkpoint import _META_KEY, _SHA_KEY, _digest

    meta_json = json.dumps(meta)
    save_file(tensors, str(path), metadata={_META_KEY: meta_json, _SHA_KEY: _digest(tensors, meta_json)})


# ---- checkpoints -----------------------------------------------------------------------------

def test_checkpoint_round_trip_restores_everything(checkpoint_file):
    import random

    import numpy as np

    memory, optimizer, scheduler, generator = training_objects(seed=1)  # different weights and RNG
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    restored = restore_checkpoint(read_checkpoint(checkpoint_file), memory, optimizer, scheduler, generator, 4)
    assert restored == state()
    saved = load_file(str(checkpoint_file))
    for name, t in memory.state_dict().items():
        assert torch.equal(t, saved[f"memory.{name}"])
    assert scheduler.last_epoch == 1 and len(optimizer.state) == len(memory.trainable_parameters())
    assert torch.equal(generator.get_state(), saved["rng.generator"])
    assert torch.equal(torch.get_rng_state(), saved["rng.torch"])


def test_truncated_checkpoint(checkpoint_file):
    data = checkpoint_file.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        checkpoint_file.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=re.escape(str(checkpoint_file)) + ".*truncated or corrupt"):
            read_checkpoint(checkpoint_file)


def test_a_flipped_byte_is_caught(checkpoint_file):
    data = bytearray(checkpoint_file.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data: the file still parses
    checkpoint_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(checkpoint_file)


def test_edited_metadata_is_caught(checkpoint_file):
    data = checkpoint_file.read_bytes()
    edited = data.replace(b'\\"epoch\\": 1', b'\\"epoch\\": 7')  # the metadata JSON inside the header
    assert edited != data
    checkpoint_file.write_bytes(edited)
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(checkpoint_file)


def test_missing_tensors_and_entries(checkpoint_file):
    tensors = load_file(str(checkpoint_file))
    from safetensors import safe_open

    with safe_open(str(checkpoint_file), "pt") as f:
        meta = json.loads(f.metadata()["docmem"])
    for name, match in (("rng.generator", "tensor rng.generator is missing"),
                        ("memory.up.weight", r"memory tensors missing \['up.weight'\]")):
        resign(checkpoint_file, {k: v for k, v in tensors.items() if k != name}, meta)
        with pytest.raises(CheckpointError, match=match):
            restore_checkpoint(read_checkpoint(checkpoint_file), *training_objects(), 4)
    resign(checkpoint_file, tensors, {k: v for k, v in meta.items() if k != "scheduler"})
    with pytest.raises(CheckpointError, match="'scheduler' is missing"):
        read_checkpoint(checkpoint_file)
    resign(checkpoint_file, tensors, {**meta, "state": state(epoch=2) | {"history": []}})
    with pytest.raises(CheckpointError, match="metrics of 0 epochs for a checkpoint at epoch 2"):
        read_checkpoint(checkpoint_file)


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 32}, "hidden_size 16 does not match the LM's hidden size 32"),
    ({"num_docs": 4}, "num_docs 3 does not match the run's number of documents 4"),
])
def test_mismatched_checkpoint(checkpoint_file, kwargs, match):
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint_file)) + ": " + match):
        restore_checkpoint(read_checkpoint(checkpoint_file), *training_objects(**kwargs), 4)


def test_a_memory_file_or_missing_file_is_not_a_checkpoint(tmp_path):
    memory, *_ = training_objects()
    memory.save(tmp_path)
    with pytest.raises(CheckpointError, match="not a docmem checkpoint"):
        read_checkpoint(tmp_path / "memory.safetensors")
    with pytest.raises(CheckpointError, match="file not found"):
        read_checkpoint(tmp_path / "nothing.safetensors")


class _Boom:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    for path in (tmp_path / CHECKPOINT_NAME, tmp_path / "memory.safetensors"):
        path.write_bytes(pickle.dumps({"weights": _Boom(str(marker))}))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        read_checkpoint(tmp_path / CHECKPOINT_NAME)
    (tmp_path / "memory_config.json").write_text(json.dumps(MemoryConfig(hidden_size=16, num_docs=3).to_dict()))
    with pytest.raises(MemoryFileError, match="unreadable safetensors"):
        load_memory(tmp_path)
    assert not marker.exists()


def test_no_pickle_loading_in_the_source():
    """Model files only load through safetensors or torch.load(weights_only=True)."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        # the project's own code: not tests, caches, or hidden folders such as a virtual environment
        if any(part.startswith(".") or part in ("tests", "__pycache__") for part in path.relative_to(ROOT).parts):
            continue
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M):
            offenders.append(f"{path.name}: imports a pickle module")
    assert not offenders, offenders


# ---- memory files ----------------------------------------------------------------------------

@pytest.fixture
def memory_dir(tmp_path) -> Path:
    memory, *_ = training_objects()
    return memory.save(tmp_path / "memory")


def test_memory_file_errors_name_the_file_and_the_mismatch(memory_dir):
    weights = memory_dir / "memory.safetensors"
    with pytest.raises(MemoryFileError, match="hidden_size 16 does not match the LM's 32"):
        load_memory(memory_dir, expect_hidden_size=32)
    with pytest.raises(MemoryFileError, match="num_docs 3 does not match 5 documents"):
        load_memory(memory_dir, expect_num_docs=5)
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "out.bias"}, str(weights))
    with pytest.raises(MemoryFileError, match=re.escape(str(weights)) + r": missing tensors \['out.bias'\]"):
        load_memory(memory_dir)
    save_file({**tensors, "up.weight": torch.zeros(8, 17)}, str(weights))
    with pytest.raises(MemoryFileError, match="tensor up.weight has shape"):
        load_memory(memory_dir)
    save_file(tensors, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryFileError, match=re.escape(str(weights)) + ": unreadable safetensors"):
        load_memory(memory_dir)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")  # a tampered header
    with pytest.raises(MemoryFileError, match="unreadable safetensors"):
        load_memory(memory_dir)


# ---- the command line with bad files: exit 2, one line ---------------------------------------

@pytest.fixture
def model_never_loads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad checkpoint was found")

    monkeypatch.setattr(foundations, "load_foundation", forbidden)


def test_resume_with_a_corrupt_checkpoint_fails_before_loading(tmp_path, capsys, model_never_loads):
    run_dir = tmp_path / "out" / "run_0"
    run_dir.mkdir(parents=True)
    parse_args(["--dataset", "synthetic", "--max_labels", "3", "--save_dir", str(tmp_path / "out")]).save_yaml(
        run_dir / "config.yaml")
    (run_dir / CHECKPOINT_NAME).write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit) as exit_info:
        train_guidance.main(["--resume", str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(run_dir / CHECKPOINT_NAME) in err and "Traceback" not in err


def test_resume_with_a_checkpoint_of_another_model(reference_runs, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run_0"
    shutil.copytree(reference_runs[0], run_dir)
    memory, optimizer, scheduler, generator = training_objects(hidden_size=16, num_docs=3)
    save_checkpoint(run_dir, memory, optimizer, scheduler, generator, state(epoch=2))
    with pytest.raises(SystemExit) as exit_info:
        train_guidance.main(["--resume", str(run_dir), "--num_epochs", "8"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train_guidance.py: error: ") and str(run_dir / CHECKPOINT_NAME) in last
    assert "hidden_size 16 does not match the LM's hidden size 32" in last


# ---- non-finite losses -----------------------------------------------------------------------

def stops_non_finite(argv, capsys, debug_output: bool = False) -> str:
    """Exit 3 with a last stderr line that says why (anomaly mode prints its own trace before it)."""
    with pytest.raises(SystemExit) as exit_info:
        train_guidance.main(argv)
    assert exit_info.value.code == train_guidance.EXIT_NON_FINITE == 3
    err = capsys.readouterr().err
    assert debug_output or "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train_guidance.py: error: non-finite")
    return last


def test_an_absurd_learning_rate_stops_with_the_epoch_and_step(tiny_lm_dir, tmp_path, capsys):
    line = stops_non_finite(tiny_argv(tiny_lm_dir, tmp_path / "runs", "--lr", "1e30"), capsys)
    run_dir = tmp_path / "runs" / "run_0"
    assert re.search(r"non-finite .* at epoch 1, step \d+ \(batch \d of 3\)", line), line
    assert f"kept the last good checkpoint {run_dir / CHECKPOINT_NAME} (epoch 0, step 0)" in line
    ckpt = read_checkpoint(run_dir / CHECKPOINT_NAME)  # the good one, untouched
    assert ckpt.state["epoch"] == 0 and all(torch.isfinite(t).all() for t in ckpt.tensors.values()
                                            if t.is_floating_point())
    assert (run_dir / "metrics.jsonl").read_text() == ""
    assert not (run_dir / "summary.json").exists() and not (run_dir / "memory").exists()


def test_nan_later_keeps_the_last_checkpoint_which_resumes(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    real, calls = train_guidance.train_step_losses, []

    def nan_in_epoch_3(*args, **kwargs):
        calls.append(1)
        loss, parts = real(*args, **kwargs)
        if len(calls) == 8:  # epoch 3, batch 2
            parts.ce_positive = float("nan")
        return loss, parts

    monkeypatch.setattr(train_guidance, "train_step_losses", nan_in_epoch_3)
    line = stops_non_finite(tiny_argv(tiny_lm_dir, tmp_path / "runs", num_epochs=4), capsys)
    assert "ce_positive = nan" in line and "at epoch 3, step 8 (batch 2 of 3)" in line and "(epoch 2, step 6)" in line
    run_dir = tmp_path / "runs" / "run_0"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # epoch 3 never ended
    monkeypatch.undo()
    assert train_guidance.main(["--resume", str(run_dir)]) == 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:Error detected in")  # anomaly mode's trace of the forward
@pytest.mark.parametrize("anomaly", [False, True])
def test_a_nan_gradient_is_refused(anomaly, tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """sqrt at 0 has an infinite derivative: the loss is finite, its gradient NaN."""
    real = train_guidance.train_step_losses

    def nan_gradient(engine, memory, *args, **kwargs):
        loss, parts = real(engine, memory, *args, **kwargs)
        return loss + torch.sqrt((memory.up.bias * 0).sum()), parts

    monkeypatch.setattr(train_guidance, "train_step_losses", nan_gradient)
    argv = tiny_argv(tiny_lm_dir, tmp_path / "runs", num_epochs=1) + (["--detect_anomaly"] if anomaly else [])
    line = stops_non_finite(argv, capsys, debug_output=anomaly)
    if anomaly:  # names the operation
        assert "non-finite gradient at epoch 1, step 1 (batch 1 of 3) (Function 'MulBackward0'" in line
    else:
        assert "non-finite gradient norm (nan) at epoch 1, step 1 (batch 1 of 3)" in line
    assert not torch.is_anomaly_enabled()


# ---- determinism and concurrency across processes --------------------------------------------

def test_same_seed_same_run_across_processes_and_hash_seeds(reference_runs):
    """The pair was trained by two processes with PYTHONHASHSEED 1 and 2."""
    a, b = reference_runs
    docs = [yaml.safe_load((run / "config.yaml").read_text())["documents"] for run in (a, b)]
    assert docs[0] == docs[1] and len(docs[0]) == 3
    from fixtures_tiny import assert_same_run

    assert_same_run(a, b)
    ca, cb = load_tensors(a / CHECKPOINT_NAME), load_tensors(b / CHECKPOINT_NAME)
    assert ca.keys() == cb.keys()
    for name in ca:  # keys, weights, optimizer state, and the negative-key generator's state
        assert torch.equal(ca[name], cb[name]), name


def test_runs_started_at_once_get_their_own_folders(reference_runs):
    a, b = reference_runs
    assert a.parent == b.parent and a != b
    for run in (a, b):
        assert json.loads((run / "summary.json").read_text())["run_dir"] == str(run)
        assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["run_dir"] == str(run)


def test_new_run_dir_under_contention(tmp_path):
    barrier, made = threading.Barrier(8), []

    def make():
        barrier.wait()
        made.append(new_run_dir(tmp_path / "runs"))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == [f"run_{i}" for i in range(8)]
    assert len(set(made)) == 8
