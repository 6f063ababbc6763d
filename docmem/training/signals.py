"""Stopping a training run cleanly on SIGINT / SIGTERM (docs/run_folder.md, "Interrupting").

The first signal asks the training loop to stop after the current optimizer step and write a
checkpoint; the run then ends with errors.Interrupted (exit 128 + the signal). A second signal
stops at once; the last checkpoint stays whole because every file is replaced atomically.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

from docmem.errors import Interrupted
from docmem.training.checkpoint import checkpoint_path


class StopOnSignal:
    """While active, SIGINT and SIGTERM set `signum`; the training loop polls it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        # os.write: a print here could re-enter a stderr write the signal interrupted
        os.write(2, f"\n{self.name}: finishing the current step, then writing a checkpoint "
                    "(send it again to stop at once)\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def interrupted(self, where: str, run_dir: Path | None) -> Interrupted:
        """The error that ends the run, saying where it stopped and how to continue."""
        if run_dir is None:
            return Interrupted(f"stopped by {self.name} {where}; nothing was written", 128 + self.signum)
        return Interrupted(f"stopped by {self.name} {where}; checkpoint written to {checkpoint_path(run_dir)}; "
                           f"continue with --resume {run_dir}", 128 + self.signum)
