"""Result files: one JSON per measured table under docs/results/, stamped with where and how it was made.

A benchmark given `--record docs/results/NAME.json` calls `write_record`; `python -m benchmarks.results`
renders docs/results.md from those files. The stamp is the same for every benchmark: the machine,
the commit, the date and the exact command, so a figure can always be traced and remade.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.results import MEASURED

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The GPU's name when torch sees one, else the CPU's model and its cores, and the torch version."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # platform.processor() is often empty or just "x86_64" on Linux
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores (torch {torch.__version__})"


def commit(root: Path = ROOT) -> str:
    """The checked-out commit, marked `+modified` when tracked files differ from it (the figures
    then come from code no commit holds)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root).returncode != 0
    return head.stdout.strip() + ("+modified" if dirty else "")


def command(module: str, argv: list[str] | None = None) -> str:
    """The command as typed: `python -m MODULE ARGS` (`argv`: the arguments, default this process's)."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def provenance(module: str, argv: list[str] | None = None) -> dict[str, str]:
    """The stamp of a result measured now, by this process (`python -m MODULE ARGV`)."""
    # the load average says how busy a shared machine was when the figures were taken
    return {"source": MEASURED, "machine": machine(), "commit": commit(),
            "date": datetime.date.today().isoformat(), "command": command(module, argv),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def write_record(path: str | Path, figures: dict[str, Any], module: str, argv: list[str] | None = None) -> Path:
    """Write `figures` with the stamp of `python -m MODULE ARGV` to `path` (a file of docs/results/)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**provenance(module, argv), "figures": figures}
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"recorded {path}", flush=True)
    return path


def table_cells(markdown: str) -> dict[str, list]:
    """A benchmark's markdown table as result-file cells: {"columns": [...], "rows": [[...], ...]}
    (its first table; the lines around it are left out)."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    if len(split) < 2:
        raise ValueError("no markdown table to record")
    body = [row for row in split[1:] if not all(set(cell) <= set("-: ") for cell in row)]
    return {"columns": split[0], "rows": body}
