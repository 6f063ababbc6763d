"""Counting, on the CPU, the operations of a piece of code that would make the host wait for a GPU.

On CUDA, an operation whose result the host needs (a scalar read, a tensor copied back, an output
whose size depends on the data) blocks until every kernel queued before it has run. HostSyncCounter
sees every aten operation (a TorchDispatchMode) and every Tensor.tolist / numpy (a TorchFunctionMode,
since these read memory without an aten call) and counts those. Tensors that live on the host in a
CUDA run as well (document ids, a CPU generator's draws, Adam's step counts) are named up front;
what is computed from host tensors alone stays on the host and is not counted.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# aten operations that read a device value on the host, or whose output size depends on the data
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique_consecutive", "unique_dim",
    "unique_dim_consecutive", "_unique", "_unique2", "equal", "repeat_interleave", "bincount", "histc",
})
# indexing with a boolean mask: the kernel turns the mask into indices (a nonzero) first
MASK_INDEXING_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index"})
READS = frozenset({"tolist", "numpy"})  # Tensor methods that copy to the host without an aten call


def _tensors(*trees: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(trees) if isinstance(t, torch.Tensor)]


def _boolean_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class _Reads(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in READS and not self.counter.on_host(_tensors(args, kwargs)):
            self.counter.counts[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchDispatchMode):
    """with HostSyncCounter(host=[...]) as c: ...; then c.counts (per operation) and c.total."""

    def __init__(self, host: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.host = WeakIdKeyDictionary()
        for t in host:
            self.host[t] = True
        self.reads = _Reads(self)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def on_host(self, tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and all(t in self.host for t in tensors)

    def __enter__(self) -> HostSyncCounter:
        self.reads.__enter__()
        return super().__enter__()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        super().__exit__(kind, err, tb)
        self.reads.__exit__(kind, err, tb)

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = _tensors(args, kwargs)
        host = self.on_host(inputs) or (not inputs and isinstance(kwargs.get("generator"), torch.Generator)
                                        and kwargs["generator"].device.type == "cpu")
        name = func.overloadpacket.__name__
        if not host and (name in SYNC_OPS or name in MASK_INDEXING_OPS and _boolean_index(args)):
            self.counts[f"aten.{name}" + (" (boolean mask)" if name in MASK_INDEXING_OPS else "")] += 1
        out = func(*args, **kwargs)
        if host:  # computed on the host from host tensors alone: it stays there
            for t in _tensors(out):
                self.host[t] = True
        return out
