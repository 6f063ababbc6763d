"""Every expected failure of docmem: one root type that carries its exit code.

A command-line entry point turns any DocmemError into one stderr line and its exit code
(docmem/cli.py); anything else is a bug and keeps its traceback. The codes:

    1  a model or data set cannot be loaded here (offline, gated, missing package)
    2  a bad flag, a bad or mismatched file, an impossible evaluation
    3  a non-finite loss or gradient (the last good checkpoint is kept)
    4  the disk is full (the file being written keeps its previous version)
    128 + N  stopped by signal N after writing a checkpoint (130 SIGINT, 143 SIGTERM)

The subclasses keep the built-in base they always had (ValueError, RuntimeError), so code that
catches those still works.
"""
from __future__ import annotations

from typing import Any


class DocmemError(Exception):
    """An expected failure: `str(err)` is the one-line message, `exit_code` the process's status."""

    exit_code: int = 2
    label: str = "error"  # the word after the program's name on the stderr line


class ConfigError(DocmemError, ValueError):
    """A bad setting: the message is one line naming the flag, the value and what is allowed."""

    def __init__(self, flag: str, value: Any, allowed: str) -> None:
        super().__init__(f"--{flag} {value!r}: {allowed}")
        self.flag = flag


class FoundationUnavailableError(DocmemError, RuntimeError):
    """The requested LM cannot be loaded here (offline, gated, missing package); the message is one line."""

    exit_code = 1


class DataUnavailableError(DocmemError, RuntimeError):
    """The dataset could not be downloaded from the Hugging Face Hub (offline, or unreachable)."""

    exit_code = 1


class MemoryFileError(DocmemError, ValueError):
    """A memory file that is missing, corrupt, or does not match what it is loaded into."""


class UsageError(DocmemError, ValueError):
    """A bad command line or input of a trained-memory command (empty text, bad sampling setting)."""


class MemoryRunError(DocmemError, ValueError):
    """A path that holds no loadable trained memory (with what is wrong, in one line)."""


class UnknownDocumentError(DocmemError, ValueError):
    """A document index or title that the memory does not have."""


class CheckpointError(MemoryFileError):
    """A checkpoint that is missing, truncated, tampered with, or does not fit this run."""


class EvalError(DocmemError, RuntimeError):
    """Something about the run or the options that makes evaluation impossible; one line."""


class NonFiniteLoss(DocmemError, RuntimeError):
    """The loss (or its gradient) became NaN or infinite; nothing of that step was saved."""

    exit_code = 3


class DiskFullError(DocmemError, OSError):
    """No space left while writing a file (ENOSPC, EDQUOT); the message names it. Nothing half-written stays."""

    exit_code = 4


class Interrupted(DocmemError):
    """SIGINT/SIGTERM: the run stopped (after writing a checkpoint, if it had a folder)."""

    label = "stopped"

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code

    @property
    def code(self) -> int:  # the name it had before DocmemError
        return self.exit_code
