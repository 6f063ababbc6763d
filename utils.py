"""Small pieces of the method shared by training and evaluation: seeding,
negative keys, the guidance term, memory-selection statistics, the logit lens and the cells of
the reports' markdown tables."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- negative keys --------------------------------------------------------------------------

def negative_keys(kind: str, doc_ids: torch.Tensor, doc_keys: torch.Tensor, generator: torch.Generator,
                  delta: float = 0.1) -> torch.Tensor:
    """One negative key per row: (B,) document ids -> (B, key_dim).

    Rows of the same document share one draw (the released code draws once per batch, and a
    batch holds one document). Random numbers come from `generator` on the CPU, so a seeded
    run is reproducible on any device.
    """
    keys = doc_keys.detach()
    ids = doc_ids.detach().cpu()
    unique, inverse = torch.unique_consecutive(ids, return_inverse=True)
    n_docs, key_dim = keys.shape
    if kind == "other":
        if n_docs < 2:
            raise ValueError("negative_key_type 'other' needs at least 2 documents")
        # uniform over the other documents: draw from n-1 and skip the document itself
        draw = torch.randint(0, n_docs - 1, (len(unique),), generator=generator)
        draw = draw + (draw >= unique).long()
        chosen = keys[draw.to(keys.device)]
    elif kind == "random":
        chosen = torch.randn(len(unique), key_dim, generator=generator).to(keys)
    elif kind == "zero":
        chosen = torch.zeros(len(unique), key_dim).to(keys)
    elif kind == "perturb":
        own = keys[unique.to(keys.device)]
        noise = torch.randn(len(unique), key_dim, generator=generator).to(keys)
        chosen = own + noise * own.max(dim=-1, keepdim=True).values * delta
    else:
        raise ValueError(f"unknown negative key type {kind!r}; allowed: other, random, zero, perturb")
    return chosen[inverse.to(keys.device)]


def guidance_term(ce_positive: torch.Tensor, ce_negative: torch.Tensor, target: float, kind: str) -> torch.Tensor:
    """clamped_mse (released code): min((CE_neg - tau)^2, CE_pos); abs (paper text): |tau - CE_neg|."""
    if kind == "clamped_mse":
        return torch.minimum((ce_negative - target) ** 2, ce_positive)
    if kind == "abs":
        return (target - ce_negative).abs()
    raise ValueError(f"unknown guidance loss {kind!r}; allowed: clamped_mse, abs")


# ---- memory-selection statistics ------------------------------------------------------------

def selection_stats(selections: torch.Tensor, l0_threshold: float = 1e-2) -> dict[str, float]:
    """Means over documents of L0 (entries with |s| > threshold), L2 norm, the mean pairwise
    distance ||s_i - s_j|| and that distance over the mean L2 norm. selections: (n, m)."""
    s = selections.detach().float()
    l0 = (s.abs() > l0_threshold).float().sum(dim=1).mean().item()
    l2 = s.norm(dim=1).mean().item()
    n = s.shape[0]
    if n > 1:
        dist = torch.cdist(s, s)
        pairwise = (dist.sum() / (n * (n - 1))).item()
    else:
        pairwise = 0.0
    return {"l0": l0, "l2": l2, "pairwise_distance": pairwise,
            "normalized_distance": pairwise / l2 if l2 > 0 else 0.0}


# ---- logit lens -----------------------------------------------------------------------------

def final_norm(decoder: nn.Module) -> nn.Module:
    """The decoder's final normalisation (GPT-NeoX: final_layer_norm, Llama: norm, GPT-2: ln_f)."""
    for name in ("final_layer_norm", "norm", "ln_f", "final_norm"):
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


@torch.no_grad()
def logit_lens(readouts: torch.Tensor, norm: nn.Module, head: nn.Module, tokenizer, top_k: int = 20
               ) -> list[list[tuple[str, float]]]:
    """Each row of `readouts` (n, d) through the final norm and output layer: top-k (token, logit)."""
    weight = head.weight
    hidden = norm(readouts.to(device=weight.device, dtype=weight.dtype))
    hidden = hidden.to(weight.dtype)  # a norm may answer in fp32 (CUDA autocast's rule)
    if type(head) is nn.Linear and head.bias is None:
        # (V, d) @ (d, n) reads the vocabulary matrix once in its own row order: for a handful of rows
        # faster on a CPU than hidden @ W.T (the same logits up to float rounding)
        logits = (weight @ hidden.T).T.float()
    else:
        logits = head(hidden).float()
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    return [[(tokenizer.decode([int(i)]), float(v)) for v, i in zip(row_v, row_i)]
            for row_v, row_i in zip(values.cpu(), indices.cpu())]


def table_cell(value: object, digits: int = 3, *, none: str = "–", grouped: bool = False) -> str:
    """A markdown table cell: None as `none`, a bool as yes / no, a float to `digits` places, anything
    else as str. grouped: commas between thousands, and a float of 1000 or more without decimals."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if grouped and abs(value) >= 1000 else f"{value:.{digits}f}"
    if isinstance(value, int) and grouped:
        return f"{value:,}"
    return str(value)
