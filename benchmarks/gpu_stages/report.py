"""gpu_check.py's report: gpu_check.json (every figure), gpu_check.md (one line per stage, plus the
paper_table and capacity tables), logs.tar.gz and up to 5 pictures; written again after every stage, so a call
cut off by the device tool still returns what finished."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from .common import ROOT, STAGES
from .kit import read_manifests

MAX_OUT_FILES = 8  # the device tool returns at most 8 files from $OUT
MAX_PICTURES = MAX_OUT_FILES - 3
MAX_TAR_BYTES = 15 << 20


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def _speed(figures: dict[str, Any]) -> str:
    parts = []
    for name, r in figures.items():
        if isinstance(r, dict) and "peak_gib" in r:
            paths = [(p, r[f"{p}_s_per_step"]) for p in ("released", "frozen_two_pass", "fast")
                     if r.get(f"{p}_s_per_step") is not None]
            parts.append(f"{name}: " + " / ".join(f"{p} {_f(s)} s ({r['peak_gib'].get(p)} GiB)" for p, s in paths))
    return "; ".join(parts)


def _paper(figures: dict[str, Any]) -> str:
    b = figures.get("bf16", {})
    s = b.get("summary", {})
    d = figures.get("fp32_vs_bf16", {})
    return (f"bf16: {b.get('epochs_done')} epochs, wall to summary.json {_f(b.get('wall_to_summary_s'))} s, "
            f"{_f(s.get('s_per_step_incl_summaries'))} s/step with summaries, "
            f"{_f(s.get('s_per_step_without_summaries'))} without, summaries {_f(s.get('summary_seconds'))} s, "
            f"peak GPU {_f(s.get('peak_gpu_memory_gib'))} GiB; fp32-vs-bf16 CE max |diff| "
            f"{_f(d.get('max_abs_diff'))} over {d.get('epochs')} epochs")


def headline(name: str, figures: dict[str, Any]) -> str:
    """One line of the most telling figures of a stage."""
    try:
        if name == "cuda_tests":
            c = figures["counts"]
            return f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
        if name == "speed":
            return _speed(figures)
        if name == "paper_run":
            return _paper(figures)
        if name == "paper_table":
            return "; ".join(f"{r['run']}: R {_f(r.get('r'))} (paper {_f(r.get('paper_r'))}), R-L recall own "
                             f"{_f(r.get('recall_own'))} other {_f(r.get('recall_other'))}" + (
                                 f" ({r['missing']})" if r.get("missing") else "")
                             for r in figures.get("rows", []))
        if name == "capacity":
            rows = [r for r in figures.get("rows", []) if "missing" not in r]
            return f"{len(rows)} runs evaluated (table in gpu_check.md)"
    except (KeyError, TypeError, AttributeError) as e:
        return f"(figures incomplete: {e})"
    return ""


def table(results: dict[str, Any]) -> str:
    lines = ["| stage | status | seconds | limit | figures |", "|---|---|---|---|---|"]
    for name in [n for n in STAGES if n in results["stages"]]:
        r = results["stages"][name]
        status = r["status"] + (" (earlier call)" if r.get("from_earlier_invocation") else "")
        lines.append(f"| {name} | {status} | {_f(r.get('seconds'))} | {r.get('limit_s')} | "
                     f"{(r.get('error') or headline(name, r.get('figures', {}))).replace('|', '/')} |")
    machine = results["machine"]
    head = [f"# gpu_check {'(smoke, CPU)' if results['smoke'] else ''}", "",
            f"GPU: {machine.get('gpu') or 'none'}; torch {machine.get('torch')}, transformers "
            f"{machine.get('transformers')}, Python {machine.get('python')}; commit {results['commit']}; "
            f"{results['finished']}; {results['total_seconds']} s"
            + ("" if results.get("complete") else " (still running: stages not listed have not finished)"), ""]
    problems = results["kit"].get("wheel_problems") or []
    if problems:
        head += ["Kit wheels not installed: " + "; ".join(problems), ""]
    extra = []
    for name, key in (("paper_table", "table_md"), ("capacity", "capacity_md")):
        md = results["stages"].get(name, {}).get("figures", {}).get(key)
        if md:
            extra += ["", f"## {name}: {STAGES[name]}", "", md]
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


def _logs_tar(out: Path, work: Path, pictures: list[Path]) -> None:
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


def bundle(out: Path, work: Path, results: dict[str, Any], pictures: list[Path]) -> list[str]:
    """gpu_check.json, gpu_check.md, logs.tar.gz and up to MAX_PICTURES pictures: never more than 8 files.
    The JSON and the table are written last, each replaced whole (a cut leaves the previous one)."""
    for old in out.glob("*.png"):
        old.unlink()
    kept = []
    for pic in pictures[:MAX_PICTURES]:
        target = out / f"{pic.parent.name}_{pic.name}" if pic.parent.name != "report" else out / pic.name
        shutil.copy(pic, target)
        kept.append(target.name)
    _logs_tar(out, work, pictures)
    results["out_files"] = ["gpu_check.json", "gpu_check.md", "logs.tar.gz", *kept]
    for name, text in (("gpu_check.md", table(results)),
                       ("gpu_check.json", json.dumps(results, indent=2, default=str) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return results["out_files"]
