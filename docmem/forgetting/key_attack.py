"""The key-search attack on a forgotten document: gradient descent on the key, from many starts,
minimising the document's mean token CE; and how much of its text greedy generation then reproduces.

Starts: the document's old key, every key of the memory, random keys (normal, with the spread of
the memory's keys), and for key_dim 2 a grid over the keys' square. Any key_dim works. All starts
descend together (Adam on a (starts, key_dim) tensor: each start's CE depends on its own key only),
and the best CE of every start over every step is kept, so the attack is never worse than its
starts (the old key among them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from docmem.batching import Batch
from docmem.engines import NO_MEMORY, FastEngine
from docmem.evaluation.generation import generate_greedy


@dataclass(frozen=True)
class AttackSettings:
    steps: int = 15
    lr: float = 0.05  # Adam's step on the key, in key units
    random_starts: int = 2
    grid: int = 2  # key_dim 2: grid x grid starts over the keys' square (0: none)
    per_pass: int = 8  # key sets per pass over the upper blocks
    seed: int = 0
    max_key_starts: int = 64  # the memory's keys that start a descent: all up to this many, else those of lowest CE


@dataclass
class AttackResult:
    best_ce: float
    best_key: torch.Tensor  # (key_dim,)
    start_ce: list[float]  # CE at each start, before descent
    labels: list[str]  # what each start was


def attack_starts(old_key: torch.Tensor, keys: torch.Tensor, settings: AttackSettings,
                  key_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str]]:
    """(starts, key_dim) and a label per start: the old key, the memory's keys, random keys and a grid.
    Past settings.max_key_starts keys, only that many of the memory's keys start a descent: those that
    give the document the lowest CE already (key_ce: the document's CE under each key), the attacker's
    best openings, so the attack's cost stops growing with the number of documents."""
    generator = torch.Generator().manual_seed(settings.seed)
    keys = keys.detach().float().cpu()
    spread = float(keys.std()) if keys.numel() > 1 else 1.0
    chosen = list(range(keys.shape[0]))
    if len(chosen) > settings.max_key_starts:
        if key_ce is None or len(key_ce) != len(chosen):
            raise ValueError(f"{len(chosen)} keys, more than max_key_starts {settings.max_key_starts}: "
                             "the document's CE under each key (key_ce) picks the starts")
        chosen = sorted(torch.argsort(key_ce.float(), stable=True)[: settings.max_key_starts].tolist())
    starts = [old_key.detach().float().cpu().reshape(1, -1), keys[chosen]]
    labels = ["old_key"] + [f"key_{j}" for j in chosen]
    randoms = torch.randn(settings.random_starts, keys.shape[1], generator=generator) * spread
    starts.append(randoms)
    labels += [f"random_{i}" for i in range(settings.random_starts)]
    if keys.shape[1] == 2 and settings.grid > 1:
        low, high = float(keys.min()) - 0.5 * spread, float(keys.max()) + 0.5 * spread
        axis = torch.linspace(low, high, settings.grid)
        grid = torch.cartesian_prod(axis, axis)
        starts.append(grid)
        labels += [f"grid_{i}" for i in range(grid.shape[0])]
    return torch.cat(starts), labels


def _ce(engine: FastEngine, batches: Sequence[Batch], keys: torch.Tensor, per_pass: int) -> torch.Tensor:
    """(K,) mean token CE of the document's batches under each of K keys (differentiable in keys)."""
    out = []
    for start in range(0, keys.shape[0], per_pass):
        chunk = keys[start:start + per_pass]
        total, tokens = 0, 0
        for batch in batches:
            rows = batch.input_ids.shape[0]
            n = int((batch.labels[:, 1:] != -100).sum())
            values = engine.losses(batch, [k.expand(rows, -1) for k in chunk])
            total = total + torch.stack(values) * n
            tokens += n
        out.append(total / max(tokens, 1))
    return torch.cat(out)


def attack(engine: FastEngine, batches: Sequence[Batch], starts: torch.Tensor, labels: list[str],
           settings: AttackSettings) -> AttackResult:
    """Descend from every start; the lowest CE seen anywhere, and its key."""
    device = engine.block_device
    keys = starts.clone().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([keys], lr=settings.lr)
    best_ce = torch.full((keys.shape[0],), float("inf"))
    best_key = keys.detach().clone()
    start_ce: list[float] = []
    for step in range(settings.steps + 1):
        ce = _ce(engine, batches, keys, settings.per_pass)
        values = ce.detach().float().cpu()
        if step == 0:
            start_ce = values.tolist()
        better = values < best_ce
        best_ce = torch.where(better, values, best_ce)
        best_key[better.to(device)] = keys.detach()[better.to(device)]
        if step == settings.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        ce.sum().backward()
        optimizer.step()
    i = int(best_ce.argmin())
    return AttackResult(float(best_ce[i]), best_key[i].cpu(), start_ce, labels)


@torch.no_grad()
def verbatim_tokens(foundation, memory, layer: int, prompt_ids: list[int], reference_ids: list[int],
                    key: torch.Tensor | str) -> int:
    """How many tokens greedy generation from the prompt reproduces before it first differs from the text."""
    keys = key.reshape(1, -1).to(memory.doc_keys) if isinstance(key, torch.Tensor) else NO_MEMORY
    out = generate_greedy(foundation, memory, layer, [prompt_ids], keys, len(reference_ids))[0]
    return next((i for i, (a, b) in enumerate(zip(out, reference_ids)) if a != b), min(len(out), len(reference_ids)))
