"""The periodic summary of a run: loss curves, every document's memory selection, the logit
lens of every document's memory readout, and GIFs of those over time.

    run_N/summaries/epoch_0010/{losses.png, selection.png, selection.json, logit_lens.png, logit_lens.json}
    run_N/{losses.gif, docreps.gif, logits.gif, selection_stats.png}

A summary draws only its own frames, so its cost does not grow with the epoch, and keeps its three
figures for the next summary, which redraws only what changed (plots.LossCurves, SelectionHeatmap,
LogitLensTable: the same pixels as new figures). The GIFs and selection_stats.png are drawn once
(`write_run_pictures`, the GIFs from the frames on disk), when training ends, is interrupted or fails.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from docmem.atomic import write_atomic
from docmem.config import TrainConfig
from docmem.pictures import evaluation_plots as analysis_plots
from docmem.pictures import plots
from docmem.pictures.summary_drawing import DrawingProcess, Frame, FrameDrawer
from document_memories import DocumentMemory
from foundations import Foundation
from utils import final_norm, logit_lens

log = logging.getLogger(__name__)


class SummaryWriter:
    def __init__(self, run_dir: Path, foundation: Foundation, memory: DocumentMemory, titles: list[str],
                 config: TrainConfig, background: bool = False) -> None:
        """background: draw the pictures in a helper process (docmem/pictures/summary_drawing.py), started at the
        first summary, while training goes on."""
        self.run_dir, self.foundation, self.memory, self.titles, self.config = run_dir, foundation, memory, titles, config
        self.frames: dict[str, list[Path]] = {"losses": [], "docreps": [], "logits": []}
        # a fixed colour scale where the selection is bounded, so GIF frames compare
        self.vmax = 1.0 if memory.config.key_activation in ("tanh", "sigmoid") else None
        self.background = background
        self.drawer: FrameDrawer | None = None  # the kept figures, when drawing here
        self.process: DrawingProcess | None = None  # the helper, when drawing there

    @torch.no_grad()
    def write(self, epoch: int, history: list[dict]) -> Path:
        folder = self.run_dir / "summaries" / f"epoch_{epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = self.config.target_negative_ce if self.config.guidance_active else None
        keys = self.memory.doc_keys if self.memory.config.use_keys else None
        selections = None
        if keys is not None:
            selections = self.memory.selection(keys).float().cpu()
            write_atomic(folder / "selection.json", json.dumps(
                {"epoch": epoch, "titles": self.titles, "selections": selections.tolist()}) + "\n")
        readouts = self.memory.readout(keys)
        decoder = self.foundation.decoder()
        top = logit_lens(readouts, final_norm(decoder), self.foundation.model.get_output_embeddings(),
                         self.foundation.tokenizer, top_k=self.config.top_k_tokens)
        names = self.titles if keys is not None else ["shared memory"]
        write_atomic(folder / "logit_lens.json", json.dumps(
            {"epoch": epoch, "documents": [{"title": t, "top_tokens": [{"token": tok, "logit": v} for tok, v in row]}
                                           for t, row in zip(names, top)]}, ensure_ascii=False, indent=1) + "\n")
        frame = Frame(str(folder), epoch, list(history), target,
                      selections.tolist() if selections is not None else None, self.titles, top, names)
        if self.background:
            self.process = self.process or DrawingProcess(self.vmax)
            self.process.submit(frame)
        else:
            self.drawer = self.drawer or FrameDrawer(self.vmax)
            self.drawer.draw(frame)
        self.frames["losses"].append(folder / "losses.png")
        if selections is not None:
            self.frames["docreps"].append(folder / "selection.png")
        self.frames["logits"].append(folder / "logit_lens.png")
        return folder

    def write_run_pictures(self, history: list[dict]) -> list[Path]:
        """The run-wide pictures: selection_stats.png over `history` (the metrics so far), and
        losses.gif, docreps.gif and logits.gif from every frame so far (those of an earlier session
        of a resumed run included: run_folder.rewind_run_dir lists them). Each GIF is written to a
        temporary file and renamed, so a stop in the middle leaves the previous GIF whole."""
        if self.process is not None:  # every frame drawn first: the GIFs are made of them
            process, self.process = self.process, None
            process.finish()
        written = []
        count = max(map(len, self.frames.values()))
        if count:  # a stop waits for this: say why
            log.info(f"drawing selection_stats.png and the GIFs of {count} summaries into {self.run_dir}")
        if history and self.memory.config.use_keys:
            written.append(analysis_plots.plot_selection_stats(
                {self.run_dir.name: history}, self.run_dir / "selection_stats.png",
                title=f"memory selection up to epoch {history[-1].get('epoch', len(history))}"))
        for name, frames in self.frames.items():
            present = [f for f in frames if f.is_file()]
            if not present:
                continue
            final = self.run_dir / f"{name}.gif"
            tmp = self.run_dir / f".{name}.gif.tmp"  # rewind_run_dir removes leftovers of a killed process
            plots.make_gif(present, tmp)
            os.replace(tmp, final)
            written.append(final)
        return written
