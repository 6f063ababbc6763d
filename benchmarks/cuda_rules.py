"""CUDA autocast's dtype rules on the CPU: a context manager that makes CPU autocast run the ops
of CUDA's "autocast to float32" list that this project uses in fp32, as CUDA does.

CPU autocast keeps layer_norm, softmax and log_softmax in the input's dtype (bf16 stays bf16);
CUDA autocast runs them in fp32 and returns fp32. Code that works on the CPU can so hand an fp32
tensor to a bf16 weight on a GPU and fail ("expected m1 and m2 to have the same dtype"). Inside
imitate_cuda_autocast(), while a CPU autocast region is active, these ops cast their floating
inputs to fp32 and return fp32, so CPU tests see what a GPU will. Outside an autocast region
(or outside the context) nothing changes. Not thread-safe: it swaps module attributes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn import functional

# (owner, attribute) of each op that CUDA autocast runs in fp32 and the project's code paths call
# (the LM's norms and attention, the chunked CE, the reference loss, generation's sampling).
FP32_OPS: tuple[tuple[Any, str], ...] = (
    (functional, "layer_norm"), (torch, "layer_norm"),
    (functional, "group_norm"), (torch, "group_norm"),
    (functional, "softmax"), (torch, "softmax"), (torch.Tensor, "softmax"),
    (functional, "log_softmax"), (torch, "log_softmax"), (torch.Tensor, "log_softmax"),
    (functional, "cross_entropy"), (functional, "nll_loss"), (functional, "mse_loss"),
    (functional, "softplus"), (functional, "normalize"), (torch, "cdist"),
)


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _fp32_under_autocast(op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_autocast_enabled("cpu"):
            return op(*args, **kwargs)
        # CUDA's fp32 policy: floating inputs (weights too) cast to fp32, the op run outside autocast
        with torch.autocast("cpu", enabled=False):
            return op(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})

    wrapped.__wrapped_by_cuda_rules__ = True  # type: ignore[attr-defined]
    return wrapped


@contextmanager
def imitate_cuda_autocast() -> Iterator[None]:
    """Within: CPU autocast runs FP32_OPS in fp32 as CUDA autocast does. Restored on exit."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in FP32_OPS]
    try:
        for owner, name, op in originals:
            if not getattr(op, "__wrapped_by_cuda_rules__", False):  # nested use: wrap once
                setattr(owner, name, _fp32_under_autocast(op))
        yield
    finally:
        for owner, name, op in originals:
            setattr(owner, name, op)
