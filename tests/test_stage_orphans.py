"""No process outlives a gpu_check.py stage's command, cut off or not: what the command started in a
session of its own (the summary-drawing helper of a training, here also a plain detached child) is
found by the mark in its environment and stopped when the command ends (benchmarks/gpu_stages/common.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from test_orphans import helpers, wait_until

from benchmarks.gpu_stages.common import MARK_VARIABLE, Runner, marked_processes, stop_group, stop_marked
from conftest import ROOT
from fixtures_tiny import subprocess_env, tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)

# a command that starts a child in a session of its own (as the summary helper is), writes its pid, then
# sleeps, or ends at once
DETACH = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
          "time.sleep(300)'], start_new_session=True); open(sys.argv[1], 'w').write(str(child.pid)); "
          "time.sleep(float(sys.argv[2]))")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that is not there to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def runner(tmp_path: Path) -> Runner:
    return Runner(subprocess_env(), tmp_path / "logs")


def test_a_command_cut_at_its_deadline_leaves_no_process(tmp_path):
    pid_file = tmp_path / "child.pid"
    record = runner(tmp_path).run("detach", [sys.executable, "-c", DETACH, str(pid_file), "300"],
                                  time.monotonic() + 4)
    assert record["timed_out"] is True
    child = int(pid_file.read_text())
    assert not alive(child) and not marked_processes(record["mark"])
    assert child in record["stray_processes_stopped"]


def test_a_command_that_ends_leaves_no_process(tmp_path):
    pid_file = tmp_path / "child.pid"
    record = runner(tmp_path).run("detach", [sys.executable, "-c", DETACH, str(pid_file), "0"],
                                  time.monotonic() + 60)
    assert record["rc"] == 0 and record["timed_out"] is False
    assert not alive(int(pid_file.read_text())) and not marked_processes(record["mark"])


def test_a_training_cut_by_its_stage_leaves_no_summary_helper(tiny_lm_dir, tmp_path):
    """The paper_run stage's case: a training with --summary_process on, stopped at the stage's deadline as
    Runner.run stops it (SIGTERM to its group, SIGKILL 10 s later, then what is left of its mark)."""
    mark = uuid.uuid4().hex
    argv = tiny_argv(tiny_lm_dir, tmp_path / "runs", "--summary_process", "on", num_epochs=200, save_freq=1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_guidance.py"), *argv], cwd=ROOT,
                            env=subprocess_env(**{MARK_VARIABLE: mark, "DOCMEM_ORPHAN_TEST": mark}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_until(lambda: helpers(mark), 120), "the helper never started"
        (helper,) = helpers(mark)
        assert os.getsid(helper) != os.getsid(proc.pid)  # its own session: the group's stop misses it
        stop_group(proc)
        stop_marked(mark)
        assert proc.poll() is not None and not alive(helper) and not marked_processes(mark)
    finally:
        proc.kill()
        for pid in helpers(mark):
            os.kill(pid, signal.SIGKILL)


def test_background_jobs_run_at_most_n_at_once_and_stop_at_the_deadline(tmp_path):
    """Runner.run_jobs (stage paper_table's trainings): at most max_jobs at once; at the deadline the running
    ones are stopped, each leaving no process, and the ones not started are recorded so."""
    quick = [sys.executable, "-c", "pass"]
    records = runner(tmp_path).run_jobs([("a", quick), ("b", quick), ("c", quick)], time.monotonic() + 60, 2)
    assert [r["rc"] for r in records] == [0, 0, 0] and not any(r["timed_out"] for r in records)
    slow = [[sys.executable, "-c", DETACH, str(tmp_path / f"{i}.pid"), "300"] for i in range(3)]
    records = runner(tmp_path).run_jobs([(f"slow{i}", cmd) for i, cmd in enumerate(slow)], time.monotonic() + 4, 2)
    assert [r["timed_out"] for r in records] == [True, True, True]
    assert records[2].get("not_started") is True and not (tmp_path / "2.pid").exists()
    for i in (0, 1):
        assert "not_started" not in records[i] and not alive(int((tmp_path / f"{i}.pid").read_text()))
        assert not marked_processes(records[i]["mark"])
