"""Stage capacity: `run.sh capacity`, how many documents one memory holds: keyed and shared memories of 32
entries and per-document LoRA matched to the keyed memory's parameters, on 10 and 50 fictional documents
(6 runs at once on the GPU), each evaluated, one table and one plot. The preset's 200-document and
256-entry runs are left out: they do not fit the stage's limit."""
from __future__ import annotations

import shutil
import sys
import time

from .common import Stage, StageError, read_json

EVAL_ARGS = "--grid 0 --max_other_keys 2 --new_tokens 32 --gen_batch_size 256"
SMOKE_EVAL_ARGS = "--grid 0 --prompt_tokens 8 --new_tokens 8 --max_other_keys 1 --threads 1"


def run(st: Stage) -> None:
    # 6 processes on 16 cores: 1 thread each, so they do not oversubscribe the CPU
    env = {"CAPACITY_DIR": str(st.work), "CAPACITY_DOCS": "10 50", "CAPACITY_ENTRIES": "32",
           "CAPACITY_METHODS": "keyed shared lora", "CAPACITY_JOBS": "6", "OMP_NUM_THREADS": "1",
           "EVAL_ARGS": EVAL_ARGS}
    flags: list[str] = []
    if st.smoke:
        env.update(CAPACITY_DOCS="3", CAPACITY_ENTRIES="4", CAPACITY_JOBS="3", OMP_NUM_THREADS="1",
                   EVAL_ARGS=SMOKE_EVAL_ARGS)
        flags = [*st.tiny_flags(), "--num_epochs", "2"]
    result = st.run("capacity", ["bash", "run.sh", "capacity", *flags], env=env, check=False)
    for log in sorted(st.work.glob("*.log")):
        shutil.copy(log, st.runner.logs / f"capacity_{log.name}")
    report = st.work / "report"
    runs = sorted(p for p in st.work.iterdir() if p.is_dir() and p.name != "report")
    if result["timed_out"] and runs:  # cut off: the table of the runs that finished, the rest marked missing
        st.runner.run("capacity_report_partial", [sys.executable, "-m", "benchmarks.capacity_report", "--out",
                                                    str(report), *map(str, runs)], time.monotonic() + 30)
    if (report / "capacity.json").is_file():
        st.figures["rows"] = read_json(report / "capacity.json")["rows"]
        st.figures["capacity_md"] = (report / "capacity.md").read_text()
        st.pictures += [p for p in (report / "capacity.png",) if p.is_file()]
    if result["timed_out"] or result["rc"] != 0:
        raise StageError(f"run.sh capacity {'ran out of time' if result['timed_out'] else 'exited ' + str(result['rc'])}"
                         f" (log {result['log']}; each run's log is in logs.tar.gz)")
