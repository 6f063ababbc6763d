"""--report_to tensorboard: the flag, the logger's calls (with a fake writer, so the tests run
without the optional tensorboard package), and a real event file when tensorboard is installed."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import train_guidance
from docmem.config import ConfigError, TrainConfig
from docmem.training import run_state
from docmem.training.tensorboard_log import TensorBoardLog, heatmap_image, open_tensorboard
from document_memories import DocumentMemory, MemoryConfig
from fixtures_tiny import tiny_argv, tiny_lm_dir  # noqa: F401


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, np.ndarray, int, str]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.closed = False

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def add_image(self, tag, image, global_step, dataformats):
        self.images.append((tag, image, global_step, dataformats))

    def add_text(self, tag, text, global_step):
        self.texts.append((tag, text, global_step))

    def close(self):
        self.closed = True


def test_heatmap_colours():
    image = heatmap_image(np.array([[1.0, 0.0, -1.0]]), vmax=1.0)
    assert image.shape == (8, 24, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 0, 0] and image[0, 8].tolist() == [255, 255, 255]
    assert image[0, 16].tolist() == [0, 0, 255]


def test_log_epoch_calls():
    memory = DocumentMemory(MemoryConfig(hidden_size=8, num_docs=3, memory_dim=4))
    writer = FakeWriter()
    log = TensorBoardLog(writer, ["A", "B", "C"], vmax=1.0)
    log.log_epoch({"epoch": 2, "loss": 1.5, "ce_positive": 1.0, "ce_negative": None, "l0": 4.0}, memory)
    assert writer.scalars == [("loss/total", 1.5, 2), ("loss/ce_positive", 1.0, 2), ("selection/l0", 4.0, 2)]
    ((tag, image, step, fmt),) = writer.images
    assert (tag, step, fmt) == ("selection/heatmap", 2, "HWC") and image.shape == (3 * 8, 4 * 8, 3)
    assert writer.texts == [("documents", "0. A\n1. B\n2. C", 0)]
    log.close()
    assert writer.closed
    assert open_tensorboard("none", None, [], "tanh") is None


def test_flag_validation(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(report_to="wandb", dataset="synthetic", lm_name="smollm2", lm_size="135m", hook_memory_layer=1,
                    save_dir=str(tmp_path)).validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TrainConfig(report_to="tensorboard", dataset="synthetic", lm_name="smollm2", lm_size="135m",
                    hook_memory_layer=1, save_dir=str(tmp_path)).validate()


def test_training_logs_every_epoch(tiny_lm_dir, tmp_path, monkeypatch):  # noqa: F811
    writers: list[FakeWriter] = []

    def fake_open(report_to, run_dir, titles, key_activation):
        assert report_to == "tensorboard" and key_activation == "tanh"
        writers.append(FakeWriter())
        return TensorBoardLog(writers[-1], titles, 1.0)

    monkeypatch.setattr(run_state, "open_tensorboard", fake_open)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, _real=importlib.util.find_spec: (
        object() if name == "tensorboard" else _real(name, *a)))
    config = train_guidance.parse_args(tiny_argv(tiny_lm_dir, tmp_path / "runs", "--report_to", "tensorboard",
                                                 num_epochs=3, save_freq=3))
    train_guidance.run(config)
    (writer,) = writers
    assert [s for t, _, s in writer.scalars if t == "loss/total"] == [1, 2, 3]
    assert [s for t, _, s, _ in writer.images] == [1, 2, 3] and writer.closed
    assert all(t in {tag for tag, _, _ in writer.scalars} for t in ("selection/l0", "loss/ce_negative"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the optional tensorboard package is not installed")
def test_real_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    memory = DocumentMemory(MemoryConfig(hidden_size=8, num_docs=2, memory_dim=4))
    log = open_tensorboard("tensorboard", tmp_path, ["A", "B"], "tanh")
    for epoch in (1, 2):
        log.log_epoch({"epoch": epoch, "loss": 1.0 / epoch}, memory)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx([1.0, 0.5])
    assert len(events.Images("selection/heatmap")) == 2
    assert torch.is_tensor(memory.doc_keys)
