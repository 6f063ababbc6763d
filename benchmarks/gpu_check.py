"""One command that checks the project on a CUDA GPU: CUDA tests, speed, the paper's run timed,
the paper's table on SmolLM2-135M, and memory capacity (issues 10 and 15).

    python benchmarks/gpu_check.py --out DIR [--stages speed,cuda_tests,...] [--kit KITDIR ...] [--work WORK]
    python benchmarks/gpu_check.py --out DIR --smoke          # every stage at tiny sizes on the CPU

Stages (gpu_stages/NAME.py; each under its own time limit; a failure is recorded and the others go on;
the letters a-e of their former names are still accepted):
  cuda_tests   pytest -m cuda tests/test_cuda.py
  speed        bench_train_step.py, Pythia-1B shape, block 15, batch 16 x 256: bf16 (frozen, fast), fp32 (all
               three paths), fp32 with TF32 (frozen, fast); Llama-2-7B shape, block 31, bf16 (>= 40 GiB GPU)
  paper_run    `run.sh paper` on a random-weight Pythia-1B, bf16, 500 epochs: wall time, s/step with and
               without the summaries, peak GPU memory; then 20 epochs in fp32 for the CE difference
  paper_table  the paper's table on SmolLM2-135M at the paper's scale: key activations tanh, relu, sigmoid,
               a 2-layer key generator and the shared memory, trained at once, each evaluated
  capacity     `run.sh capacity`: keyed, shared and LoRA, 10/50 documents, 32 entries; one table, one plot

The project is driven through its command lines only, as a user would run them; each stage's exact
commands are recorded. First the kit check (gpu_stages/kit.py): the packages, the SmolLM2 GGUF, the data
and CUDA each stage needs; what is missing is taken from --kit folders where they hold it (the wheels
checked against this Python, then installed into WORK/site; the GGUF joined from its parts).

Output, at most 8 files (what the GPU machine's $OUT returns), written after the kit check and again
after every stage: DIR/gpu_check.json, DIR/gpu_check.md, DIR/logs.tar.gz and up to 5 pictures. The runs
stay in WORK; stage results already in WORK from an earlier invocation (another call on the same machine)
are merged and marked so. Exit 0 when every selected stage passed, 1 otherwise, 2 on bad flags.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_stages import capacity, cuda_tests, paper_run, paper_table, speed
from gpu_stages.common import ALIASES, FULL_LIMITS, NEEDS, SMOKE_LIMITS, STAGES, Runner, Stage, StageError
from gpu_stages.kit import kit_check
from gpu_stages.report import bundle, commit_info, table
from gpu_stages.wheels import tested_versions

ROOT = Path(__file__).resolve().parents[1]
STAGE_FUNCTIONS: dict[str, Callable[[Stage], None]] = {
    "cuda_tests": cuda_tests.run, "speed": speed.run, "paper_run": paper_run.run, "paper_table": paper_table.run,
    "capacity": capacity.run}
STAGE_ERRORS = (StageError, OSError, ValueError, KeyError, IndexError, ET.ParseError, subprocess.SubprocessError,
                ZeroDivisionError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, logs.tar.gz, pictures")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)} (or their former "
                   "letters a-e)")
    p.add_argument("--smoke", action="store_true", help="every stage at tiny sizes on the CPU (a few minutes)")
    p.add_argument("--kit", action="append", default=[], help="a kit folder of prepare_gpu_kit.py (repeatable: "
                   "the GGUF's parts may come in several)")
    p.add_argument("--work", default="/tmp/docmem_gpu_check", help="folder for the runs, models, logs and the "
                   "wheels/GGUF taken from the kit; stage results already there (same --smoke) are merged")
    p.add_argument("--data", default=None, help="folder holding tokenizers/ and wikitext_document_level/ "
                   "(default: ../shared/data, else KIT/data)")
    p.add_argument("--limits", default="", help="override stage limits in seconds, e.g. paper_run=240,capacity=120")
    p.add_argument("--fresh", action="store_true", help="forget stage results of earlier invocations in --work")
    args = p.parse_args(argv)
    names = [ALIASES.get(s.strip(), s.strip()) for s in args.stages.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        p.error(f"--stages: unknown {bad}; allowed: {', '.join(STAGES)} (comma separated)")
    args.stages = list(dict.fromkeys(names))  # in the order given, each once
    args.limit = dict(SMOKE_LIMITS if args.smoke else FULL_LIMITS)
    for item in filter(None, args.limits.split(",")):
        name, _, seconds = item.partition("=")
        name = ALIASES.get(name.strip(), name.strip())
        if name not in STAGES or not seconds.strip().isdigit():
            p.error(f"--limits: {item!r}; expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        args.limit[name] = int(seconds)
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


def environment(args: argparse.Namespace, site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), str(ROOT), env.get("PYTHONPATH", "")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", TQDM_MININTERVAL="10", PYTHON=sys.executable,
               HF_DATASETS_CACHE=str(args.work / "hf_datasets_cache"), PYTHONHASHSEED="0")
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"  # several small processes at once on few cores
    return env


def run_stage(name: str, args: argparse.Namespace, kit: dict[str, Any], runner: Runner,
              partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One stage under its limit: its result, figures and commands (skipped when the kit lacks what it needs).
    partial gets the result so far (status "running") whenever the stage has finished a row."""
    limit = args.limit[name]
    missing = [need for need in NEEDS[name] if need in kit["missing"]] + kit["base_missing"]
    result: dict[str, Any] = {"name": name, "what": STAGES[name], "limit_s": limit, "commit": None, "smoke": args.smoke}
    if missing:
        return {**result, "status": "skipped", "error": "missing: " + ", ".join(missing), "seconds": 0}
    stage_work = args.work / name
    if stage_work.exists():  # a rerun starts clean: its run_N folders must be its own
        shutil.rmtree(stage_work)
    stage_work.mkdir(parents=True)
    print(f"stage {name} ({STAGES[name]}), limit {limit} s ...", flush=True)
    t0 = time.monotonic()
    first_command = len(runner.commands)
    data = Path(kit["data"]) if kit["data"] else None
    st = Stage(name, stage_work, runner, t0 + limit, args.smoke, data,
               (kit["state"].get("gpu") or {}).get("memory_gib", 0.0))
    if partial:
        st.on_progress = lambda: partial({**result, "status": "running", "seconds": round(time.monotonic() - t0, 1),
                                          "figures": st.figures, "commands": runner.commands[first_command:],
                                          "pictures": [str(p) for p in st.pictures]})
    try:
        STAGE_FUNCTIONS[name](st)
        result["status"] = "ok"
    except STAGE_ERRORS as e:
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
    return {**result, "seconds": round(time.monotonic() - t0, 1), "figures": st.figures,
            "commands": runner.commands[first_command:], "pictures": [str(p) for p in st.pictures]}


