"""Killed at any moment, nothing lost; a full disk, one line and the previous files intact.

Each command runs under tests/kill_at.py, which SIGKILLs it at its N-th file-system event (a
rename, an fsync, a removal, a safetensors write, or halfway through a text file) or makes that
event fail with ENOSPC. The command's events are counted first; it is then killed at a spread of
them, and at random wall-clock moments from outside. Afterwards every folder it touched is as
before, or complete: a run resumes to the bits of an uninterrupted one (CPU fp32), a memory folder
loads, an eval/ file parses. A full disk gives exit 4 and one line naming the file.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from docmem.errors import DocmemError
from docmem.sharding import load_any_memory
from fixtures_tiny import (  # noqa: F401  (fixtures)
    assert_same_run,
    reference_runs,
    subprocess_env,
    tiny_argv,
    tiny_lm_dir,
)

KILL_AT = ROOT / "tests" / "kill_at.py"
POINTS = 5  # kill points per command (spread over its events)


def run_at(mode: str, n: int, script: str, args: list[str], tmp: Path, timeout: float = 300
           ) -> tuple[subprocess.CompletedProcess, int]:
    """(the process, the events it saw) for `script args` under kill_at.py MODE N."""
    count = tmp / f"count_{time.monotonic_ns()}"
    done = subprocess.run([sys.executable, str(KILL_AT), mode, str(n), str(count), str(ROOT / script), *args],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return done, int(count.read_text()) if count.is_file() else -1


def spread(events: int, seed: str) -> list[int]:
    """POINTS event numbers in 1..events: the first, the last, and some between (seeded by name)."""
    rng = random.Random(seed)
    inner = rng.sample(range(2, events), min(POINTS - 2, max(0, events - 2))) if events > 2 else []
    return sorted({1, events, *inner})


def snapshot(folder: Path) -> dict[str, str]:
    """Every visible file under `folder` (hidden temporaries left out) -> its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def assert_whole(path: Path) -> None:
    """A file a reader would take: JSON parses, a PNG decodes, text ends with its last newline."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".png":
        with Image.open(path) as image:
            image.load()
    elif path.suffix in (".md", ".jsonl", ".yaml"):
        assert path.read_text().endswith("\n"), path


def assert_as_before_or_whole(folder: Path, before: dict[str, str]) -> None:
    after = snapshot(folder)
    for name, digest in after.items():
        if before.get(name) != digest:
            assert_whole(folder / name)
    # what was there stays there: a kill never removes a finished file
    assert set(before) - set(after) == set(), set(before) - set(after)


# ---- training: killed at any write, it resumes to the same bits ----------------------------------

def test_training_killed_at_any_write_resumes_to_the_same_bits(reference_runs, tiny_lm_dir, tmp_path):
    argv = tiny_argv(tiny_lm_dir, tmp_path / "count_run")
    done, events = run_at("kill", 0, "train_guidance.py", argv, tmp_path)
    assert done.returncode == 0 and events > 10, done.stderr[-2000:]
    for n in spread(events, "training"):
        save_dir = tmp_path / f"killed_{n}"
        killed, _ = run_at("kill", n, "train_guidance.py", tiny_argv(tiny_lm_dir, save_dir), tmp_path)
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr[-2000:])
        run_dir = save_dir / "run_0"
        if (run_dir / "summary.json").is_file():  # killed after its last file: the run is complete
            assert_same_run(run_dir, reference_runs[0])
            continue
        if not (run_dir / "config.yaml").is_file():  # killed before the run had a folder to resume: start it
            resumed = subprocess.run([sys.executable, "train_guidance.py", *tiny_argv(tiny_lm_dir, save_dir)], cwd=ROOT,
                                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
            run_dir = sorted(save_dir.glob("run_*"))[-1]
        else:
            resumed = subprocess.run([sys.executable, "train_guidance.py", "--resume", str(run_dir)], cwd=ROOT,
                                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, (n, resumed.stderr[-3000:])
        assert_same_run(run_dir, reference_runs[0])


def test_training_killed_at_random_moments_resumes_to_the_same_bits(reference_runs, tiny_lm_dir, tmp_path):
    rng = random.Random(31)
    for attempt in range(2):
        save_dir = tmp_path / f"run_{attempt}"
        proc = subprocess.Popen([sys.executable, "train_guidance.py", *tiny_argv(tiny_lm_dir, save_dir)], cwd=ROOT,
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.5, 6.0))  # start-up takes about 2.5 s here; the run about 5
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        runs = sorted(save_dir.glob("run_*"))
        args = ["--resume", str(runs[-1])] if runs and (runs[-1] / "config.yaml").is_file() else \
            tiny_argv(tiny_lm_dir, save_dir)
        resumed = subprocess.run([sys.executable, "train_guidance.py", *args], cwd=ROOT, env=subprocess_env(),
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_run(sorted(save_dir.glob("run_*"))[-1], reference_runs[0])


# ---- commands that read a run: the run stays as it was, what they write is whole ----------------

@pytest.fixture(scope="module")
def sharded_run(tiny_lm_dir, tmp_path_factory) -> Path:
    """4 documents in 2 shards, key_dim 2 (what every forgetting method and the key search need)."""
    save_dir = tmp_path_factory.mktemp("sharded") / "runs"
    argv = tiny_argv(tiny_lm_dir, save_dir, "--max_labels", "4", "--memory_shards", "2", num_epochs=2, save_freq=1)
    done = subprocess.run([sys.executable, "train_guidance.py", *argv], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return save_dir / "run_0"


def _loads(out: Path) -> None:
    """A forgotten memory folder: absent, empty, or complete and loadable."""
    if not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith(".")):
        return
    load_any_memory(out / "memory" if (out / "memory").is_dir() else out)


COMMANDS = {
    "drop_key": ("forget.py", ["--doc", "1", "--method", "drop_key"]),
    "edit": ("forget.py", ["--doc", "1", "--method", "edit"]),
    "unlearn": ("forget.py", ["--doc", "1", "--method", "unlearn", "--steps", "3"]),
    "retrain_shard": ("forget.py", ["--doc", "1", "--method", "retrain_shard"]),
    "evaluate": ("evaluate_memory.py", ["--grid", "3", "--prompt_tokens", "8", "--new_tokens", "8"]),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_killed_at_any_write_leaves_every_folder_whole(name, sharded_run, tmp_path):
    script, extra = COMMANDS[name]
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    before = snapshot(run)
    outs = ["--out", str(tmp_path / "out")] if script == "forget.py" else []
    done, events = run_at("kill", 0, script, ["--run_dir", str(run), *extra, *outs], tmp_path)
    assert done.returncode == 0 and events > 0, done.stderr[-3000:]
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    shutil.rmtree(run)
    shutil.copytree(sharded_run, run)
    for n in spread(events, name):
        out = tmp_path / f"out_{n}"
        args = ["--run_dir", str(run), *extra, *(["--out", str(out)] if outs else [])]
        killed, _ = run_at("kill", n, script, args, tmp_path)
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr[-2000:])
        assert_as_before_or_whole(run, before)
        if name == "retrain_shard" and not (out / "summary.json").is_file():  # the same command continues it
            again = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=subprocess_env(),
                                   capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, (n, again.stderr[-3000:])
            load_any_memory(out / "memory")
        elif name == "retrain_shard":  # killed after its last file: complete
            load_any_memory(out / "memory")
        elif outs:
            _loads(out)
        before = snapshot(run)  # an eval/ file written whole before the kill is part of the run now


def test_a_half_written_memory_is_refused_in_one_line_naming_the_file(sharded_run, tmp_path):
    """What a kill cannot leave any more, refused all the same: a memory file cut short."""
    out = tmp_path / "memory"
    shutil.copytree(sharded_run / "memory", out)
    weights = next(out.rglob("memory.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DocmemError, match=re.escape(str(weights))):
        load_any_memory(out)
    done = subprocess.run([sys.executable, "generate.py", "--run_dir", str(out), "--doc", "0", "--max_new_tokens", "2"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(weights) in lines[-1], done.stderr[-2000:]


# ---- a full disk -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["drop_key", "unlearn", "evaluate"])
def test_a_full_disk_is_one_line_and_the_previous_files_stay(name, sharded_run, tmp_path):
    script, extra = COMMANDS[name]
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    outs = ["--out", str(tmp_path / "out")] if script == "forget.py" else []
    done, events = run_at("enospc", 0, script, ["--run_dir", str(run), *extra, *outs], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    before = snapshot(run)  # eval/ written once: a second evaluation replaces its files
    for n in spread(events, f"enospc {name}"):
        full, _ = run_at("enospc", n, script, ["--run_dir", str(run), *extra, *outs], tmp_path)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 4 and "Traceback" not in full.stderr, (n, full.stderr[-3000:])
        assert "no space left" in lines[-1] and str(tmp_path) in lines[-1], lines[-1]
        assert snapshot(run) == before or name == "evaluate"  # an evaluation's earlier files are new, whole ones
        assert_as_before_or_whole(run, before)
        _loads(tmp_path / "out")
        assert not [p for p in tmp_path.rglob(".*.tmp")], "a temporary was left behind"


def test_training_on_a_full_disk_keeps_its_last_checkpoint(tiny_lm_dir, tmp_path):
    argv = tiny_argv(tiny_lm_dir, tmp_path / "runs")
    _, events = run_at("enospc", 0, "train_guidance.py", argv, tmp_path)
    n = events - 3  # late: the final memory, summary and pictures
    full, _ = run_at("enospc", n, "train_guidance.py", tiny_argv(tiny_lm_dir, tmp_path / "full"), tmp_path)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 4 and "Traceback" not in full.stderr and "no space left" in lines[-1], full.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "train_guidance.py", "--resume", str(tmp_path / "full" / "run_0")],
                             cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
