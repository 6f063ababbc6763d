"""Optional TensorBoard logging of training (`--report_to tensorboard`), into run_N/tensorboard/.

Every epoch: the losses (loss, ce_positive, ce_negative, guidance_term), the memory-selection
statistics (l0, l2, pairwise_distance, normalized_distance), and the selection heatmap
(documents x entries, blue negative, red positive) as an image, so TensorBoard's slider shows it
over epochs. The `tensorboard` package is imported only here, only when asked; it is not a
dependency of docmem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

LOG_DIR = "tensorboard"
SCALARS = {"loss": "loss/total", "ce_positive": "loss/ce_positive", "ce_negative": "loss/ce_negative",
           "guidance_term": "loss/guidance_term", "l0": "selection/l0", "l2": "selection/l2",
           "pairwise_distance": "selection/pairwise_distance", "normalized_distance": "selection/normalized_distance"}
HEATMAP_SCALE = 8  # pixels per document x entry cell


class ScalarImageWriter(Protocol):
    def add_scalar(self, tag: str, value: float, global_step: int) -> None: ...
    def add_image(self, tag: str, image: np.ndarray, global_step: int, dataformats: str) -> None: ...
    def add_text(self, tag: str, text: str, global_step: int) -> None: ...
    def close(self) -> None: ...


def heatmap_image(selections: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(documents, entries) -> an (H, W, 3) uint8 picture: red positive, blue negative, white 0."""
    values = np.asarray(selections, dtype=float)
    scale = vmax if vmax is not None else max(float(np.abs(values).max()), 1e-12)
    v = np.clip(values / scale, -1.0, 1.0)
    red = np.where(v < 0, 1 + v, 1.0)
    green = 1 - np.abs(v)
    blue = np.where(v > 0, 1 - v, 1.0)
    image = (np.stack([red, green, blue], axis=-1) * 255).round().astype(np.uint8)
    return image.repeat(HEATMAP_SCALE, axis=0).repeat(HEATMAP_SCALE, axis=1)


class TensorBoardLog:
    def __init__(self, writer: ScalarImageWriter, titles: list[str], vmax: float | None = None) -> None:
        self.writer, self.vmax = writer, vmax
        self.writer.add_text("documents", "\n".join(f"{i}. {t}" for i, t in enumerate(titles)), 0)

    @torch.no_grad()
    def log_epoch(self, record: dict[str, Any], memory: Any) -> None:
        """One epoch's metrics.jsonl record, and (keyed memories) the selection heatmap."""
        epoch = int(record["epoch"])
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, float(record[key]), epoch)
        if memory.config.use_keys:
            selections = memory.selection(memory.doc_keys).float().cpu().numpy()
            self.writer.add_image("selection/heatmap", heatmap_image(selections, self.vmax), epoch, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(report_to: str, run_dir: Path, titles: list[str], key_activation: str) -> TensorBoardLog | None:
    """None for --report_to none; else a log writing into run_dir/tensorboard/."""
    if report_to == "none":
        return None
    from torch.utils.tensorboard import (
        SummaryWriter,  # needs the optional tensorboard package
    )

    vmax = 1.0 if key_activation in ("tanh", "sigmoid") else None
    return TensorBoardLog(SummaryWriter(log_dir=str(run_dir / LOG_DIR)), titles, vmax)
