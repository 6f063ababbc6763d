"""Training checkpoints: one safetensors file per run, written atomically, loaded without pickle.

    run_N/checkpoint.safetensors
        tensors   memory.<name>               the memory module's state_dict (fp32)
                  optimizer.<i>.<key>         AdamW state of trainable parameter i (exp_avg, exp_avg_sq, step)
                  rng.torch, rng.generator    torch CPU RNG state, the negative-key generator's state
                  rng.numpy                   numpy's MT19937 key; rng.cuda.<i> per GPU when CUDA is used
        metadata  "docmem": JSON with everything else: counters (epoch, batch, step), the partial
                  epoch sums, metrics so far, the initial evaluation, optimizer param groups and
                  scalar state, scheduler state, python/numpy RNG scalars, the memory config;
                  "docmem_sha256": a SHA-256 of every tensor and that JSON (so a flipped byte
                  is caught, not trained on).

It is written to a temporary file in the run folder, flushed to disk and renamed over the old
one (os.replace), so a kill at any instant leaves the previous checkpoint whole. Loading reads
only safetensors and JSON: no code runs. Every problem is a CheckpointError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes

from docmem.config import TrainConfig
from docmem.errors import CheckpointError, ConfigError
from docmem.optimizer_step import keep_foreach
from docmem.run_folder import SUMMARY_NAME, write_atomic
from document_memories import DocumentMemory

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "docmem-checkpoint"
VERSION = 1
_META_KEY = "docmem"
_SHA_KEY = "docmem_sha256"


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def state(self) -> dict[str, Any]:
        """Counters and metrics: epoch, batch, step, sums, history, initial, wall_seconds."""
        return self.meta["state"]

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


# ---- writing ---------------------------------------------------------------------------------

def _plain(value: Any, where: str) -> Any:
    """value as JSON-able primitives (tuples become lists); anything else is a bug, not pickled."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} cannot go into a checkpoint's JSON")


