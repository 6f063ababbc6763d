"""Reading a training step's numbers on the host once: on a GPU, every read makes the host wait
until the queued kernels have run, so a step reads its loss parts and gradient norm in one copy."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def read_on_host(values: Sequence[torch.Tensor | float | None]) -> list[float | None]:
    """The values as Python floats (None stays None), with one copy to the host for all the tensors
    among them. float64 holds every smaller float dtype exactly: the floats are those of .item()."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return list(values)
    device = tensors[0].device
    read = iter(torch.stack([t.detach().to(device=device, dtype=torch.float64) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else v for v in values]
