"""Where a run's frozen LM lives and in what precision: the device, what --precision resolves to
on it (and why: config.yaml records both), and opening the LM for a run's settings.

The functions read a run's settings from any object with TrainConfig's field names (`RunSettings`),
so this package does not depend on the training configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from docmem.errors import ConfigError

from .common import Foundation
from .load import load_foundation

# --precision -> (the LM's dtype, the dtype of the fast path's vocabulary-head products)
PRECISION_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
                    "fp16": (torch.float16, torch.float16), "bf16_head": (torch.float32, torch.bfloat16)}


class RunSettings(Protocol):
    """The flags of a run that say which LM, where and in what precision (TrainConfig has them)."""
    lm_name: str
    lm_size: str
    lm_path: str | None
    lm_cache_dir: str | None
    num_gpus: int
    device: str
    precision: str
    hook_memory_layer: int


def resolve_device(config: RunSettings, requested: str = "auto") -> str:
    """The device of a single-device run. `requested` (evaluation's --device) wins unless auto."""
    if requested != "auto":
        return requested
    if config.num_gpus == 0:
        return "cpu"
    if config.device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return config.device


@dataclass(frozen=True)
class Precision:
    """What --precision resolved to on this device, and why (config.yaml records all of it)."""
    name: str  # fp32, bf16, fp16 or bf16_head
    lm: torch.dtype  # the LM's weights; autocast runs in it unless it is fp32
    head: torch.dtype  # the fast path's vocabulary-head products (logits, the hidden state's gradient)
    reason: str

    def record(self) -> dict[str, str]:
        return {"precision": self.name, "dtype": str(self.lm).removeprefix("torch."),
                "head_dtype": str(self.head).removeprefix("torch."), "precision_reason": self.reason}


def cpu_native_bf16() -> list[str]:
    """The CPU's native bf16 units found at run time (AMX, AVX512-BF16); [] when it has none."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    return [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]


def resolve_precision(config: RunSettings, device: str) -> Precision:
    """auto: bf16 on CUDA; on a CPU with native bf16, bf16_head (the LM in fp32, only the vocabulary
    head's products in bf16: benchmarks/bench_precision.py measured it keeping the demo's results);
    fp32 on any other CPU."""
    if config.precision != "auto":
        return Precision(config.precision, *PRECISION_DTYPES[config.precision], "asked for")
    if device.startswith("cuda"):
        return Precision("bf16", *PRECISION_DTYPES["bf16"], "auto: a CUDA device")
    units = cpu_native_bf16()
    if units:
        return Precision("bf16_head", *PRECISION_DTYPES["bf16_head"],
                         f"auto: a CPU with native bf16 ({', '.join(units)})")
    return Precision("fp32", *PRECISION_DTYPES["fp32"], "auto: a CPU without native bf16 (AMX or AVX512-BF16)")


def resolve_dtype(config: RunSettings, device: str) -> torch.dtype:
    """The LM's dtype (the LM stays fp32 under bf16_head)."""
    return resolve_precision(config, device).lm


def open_foundation(config: RunSettings, device: str, dtype: torch.dtype) -> Foundation:
    """The run's frozen LM on `device` (split over config.num_gpus GPUs unless it is the CPU)."""
    num_gpus = 0 if device == "cpu" else max(1, config.num_gpus)
    foundation = load_foundation(config.lm_name, config.lm_size, lm_path=config.lm_path,
                                 lm_cache_dir=config.lm_cache_dir, num_gpus=num_gpus, dtype=dtype)
    if config.hook_memory_layer >= foundation.num_blocks:
        raise ConfigError("hook_memory_layer", config.hook_memory_layer,
                          f"{foundation.name} has blocks 0..{foundation.num_blocks - 1}")
    return foundation
