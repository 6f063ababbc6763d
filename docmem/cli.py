"""What the trained-memory commands (generate.py, attribute.py, forget.py) share: a parser that
reports a bad command line in one stderr line (exit 2), and one mapping of failures to exit codes:
2 for a bad run folder, document or text; 1 for a model or data that cannot be loaded here."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from docmem.trained_memory import MemoryRunError, UnknownDocumentError
from document_memories import MemoryFileError
from foundations import FoundationUnavailableError
from wikitext import DataUnavailableError

USAGE_ERRORS: tuple[type[Exception], ...] = (MemoryRunError, UnknownDocumentError, MemoryFileError, ValueError)
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (FoundationUnavailableError, DataUnavailableError)


def error_line(prog: str, message: str) -> str:
    return f"{prog}: error: {' '.join(str(message).split())}\n"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(error_line(self.prog, f"{message} (see --help)"))
        raise SystemExit(2)


def new_parser(prog: str, description: str, loads_lm: bool = True) -> OneLineParser:
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a run folder save_dir/run_N, its memory/ folder, or a save_dir")
    if loads_lm:
        parser.add_argument("--device", default="auto", help="auto (cuda:0 if available, else cpu), cpu, cuda:N")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def run_command(prog: str, body: Callable[[], None]) -> int:
    """Run a command's body; expected failures become one stderr line and an exit code."""
    try:
        body()
    except UNAVAILABLE_ERRORS as err:
        sys.stderr.write(error_line(prog, str(err)))
        return 1
    except USAGE_ERRORS as err:
        sys.stderr.write(error_line(prog, str(err)))
        return 2
    return 0
