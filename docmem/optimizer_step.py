"""One optimizer step, the same for the memory and the LoRA baselines: clip each group of
parameters on its own, read the step's numbers and the gradient norms on the host in one copy,
refuse what is not finite before the weights take it, then step, schedule and zero."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from docmem.errors import NonFiniteLoss
from docmem.step_values import read_on_host

ParameterGroup = tuple[str, Sequence[nn.Parameter]]  # (name in messages, "" for the memory; its parameters)


def adamw(params: Sequence[nn.Parameter], lr: float, capturable: bool = False) -> torch.optim.AdamW:
    """The training's AdamW, with one operation per step for all parameters at once (foreach), as torch
    picks on a GPU: its CPU default is a Python loop over the parameters, which at one row a step costs
    more than the arithmetic. Both give the same numbers, bit for bit. capturable: its step counts kept on
    the device, so a CUDA graph can hold the step (--cuda_graphs)."""
    return torch.optim.AdamW(params, lr=lr, foreach=True, capturable=capturable)


def keep_foreach(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict: the checkpoint's param groups carry the foreach and capturable choices of
    the run that wrote it; keep this optimizer's own."""
    for group in optimizer.param_groups:
        group["foreach"] = optimizer.defaults.get("foreach")
        group["capturable"] = optimizer.defaults.get("capturable", False)
    for param, state in optimizer.state.items():  # a capturable step counts on the device, else on the host
        if isinstance(state.get("step"), torch.Tensor):
            capturable = optimizer.defaults.get("capturable", False)
            state["step"] = state["step"].to(device=param.device if capturable else "cpu", dtype=torch.float32)


def group_norm(params: Sequence[nn.Parameter], clip: float) -> torch.Tensor | None:
    """The group's gradient norm, clipped to `clip` (0: measured only); None when nothing has a gradient."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return None
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in grads])


def step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
         groups: Sequence[ParameterGroup], clip: float, where: str,
         values: Sequence[torch.Tensor | float | None] = (),
         check: Callable[[list[float | None]], None] | None = None) -> list[float | None]:
    """Clip, read once, check, step, zero. `values` (a step's loss parts) are read with the norms and
    handed to `check` first, so a non-finite loss is named before the norm it makes; returns them as
    floats."""
    norms = [(name, norm) for name, params in groups if (norm := group_norm(params, clip)) is not None]
    read = read_on_host([*values, *(norm for _, norm in norms)])
    read_values, read_norms = read[:len(values)], read[len(values):]
    if check is not None:
        check(read_values)
    for (name, _), value in zip(norms, read_norms):
        if not math.isfinite(value):
            of = f" of adapter {name}" if name else ""
            raise NonFiniteLoss(f"non-finite gradient norm{of} ({value}) {where}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return read_values