def _digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the metadata JSON."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(meta_json.encode())
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, memory: DocumentMemory, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                    state: dict[str, Any], use_cuda: bool = False) -> Path:
    """Write run_dir/checkpoint.safetensors atomically; returns its path."""
    path = checkpoint_path(run_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in memory.state_dict().items():
        tensors[f"memory.{name}"] = t.detach().to("cpu").contiguous().clone()
        if not torch.isfinite(tensors[f"memory.{name}"]).all():
            raise ValueError(f"memory tensor {name} is not finite: refusing to checkpoint it")
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in opt["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                opt_scalars.setdefault(str(index), {})[key] = _plain(value, f"optimizer.{index}.{key}")
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_keys, dtype=np.int64))
    if use_cuda and torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = cuda_state
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "format": FORMAT, "version": VERSION,
        "memory_config": memory.config.to_dict(),
        "trainable": [name for name, p in memory.named_parameters() if p.requires_grad],
        "state": _plain(state, "state"),
        "optimizer": {"param_groups": _plain(opt["param_groups"], "param_groups"), "scalars": opt_scalars},
        "scheduler": _plain(scheduler.state_dict(), "scheduler"),
        "rng": {"python": [py_version, list(py_state), py_gauss],
                "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]},
    }
    meta_json = json.dumps(meta, allow_nan=True)
    data = save_bytes(tensors, metadata={_META_KEY: meta_json, _SHA_KEY: _digest(tensors, meta_json)})
    return write_atomic(path, data)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Temporary files of a checkpoint write that was killed half-way."""
    for tmp in Path(run_dir).glob(f".{CHECKPOINT_NAME}.*.tmp"):
        tmp.unlink(missing_ok=True)


# ---- reading ---------------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint file (format, checksum, required entries). No pickle."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            raw_meta, checksum = header.get(_META_KEY), header.get(_SHA_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({err})") from err
    if raw_meta is None:
        raise CheckpointError(f"{path}: not a docmem checkpoint (no '{_META_KEY}' metadata)")
    if checksum != _digest(tensors, raw_meta):
        raise CheckpointError(f"{path}: its contents do not match the checksum written with them "
                              "(the file was modified or corrupted)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({err})") from err
    ckpt = Checkpoint(path, tensors, meta if isinstance(meta, dict) else {})
    if ckpt.meta.get("format") != FORMAT:
        raise ckpt.error(f"not a docmem checkpoint (format {ckpt.meta.get('format')!r})")
    if ckpt.meta.get("version") != VERSION:
        raise ckpt.error(f"checkpoint version {ckpt.meta.get('version')!r}; this docmem reads version {VERSION}")
    for key in ("memory_config", "trainable", "state", "optimizer", "scheduler", "rng"):
        if key not in ckpt.meta:
            raise ckpt.error(f"metadata entry {key!r} is missing")
    for name in ("rng.torch", "rng.generator", "rng.numpy"):
        if name not in tensors:
            raise ckpt.error(f"tensor {name} is missing")
    state = ckpt.meta["state"]
    if not isinstance(state, dict):
        raise ckpt.error("metadata entry 'state' is not a mapping")
    for key in ("epoch", "batch", "step"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ckpt.error(f"counter {key!r} is {value!r}, expected an integer >= 0")
    if not isinstance(state.get("history"), list) or len(state["history"]) != state["epoch"]:
        raise ckpt.error(f"metrics of {len(state.get('history') or [])} epochs for a checkpoint at "
                         f"epoch {state['epoch']}")
    # the initial evaluation has no negative CE where there are no negatives (a shared memory): None
    for key, optional in (("sums", False), ("initial", True)):
        entry = state.get(key)
        if not isinstance(entry, dict) or not all(isinstance(v, (int, float)) or (optional and v is None)
                                                  for v in entry.values()):
            raise ckpt.error(f"state entry {key!r} is missing or not a mapping of numbers")
    if not isinstance(state.get("wall_seconds", 0.0), (int, float)):
        raise ckpt.error("state entry 'wall_seconds' is not a number")
    return ckpt


def restore_checkpoint(ckpt: Checkpoint, memory: DocumentMemory, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                       num_batches: int) -> dict[str, Any]:
    """Load the checkpoint into freshly built training objects, after checking it fits them.
    Returns the counters and metrics (Checkpoint.state)."""
    saved_config = ckpt.meta["memory_config"]
    if not isinstance(saved_config, dict):
        raise ckpt.error("memory_config is not a mapping")
    for key, what in (("hidden_size", "the LM's hidden size"), ("num_docs", "the run's number of documents"),
                      ("memory_dim", "--hook_memory_dim"), ("key_dim", "--key_dim")):
        if saved_config.get(key) != getattr(memory.config, key):
            raise ckpt.error(f"{key} {saved_config.get(key)!r} does not match {what} {getattr(memory.config, key)}")
    if saved_config != memory.config.to_dict():
        raise ckpt.error(f"memory config {saved_config} does not match this run's {memory.config.to_dict()}")

    # the memory's parameters
    expected = memory.state_dict()
    found = {name.removeprefix("memory."): t for name, t in ckpt.tensors.items() if name.startswith("memory.")}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ckpt.error(f"memory tensors missing {missing}, unexpected {unexpected}")
    for name, t in found.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise ckpt.error(f"tensor memory.{name} is {t.dtype} {tuple(t.shape)}, expected "
                             f"{expected[name].dtype} {tuple(expected[name].shape)}")
    trainable = [name for name, p in memory.named_parameters() if p.requires_grad]
    if ckpt.meta["trainable"] != trainable:
        raise ckpt.error(f"trainable parameters {ckpt.meta['trainable']} do not match this run's {trainable}")

    # the optimizer: per-parameter state, checked against each parameter's shape
    params = memory.trainable_parameters()
    opt_meta = ckpt.meta["optimizer"]
    try:
        groups = opt_meta["param_groups"]
        scalars = opt_meta["scalars"]
        ids = [i for group in groups for i in group["params"]]
        if sorted(ids) != list(range(len(params))):
            raise ckpt.error(f"optimizer state for parameters {ids}, this run trains {len(params)}")
        opt_state: dict[int, dict[str, Any]] = {}
        for name, t in ckpt.tensors.items():
            if not name.startswith("optimizer."):
                continue
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = t
        for index, values in scalars.items():
            opt_state.setdefault(int(index), {}).update(values)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise ckpt.error(f"malformed optimizer state ({type(err).__name__}: {err})") from err
    for index, values in opt_state.items():
        if not 0 <= index < len(params):
            raise ckpt.error(f"optimizer state for parameter {index}, this run trains {len(params)}")
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[index].shape:
                raise ckpt.error(f"tensor optimizer.{index}.{key} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(params[index].shape)} ({trainable[index]})")
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        keep_foreach(optimizer)
        scheduler.load_state_dict(dict(ckpt.meta["scheduler"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ckpt.error(f"optimizer or scheduler state does not fit ({type(err).__name__}: {err})") from err

    state = ckpt.state
    if state["batch"] >= num_batches:
        raise ckpt.error(f"batch counter {state['batch']} but an epoch of this run has {num_batches} batches")

    # everything checked: now change the objects
    with torch.no_grad():
        memory.load_state_dict({name: t for name, t in found.items()})
    try:
        generator.set_state(ckpt.tensors["rng.generator"])
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        np_name, np_pos, np_has_gauss, np_gauss = ckpt.meta["rng"]["numpy"]
        np.random.set_state((np_name, ckpt.tensors["rng.numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss,
                             np_gauss))
        py_version, py_state, py_gauss = ckpt.meta["rng"]["python"]
        random.setstate((py_version, tuple(py_state), py_gauss))
        cuda_states = [ckpt.tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                       if f"rng.cuda.{i}" in ckpt.tensors]
        if cuda_states and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ckpt.error(f"malformed random-number-generator state ({type(err).__name__}: {err})") from err
    return state


def checkpoint_to_resume(run_dir: Path, config: TrainConfig) -> Checkpoint | None:
    """The run's checkpoint, verified, or None when it was stopped before writing one (it then
    starts over in place). Errors come before any model or data loads."""
    remove_stale_temporaries(run_dir)
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    ckpt = read_checkpoint(path)
    epoch = ckpt.state["epoch"]
    if epoch > config.num_epochs:
        raise ConfigError("num_epochs", config.num_epochs, f"the run in {run_dir} has already trained {epoch} epochs")
    if epoch == config.num_epochs and (run_dir / SUMMARY_NAME).exists():
        raise ConfigError("resume", str(run_dir), f"the run has finished its {epoch} epochs; give a larger "
                                                  "--num_epochs to train it further")
    return ckpt
