"""No process outlives its command: the summary-drawing helper (its own session, so a signal to the
training's process group does not reach it) ends when the training process is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from conftest import ROOT
from fixtures_tiny import subprocess_env, tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)


def helpers(mark: str) -> list[int]:
    """Pids of summary-drawing helpers whose environment carries `mark`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"docmem.pictures.summary_drawing" in (proc / "cmdline").read_bytes() and mark.encode() in (
                    proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_helper_ends_when_the_training_is_killed(tiny_lm_dir, tmp_path):
    mark = uuid.uuid4().hex
    argv = tiny_argv(tiny_lm_dir, tmp_path / "runs", "--summary_process", "on", num_epochs=200, save_freq=1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_guidance.py"), *argv], cwd=ROOT,
                            env=subprocess_env(DOCMEM_ORPHAN_TEST=mark), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: helpers(mark), 120), "the helper never started"
        (helper,) = helpers(mark)
        assert os.getsid(helper) != os.getsid(proc.pid)  # its own session: killpg of the training misses it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert wait_until(lambda: not helpers(mark), 10), "the helper outlived the killed training"
    finally:
        proc.kill()
        for pid in helpers(mark):
            os.kill(pid, signal.SIGKILL)


def test_the_helper_ends_when_a_benchmark_stage_times_out(tiny_lm_dir, tmp_path):
    """A stage's command stopped at its deadline (SIGTERM to its group, SIGKILL 10 s later): no helper left."""
    from benchmarks.gpu_stages.common import stop_group

    mark = uuid.uuid4().hex
    argv = tiny_argv(tiny_lm_dir, tmp_path / "runs", "--summary_process", "on", num_epochs=200, save_freq=1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_guidance.py"), *argv], cwd=ROOT,
                            env=subprocess_env(DOCMEM_ORPHAN_TEST=mark), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_until(lambda: helpers(mark), 120), "the helper never started"
        stop_group(proc)
        assert proc.poll() is not None
        assert wait_until(lambda: not helpers(mark), 10), "the helper outlived the stopped stage"
    finally:
        proc.kill()
        for pid in helpers(mark):
            os.kill(pid, signal.SIGKILL)