def write_report(args: argparse.Namespace, kit: dict[str, Any], this_call: dict[str, Any],
                 started: float) -> dict[str, Any]:
    """gpu_check.json/.md and the rest into --out, with this call's stages so far and earlier calls' results."""
    stages = {}
    for path in sorted((args.work / "stages").glob("*.json")):
        earlier = json.loads(path.read_text())
        if path.stem in STAGES and path.stem not in this_call and earlier.get("smoke") == args.smoke:
            stages[path.stem] = {**earlier, "from_earlier_invocation": True}
            if earlier.get("status") == "running":  # that call ended inside the stage: its rows so far
                stages[path.stem]["status"] = "cut off"
    stages.update(this_call)
    state = kit["state"]
    versions = {name: state["packages"].get(name, {}).get("version") for name in ("torch", "transformers", "datasets")}
    results = {"smoke": args.smoke, "commit": commit_info(args.kit), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "total_seconds": round(time.monotonic() - started, 1),
               "complete": all(this_call.get(name, {}).get("status") not in (None, "running") for name in args.stages),
               "machine": {"gpu": state.get("gpu"), "python": state.get("python"), **versions,
                           "cpu_count": os.cpu_count()},
               "tested_versions": {name: tested_versions().get(name) for name in versions},
               "kit": {k: kit.get(k) for k in ("actions", "missing", "wheel_problems", "data", "manifest")},
               "packages": state["packages"], "stages": stages, "argv": args.argv, "limits_s": args.limit}
    pictures = [Path(p) for name in STAGES if name in stages for p in stages[name].get("pictures", [])
                if Path(p).is_file()]
    bundle(args.out, args.work, results, pictures)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    started = time.monotonic()
    if args.fresh and args.work.is_dir():
        shutil.rmtree(args.work)
    for sub in ("logs", "stages", "site"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    site = args.work / "site"
    env = environment(args, site)
    print(f"gpu_check: stages {','.join(args.stages)}{' (smoke)' if args.smoke else ''}, work in {args.work}",
          flush=True)
    kit = kit_check(args, env, site)
    for action in kit["actions"]:
        print(f"  kit: {action}", flush=True)
    for problem in kit["wheel_problems"]:
        print(f"KIT ERROR: {problem}", flush=True)
    for need, what in kit["missing"].items():
        print(f"  MISSING {need}: {what}", flush=True)
    if kit["data"]:  # the tests' fixtures read ../shared/data, which a GPU machine lacks: point them at the kit's
        env["DOCMEM_SHARED_DATA"] = kit["data"]
    runner = Runner(env, args.work / "logs")
    commit = commit_info(args.kit)
    this_call: dict[str, Any] = {}
    write_report(args, kit, this_call, started)  # the kit check comes back even if the first stage is cut

    def record(name: str, result: dict[str, Any]) -> dict[str, Any]:
        """Keep a stage's result (final, or so far) in WORK/stages and rewrite the report with it."""
        this_call[name] = result
        (args.work / "stages" / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        return write_report(args, kit, this_call, started)

    for name in args.stages:
        result = run_stage(name, args, kit, runner, lambda so_far, name=name: record(name, {**so_far, "commit": commit}))
        result.update(finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"), commit=commit)
        print(f"stage {name}: {result['status']} in {result['seconds']} s"
              + (f": {result['error']}" if result.get("error") else ""), flush=True)
        results = record(name, result)
    print(table(results), flush=True)
    return 0 if all(r["status"] == "ok" for r in this_call.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
