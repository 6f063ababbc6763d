"""Data parallelism over documents with torch.distributed (launched by torchrun).

Every process holds the whole frozen LM and the same memory; each works on its own documents
of every step's global batch (see batching.py) and DistributedDataParallel averages the
memory's gradients. Rank 0 alone writes outputs and checkpoints. Without torchrun (no
WORLD_SIZE in the environment) everything here is a no-op for one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where a collective's tensors must live: NCCL takes CUDA tensors only, gloo CPU ones

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean over processes of each value (for metrics)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()  # tolist copies to the host itself

    def broadcast_object(self, obj: object) -> object:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(use_cuda: bool) -> DistContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank,
                       device=f"cuda:{local_rank}" if use_cuda else "cpu")


def wrap_memory(memory: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around the memory; a shared memory (no keys) leaves its key gate unused."""
    if not ctx.enabled:
        return memory
    device = next(memory.parameters()).device
    return nn.parallel.DistributedDataParallel(
        memory, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=not memory.config.use_keys)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
