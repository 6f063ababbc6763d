"""Drawing a periodic summary's three pictures (losses.png, selection.png, logit_lens.png), in the
training process or in a helper process beside it.

A summary's pictures are matplotlib work on the CPU, which on a GPU run can take as long as the
training between two summaries. The training process computes what a summary shows (the selection,
the logit lens) and hands it over as one JSON line; `python -m docmem.pictures.summary_drawing` draws the
frames in order, with the figures kept from one frame to the next as in the training process, so
the files are the same bytes. The training waits only when two summaries are already waiting to be
drawn, and before the GIFs, which need every frame.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from docmem.pictures import plots

MAX_WAITING = 2  # summaries handed over and not yet drawn before the training waits for one


@dataclass
class Frame:
    """Everything one summary's pictures show (plain data: it travels as JSON)."""
    folder: str
    epoch: int
    history: list[dict[str, Any]]
    target: float | None  # the guidance's target CE line on the loss curves (None: no guidance)
    selections: list[list[float]] | None  # (documents, entries); None for a shared memory
    titles: list[str]
    top: list[list[tuple[str, float]]]  # the logit lens: each readout's top tokens and logits
    names: list[str]  # the lens table's row names


class FrameDrawer:
    """The three pictures of successive summaries, each figure kept and redrawn while it fits."""

    def __init__(self, vmax: float | None) -> None:
        self.vmax = vmax  # the heatmap's fixed colour scale (None: each frame's own)
        self.loss_curves: plots.LossCurves | None = None
        self.heatmap: plots.SelectionHeatmap | None = None
        self.lens_table: plots.LogitLensTable | None = None

    def draw(self, frame: Frame) -> None:
        folder, title = Path(frame.folder), f"epoch {frame.epoch}"
        if self.loss_curves is None or not self.loss_curves.fits(frame.history, frame.target, title):
            self.loss_curves = plots.LossCurves(frame.history, target=frame.target, title=title)
        self.loss_curves.draw(frame.history, folder / "losses.png", title=title)
        if frame.selections is not None:
            selections = np.asarray(frame.selections, dtype=np.float32)
            if self.heatmap is None or not self.heatmap.fits(selections, frame.titles):
                self.heatmap = plots.SelectionHeatmap(frame.titles, selections.shape[1], vmax=self.vmax)
            self.heatmap.draw(selections, folder / "selection.png", epoch=frame.epoch)
        top = [[(token, value) for token, value in row] for row in frame.top]
        if self.lens_table is None or not self.lens_table.fits(top, frame.names):
            self.lens_table = plots.LogitLensTable.for_tokens(top, frame.names)
        self.lens_table.draw(top, folder / "logit_lens.png", epoch=frame.epoch)


def draws_in_background(summary_process: str, device: str) -> bool:
    """--summary_process: on, off, or auto (on when the memory trains on a GPU: there the training does
    not use the CPU's cores, while on a CPU the helper would take a core from the training's threads)."""
    return summary_process == "on" or (summary_process == "auto" and str(device).startswith("cuda"))


class SummaryDrawingError(RuntimeError):
    """The helper process could not draw a summary (its message says why)."""


class DrawingProcess:
    """The helper process: frames go in as JSON lines, one answer line comes back per frame."""

    def __init__(self, vmax: float | None) -> None:
        root = str(Path(__file__).resolve().parents[1])  # the folder that holds docmem/, wherever the run started
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "docmem.pictures.summary_drawing", json.dumps(vmax)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                     errors="replace", bufsize=1, env=env,
                                     start_new_session=True)  # Ctrl-C and a job's SIGTERM reach the training only
        self.waiting = 0

    def submit(self, frame: Frame) -> None:
        while self.waiting >= MAX_WAITING:
            self._answer()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(asdict(frame)) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise SummaryDrawingError(f"the summary-drawing process ended (exit {self.proc.wait()})") from e
        self.waiting += 1

    def _answer(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SummaryDrawingError(f"the summary-drawing process ended (exit {self.proc.wait()}) with "
                                      f"{self.waiting} summaries not drawn")
        self.waiting -= 1
        if line.strip() != "ok":
            raise SummaryDrawingError(f"a summary's pictures could not be drawn: {line.strip()}")

    def finish(self) -> None:
        """Wait for every frame handed over, then let the process end."""
        try:
            while self.waiting:
                self._answer()
        finally:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass
            self.proc.wait()


def serve(vmax: float | None, frames: IO[str], answers: IO[str]) -> None:
    """Draw every frame read from `frames`, in order; one line on `answers` each: ok, or the error."""
    drawer = FrameDrawer(vmax)
    for line in frames:
        try:
            drawer.draw(Frame(**json.loads(line)))
            answers.write("ok\n")
        except Exception as e:  # noqa: BLE001 - any failure is reported to the training process, which raises it
            answers.write(f"{type(e).__name__}: {e}".replace("\n", " ") + "\n")
            drawer = FrameDrawer(vmax)  # a figure left half-drawn is not reused
        answers.flush()


def exit_with_parent(parent: int, poll_seconds: float = 0.2) -> threading.Thread:
    """A watchdog thread: the helper ends at once when its parent is gone (killed, even by SIGKILL, mid-draw),
    rather than finishing a frame nobody will read. It runs in its own session, so no signal to the parent's
    process group reaches it."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(0)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    exit_with_parent(os.getppid())
    try:
        serve(json.loads(sys.argv[1]), sys.stdin, sys.stdout)
    except BrokenPipeError:  # the training process is gone: nobody to answer
        os._exit(0)
