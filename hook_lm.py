"""Attach a document memory to one block of a frozen LM with a forward hook.

    with attach_memory(foundation.block(15), memory, keys) as hook:
        loss = model(**batch).loss          # every pass through block 15 goes through memory
        hook.keys = other_keys              # switch documents without re-attaching

The hook is removed in `finally`, whatever happens inside the block. Errors raised by the
memory propagate (the released code printed and swallowed them, so a broken memory
silently trained nothing). Blocks may return a tensor (transformers 5) or a tuple whose
first element is the hidden state (older releases); both are handled.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from document_memories import DocumentMemory


@dataclass
class MemoryHook:
    memory: DocumentMemory
    keys: torch.Tensor | None = None  # None: memory without a key
    enabled: bool = True  # False: the block's output passes unchanged (plain LM)
    calls: int = 0  # how many times the memory ran (checks that generate() goes through it)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return hidden
        self.calls += 1
        return self.memory(hidden, self.keys)

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return self.apply(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.apply(output[0]),) + output[1:]
        raise TypeError(f"cannot hook a block that returns {type(output).__name__}; expected a tensor or a tuple")


@contextmanager
def attach_memory(block: nn.Module, memory: DocumentMemory, keys: torch.Tensor | None = None) -> Iterator[MemoryHook]:
    hook = MemoryHook(memory=memory, keys=keys)
    handle = block.register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()
