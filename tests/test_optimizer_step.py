"""One optimizer step for the memory and the LoRA baselines (docmem/optimizer_step.py): each group
clipped on its own, a non-finite loss named before the norm it makes, nothing stepped on a refusal."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from docmem import optimizer_step
from docmem.errors import NonFiniteLoss


def groups_with_grads(*grads: list[float]) -> list[tuple[str, list[nn.Parameter]]]:
    out = []
    for i, g in enumerate(grads):
        p = nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        out.append((f"doc_{i:02d}", [p]))
    return out


def optimizer_of(groups):
    optimizer = torch.optim.SGD([p for _, ps in groups for p in ps], lr=1.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_each_group_is_clipped_on_its_own():
    groups = groups_with_grads([3.0, 4.0], [0.3, 0.4])  # norms 5 and 0.5
    optimizer, scheduler = optimizer_of(groups)
    optimizer_step.step(optimizer, scheduler, groups, clip=1.0, where="here")
    first, second = (ps[0].detach() for _, ps in groups)
    assert torch.allclose(first, torch.tensor([-0.6, -0.8]))  # clipped to norm 1, one SGD step
    assert torch.allclose(second, torch.tensor([-0.3, -0.4]))  # under the clip: unchanged gradient


def test_the_values_are_read_and_checked_before_the_norm():
    groups = groups_with_grads([math.nan, 1.0])
    optimizer, scheduler = optimizer_of(groups)
    seen = []

    def check(values):
        seen.append(values)
        raise NonFiniteLoss("non-finite loss (loss = nan) here")

    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss"):
        optimizer_step.step(optimizer, scheduler, groups, 0.0, "here", [torch.tensor(math.nan), 2.0, None], check)
    assert math.isnan(seen[0][0]) and seen[0][1:] == [2.0, None]
    assert torch.equal(groups[0][1][0].detach(), torch.zeros(2))  # not stepped


def test_a_non_finite_norm_names_its_adapter_and_steps_nothing():
    groups = groups_with_grads([1.0, 1.0], [math.inf, 0.0])
    optimizer, scheduler = optimizer_of(groups)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite gradient norm of adapter doc_01 \((inf|nan)\) at step 3$"):
        optimizer_step.step(optimizer, scheduler, groups, 5.0, "at step 3")
    assert all(torch.equal(ps[0].detach(), torch.zeros(2)) for _, ps in groups)


def test_a_group_without_gradients_is_left_out():
    groups = groups_with_grads([1.0])
    idle = nn.Parameter(torch.ones(2))
    groups.append(("doc_01", [idle]))
    optimizer, scheduler = optimizer_of(groups)
    assert optimizer_step.step(optimizer, scheduler, groups, 1.0, "here", [torch.tensor(0.5)]) == [0.5]
    assert torch.equal(idle.detach(), torch.ones(2)) and groups[0][1][0].grad is None  # zeroed after the step
