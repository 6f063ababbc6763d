"""Checkpoints and --resume: a run killed at any moment (SIGKILL), or stopped by SIGTERM/SIGINT,
continues in place and ends bit for bit where an uninterrupted run ends (CPU, fp32)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal

import pytest
import yaml

import train_guidance
from docmem.training.checkpoint import CHECKPOINT_NAME, read_checkpoint
from fixtures_tiny import (  # noqa: F401  (fixtures)
    assert_same_run,
    finish,
    reference_runs,
    run_training,
    start_training,
    tiny_argv,
    tiny_lm_dir,
    wait_for_lines,
)

# ---- real processes, killed from outside -----------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_process_resumes_to_the_same_weights_and_metrics(sig, reference_runs, tiny_lm_dir, tmp_path):
    save_dir = tmp_path / "runs"
    proc = start_training(tiny_argv(tiny_lm_dir, save_dir), tmp_path / "log")
    run_dir = save_dir / "run_0"
    wait_for_lines(run_dir / "metrics.jsonl", 3, proc)  # past the epoch-2 checkpoint, into epoch 4
    proc.send_signal(sig)
    err = finish(proc, timeout=300)
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # finished its step, wrote a checkpoint, said so in one line, exit 128 + 15
        assert proc.returncode == 143, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert "stopped by SIGTERM" in last and "--resume" in last and "Traceback" not in err
        state = read_checkpoint(run_dir / CHECKPOINT_NAME).state
        assert state["epoch"] >= 3 and state["step"] == 3 * state["epoch"] + state["batch"]
        assert not list(run_dir.glob(".*.tmp"))  # (a SIGKILL may leave a half-written one behind)

    done = run_training(["--resume", str(run_dir)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_run(run_dir, reference_runs[0])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["num_epochs"] == 6 and config["resume"] is None


# ---- in-process: a signal at a chosen batch, mid-accumulation --------------------------------

def in_process_argv(lm_dir, save_dir, num_epochs=4):
    # 6 batches an epoch (3 documents x 2 segments, batch size 1), an optimizer step every 2
    return tiny_argv(lm_dir, save_dir, "--batch_size", "1", "--num_accumulation_steps", "2",
                     num_epochs=num_epochs, save_freq=2)


@pytest.fixture(scope="module")
def in_process_reference(tiny_lm_dir, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("inproc") / "runs"
    assert train_guidance.main(in_process_argv(tiny_lm_dir, save_dir)) == 0
    return save_dir / "run_0"


def signal_at_call(monkeypatch, call: int, sig=signal.SIGTERM) -> None:
    """Send `sig` to this process from inside the call-th training batch."""
    real, calls = train_guidance.train_step_losses, []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_guidance, "train_step_losses", wrapper)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_accumulation_finishes_the_step(sig, code, in_process_reference, tiny_lm_dir, tmp_path,
                                                   monkeypatch, capsys):
    save_dir = tmp_path / "runs"
    signal_at_call(monkeypatch, 9, sig)  # epoch 2, batch 3 of 6: the first half of an accumulated step
    with pytest.raises(SystemExit) as exit_info:
        train_guidance.main(in_process_argv(tiny_lm_dir, save_dir))
    assert exit_info.value.code == code
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    run_dir = save_dir / "run_0"
    state = read_checkpoint(run_dir / CHECKPOINT_NAME).state
    assert (state["epoch"], state["batch"], state["step"]) == (1, 4, 5)  # the step was completed first
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("train_guidance.py: stopped: ")

    monkeypatch.undo()
    assert train_guidance.main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, in_process_reference)


def test_extend_a_finished_run(in_process_reference, tiny_lm_dir, tmp_path, capsys):
    save_dir = tmp_path / "runs"
    assert train_guidance.main(in_process_argv(tiny_lm_dir, save_dir, num_epochs=2)) == 0
    run_dir = save_dir / "run_0"
    with pytest.raises(SystemExit) as exit_info:  # finished: resuming it needs more epochs
        train_guidance.main(["--resume", str(run_dir)])
    assert exit_info.value.code == 2
    assert "larger --num_epochs" in capsys.readouterr().err
    assert train_guidance.main(["--resume", str(run_dir), "--num_epochs", "4"]) == 0
    assert_same_run(run_dir, in_process_reference)  # constant lr: the same as 4 epochs in one go
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["num_epochs"] == 4
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4


def test_resume_before_the_first_checkpoint_starts_over(in_process_reference, tmp_path):
    """Killed while loading (config.yaml written, nothing else): --resume starts it over in place."""
    run_dir = tmp_path / "runs" / "run_0"
    run_dir.mkdir(parents=True)
    shutil.copy(in_process_reference / "config.yaml", run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "stale": true}\n')
    assert train_guidance.main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, in_process_reference)


def test_a_run_being_trained_cannot_be_resumed_twice(in_process_reference, tmp_path, capsys):
    run_dir = tmp_path / "run_0"
    shutil.copytree(in_process_reference, run_dir)
    fd = os.open(run_dir, os.O_RDONLY)  # stands for the process training it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_info:
            train_guidance.main(["--resume", str(run_dir), "--num_epochs", "6"])
    finally:
        os.close(fd)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "another process is training this run" in err
