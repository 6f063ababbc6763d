"""The quick start, timed as a newcomer runs it: each command of README.md's set-up and quick start,
one after another, by wall clock (the LM's loading and the interpreter's start included).

    python -m benchmarks.bench_quickstart --record docs/results/quickstart.json
    python -m benchmarks.bench_quickstart --with_tests --record docs/results/quickstart.json   # adds the suite

The demo is trained into a temporary folder (`--save_dir`), and the commands that read
`outputs/demo/run_0` read that run. SmolLM2's weights should already be in the GGUF cache (run
`bash run.sh demo` once), as the README's figures assume. Human-readable lines first, one JSON last.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.record import write_record

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = "outputs/demo/run_0"  # what the README's commands read

# (the command as the README shows it, what it runs)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("bash run.sh demo", "`--precision auto`: `bf16_head` on a CPU with native bf16, else fp32"),
    ("python generate.py --run_dir outputs/demo/run_0 --doc 0 --no_memory", "document 0 under its key, and the plain LM"),
    ("python evaluate_memory.py --run_dir outputs/demo/run_0", "every measurement"),
    ("python evaluate_memory.py --run_dir outputs/demo/run_0 --forget 0", "forgetting, before and after"),
    ("python forget.py --run_dir outputs/demo/run_0 --doc 0 --method unlearn", "unlearning document 0"),
)
TESTS = ("python -m pytest -q -rs tests", "the test suite")


def as_run(command: str, save_dir: Path, out: Path) -> list[str]:
    """The README's command made to run here: the demo into save_dir, the others on its run, the
    forgotten memory into `out` (the run folder stays as the demo wrote it for the next command)."""
    argv = shlex.split(command)
    if argv[:3] == ["bash", "run.sh", "demo"]:
        return [*argv, "--save_dir", str(save_dir)]
    argv = [sys.executable if a == "python" else a for a in argv]
    argv = [str(save_dir / "run_0") if a == DEMO_RUN else a for a in argv]
    if "forget.py" in command:
        argv += ["--out", str(out)]
    return argv


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def wall(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with_tests", action="store_true", help="also time the test suite (about 20 minutes)")
    parser.add_argument("--record", metavar="JSON", help="also write the figures, stamped, to this result file "
                                                          "(docs/results/quickstart.json)")
    args = parser.parse_args(argv)
    commands = COMMANDS + ((TESTS,) if args.with_tests else ())
    rows = []
    with tempfile.TemporaryDirectory(prefix="docmem-quickstart-") as tmp:
        for command, what in commands:
            seconds, done = timed(as_run(command, Path(tmp) / "demo", Path(tmp) / "forgotten"))
            detail = ""
            if command == TESTS[0]:
                detail = done.stdout.strip().splitlines()[-1].strip("= ") if done.stdout.strip() else ""
            if done.returncode != 0:
                print(f"{command}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}", file=sys.stderr)
                return done.returncode
            print(f"{command}: {seconds:.1f} s" + (f" ({detail})" if detail else ""), flush=True)
            rows.append([command, wall(seconds), what, detail])
    figures = {"columns": ["command", "wall time", "what it runs", "detail"], "rows": rows}
    if args.record:
        write_record(args.record, figures, "benchmarks.bench_quickstart", argv)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
