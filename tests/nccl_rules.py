"""NCCL's device rule on the CPU: a context manager under which torch.distributed behaves, for the
project's own collectives, as an NCCL group does, while the group underneath is gloo.

NCCL takes CUDA tensors only; gloo, which the CPU tests use, takes CPU tensors. Code that hands a
collective a CPU tensor so passes every CPU test and fails on the first multi-GPU run. Inside
imitate_nccl():
- init_process_group(backend="nccl") starts a gloo group, and torch.cuda.set_device is a no-op;
- a tensor created with device "cuda..." is made on the CPU and marked as "on the GPU", and so is
  every tensor computed from a marked one, until .cpu() or .to("cpu") copies it back;
- the collectives that code calls through torch.distributed (all_reduce, broadcast, reduce,
  all_gather) refuse an unmarked tensor with NCCL's complaint, and run on gloo otherwise.
Objects sent with broadcast_object_list are left alone: torch places them by the backend itself.
Not thread-safe: it swaps module attributes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

MARK = "_imitated_cuda"
COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather")
TO_HOST = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy}


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def on_imitated_gpu(t: torch.Tensor) -> bool:
    return bool(getattr(t, MARK, False))


class _ImitatedCudaTensors(TorchFunctionMode):
    """Tensors asked for on "cuda" are made on the CPU and marked; results of marked inputs stay marked."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        to_gpu = _is_cuda(kwargs.get("device"))
        if to_gpu:
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:  # .to("cuda"), .to(device="cuda"), .to("cpu")
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if target is not None:
                to_gpu = _is_cuda(target)
                args = tuple("cpu" if isinstance(a, (str, torch.device)) else a for a in args)
                out = func(*args, **kwargs)
                if to_gpu:  # a fresh tensor, so the source keeps its own placement
                    out = out.clone() if out is args[0] else out
                    setattr(out, MARK, True)
                elif on_imitated_gpu(args[0]):
                    out = out.clone()  # back on the host: unmarked
                return out
        marked_input = any(on_imitated_gpu(t) for t in _tensors(list(args) + list(kwargs.values())))
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            return out.clone() if out is args[0] else out
        if func in TO_HOST:
            return out
        if (to_gpu or marked_input) and isinstance(out, torch.Tensor):
            setattr(out, MARK, True)
        return out


def _refusing_host_tensors(name: str, op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        for t in _tensors(list(args) + list(kwargs.values())):
            if not on_imitated_gpu(t):
                raise RuntimeError(f"imitated NCCL: {name} got a tensor on {t.device}; "
                                   "NCCL takes CUDA tensors only (Tensors must be CUDA and dense)")
        return op(*args, **kwargs)

    return wrapped


@contextmanager
def imitate_nccl() -> Iterator[None]:
    """Within: the project's collectives obey NCCL's device rule on a gloo group. Restored on exit."""
    saved = [(dist, name, getattr(dist, name)) for name in (*COLLECTIVES, "init_process_group")]
    saved.append((torch.cuda, "set_device", torch.cuda.set_device))
    real_init = dist.init_process_group

    def init_process_group(backend: str | None = None, **kwargs: Any) -> None:
        real_init(backend="gloo" if backend == "nccl" else backend, **kwargs)

    try:
        for name in COLLECTIVES:
            setattr(dist, name, _refusing_host_tensors(name, getattr(dist, name)))
        dist.init_process_group = init_process_group
        torch.cuda.set_device = lambda device: None
        with _ImitatedCudaTensors():
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
