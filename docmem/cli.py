"""The one place a command-line entry point meets the user: logging set up once, and every
expected failure (docmem.errors.DocmemError) turned into one stderr line and its exit code.

Messages go through `logging` to stderr, progress through tqdm bars (also stderr); the only
things a script writes to stdout are its results (evaluate_memory.py's JSON and tables).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

from docmem.allocator import freeze_imported_objects, keep_freed_memory
from docmem.errors import DocmemError

# The console entry points' prefix (pyproject.toml: docmem-train, docmem-evaluate, ...).
ENTRY_POINT_PREFIX = "docmem-"


class _ToStderr(logging.Handler):
    """Writes through tqdm (a line never cuts a progress bar) to the sys.stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(level: int = logging.INFO) -> None:
    """The `docmem` loggers (every module logs under that name) to stderr as bare lines."""
    root = logging.getLogger("docmem")
    if not any(isinstance(h, _ToStderr) for h in root.handlers):
        handler = _ToStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def command_name(script: str) -> str:
    """The name the user ran: `docmem-train`, ... as a console entry point (pip's wrapper script keeps its
    own name in sys.argv[0]), else the script's file name (`python train_guidance.py`, `python -m ...`)."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith(ENTRY_POINT_PREFIX) else script


def error_line(prog: str, message: str, label: str = "error") -> None:
    """The one stderr line of a failed command: `prog: label: message`, whitespace folded."""
    sys.stderr.write(f"{prog}: {label}: {' '.join(str(message).split())}\n")
    sys.stderr.flush()


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    """One stderr line, then exit `code` (argparse errors, which happen before any work)."""
    error_line(prog, message)
    raise SystemExit(code)


def run_command(prog: str, body: Callable[[], object]) -> int:
    """Run a command's body; returns its exit status (0, or the failure's exit code)."""
    setup_logging()
    keep_freed_memory()  # docmem/allocator.py: tensors of a size reuse freed memory
    freeze_imported_objects()  # and the garbage collector no longer walks what the imports made
    try:
        body()
    except DocmemError as err:
        error_line(command_name(prog), str(err), err.label)
        return err.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        error_line(command_name(prog), "interrupted", "stopped")
        return 128 + signal.SIGINT
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one stderr line and exit 2, like every other failure; its
    usage line names the command as the user ran it (command_name)."""

    def __init__(self, prog: str | None = None, **kwargs: Any) -> None:
        super().__init__(prog=command_name(prog) if prog else None, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")


def new_parser(prog: str, description: str, loads_lm: bool = True) -> OneLineParser:
    """The flags the trained-memory commands (generate.py, attribute.py, forget.py) share."""
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a run folder save_dir/run_N, its memory/ folder, or a save_dir")
    if loads_lm:
        parser.add_argument("--device", default="auto", help="auto (cuda:0 if available, else cpu), cpu, cuda:N")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def run_and_print(prog: str, work: Callable[[], Any], as_json: bool, text: Callable[[Any], str]) -> int:
    """run_command for the trained-memory commands: the result of `work` goes to stdout as JSON
    (--json) or as `text(result)`."""
    def body() -> None:
        result = work()
        sys.stdout.write((json.dumps(result, indent=1, ensure_ascii=False) if as_json else text(result)) + "\n")

    return run_command(prog, body)
