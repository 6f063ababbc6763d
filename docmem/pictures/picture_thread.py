"""An evaluation's pictures drawn by one helper thread while the measuring goes on.

The measurements spend their time in torch's kernels, which release the GIL, so a thread that
draws the pictures of what is already measured (recall's bars while the CE matrix runs, each
document's landscape while the next one is scored) takes their drawing off the critical path. One
thread draws every picture, one at a time, so matplotlib is never used by two threads at once (its
object API, no pyplot). Leaving the `with` block waits for every picture; a picture that failed
raises there, after the others are done (unless the block itself is already raising).
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any


class PictureThread:
    """with PictureThread() as pictures: pictures.draw(plot_function, *args) ..."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __enter__(self) -> PictureThread:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docmem-pictures")
        return self

    def draw(self, plot: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue one picture; its arguments must not change afterwards (they are read later)."""
        if self._pool is None:
            raise RuntimeError("PictureThread.draw outside its with block")
        self._pending.append(self._pool.submit(plot, *args, **kwargs))

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        self._pool = None
        failures = [f.exception() for f in self._pending if f.exception() is not None]
        self._pending = []
        if failures and kind is None:
            raise failures[0]
