"""Where the keys lead: the perplexity landscape over a plane of 2-d keys (eval/landscape.json),
and the memory-selection statistics (eval/selection_stats.json, eval/length_vs_l0.json with
the Pearson R of L0 against document length)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

import wikitext
from document_memories import DocumentMemory
from utils import selection_stats


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None where it is undefined (fewer than 2 points, or a constant input)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equal-length 1-d sequences, got shapes {a.shape} and {b.shape}")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.clip(np.corrcoef(a, b)[0, 1], -1.0, 1.0))


def landscape_axis(keys: np.ndarray, grid: int) -> np.ndarray:
    """Grid coordinates: [-1, 1] by default; wider (symmetric, 10% margin) if a key lies outside."""
    reach = float(np.abs(keys).max()) if keys.size else 0.0
    half = 1.0 if reach <= 1.0 else reach * 1.1
    return np.linspace(-half, half, grid)


def grid_keys(axis: np.ndarray) -> torch.Tensor:
    """All (x, y) keys of the grid, (grid*grid, 2), y-major: reshape(grid, grid) gives [y, x]."""
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    return torch.tensor(np.stack([xs.ravel(), ys.ravel()], axis=1), dtype=torch.float32)


def grid_minimum(values: np.ndarray, axis: np.ndarray) -> dict[str, Any]:
    """Where the smallest value of a [y, x] grid lies."""
    yi, xi = np.unravel_index(int(np.nanargmin(values)), values.shape)
    return {"x_index": int(xi), "y_index": int(yi), "key": [float(axis[xi]), float(axis[yi])],
            "value": float(values[yi, xi])}


def compute_landscape(ce_of: Callable[[int, torch.Tensor], list[float]], keys: np.ndarray, grid: int,
                      on_document: Callable[[int, dict[str, Any], np.ndarray], None] | None = None
                      ) -> dict[str, Any]:
    """Perplexity of each document over a grid of 2-d keys.

    ce_of(doc, keys (K, 2)) -> K mean CEs of that document under each key. Returns axis,
    perplexity[doc][y][x] and per document its minimum and its relation to the keys;
    on_document(doc, entry, axis) is called with each document's entry as soon as it is complete."""
    keys = np.asarray(keys, dtype=float)
    if keys.ndim != 2 or keys.shape[1] != 2:
        raise ValueError(f"the landscape needs 2-d keys, got shape {keys.shape}")
    axis = landscape_axis(keys, grid)
    candidates = grid_keys(axis)
    documents = []
    for doc in range(len(keys)):
        ce = np.asarray(ce_of(doc, candidates), dtype=float).reshape(grid, grid)
        ppl = np.exp(np.minimum(ce, 80.0))  # exp(80) ~ 5e34: keeps JSON finite
        low = grid_minimum(ppl, axis)
        distances = np.linalg.norm(keys - np.asarray(low["key"]), axis=1)
        documents.append({
            "perplexity": ppl.tolist(), "minimum": low, "own_key": keys[doc].tolist(),
            "distance_minimum_to_own_key": float(distances[doc]),
            "nearest_key_to_minimum": int(np.argmin(distances)),
            "minimum_nearest_own_key": bool(np.argmin(distances) == doc),
        })
        if on_document is not None:
            on_document(doc, documents[-1], axis)
    return {"axis": axis.tolist(), "documents": documents}


# ---- the measurements of one run (eval/selection_stats.json, length_vs_l0.json, landscape.json) --

def selection_report(memory: DocumentMemory, history: list[dict], l0_threshold: float
                     ) -> tuple[dict[str, Any], torch.Tensor | None]:
    """selection_stats.json: the statistics over the epochs (metrics.jsonl) and of the final
    memory; and the final selections (documents x entries), None for a shared memory."""
    keyed = memory.config.use_keys
    selections, final = None, None
    if keyed:
        with torch.no_grad():
            selections = memory.selection(memory.doc_keys.detach()).float().cpu()
        final = selection_stats(selections, l0_threshold)
    per_epoch = [{k: h.get(k) for k in ("epoch", "l0", "l2", "pairwise_distance", "normalized_distance")}
                 for h in history if h.get("l0") is not None]
    report = {"l0_threshold": l0_threshold, "final": final, "per_epoch": per_epoch,
              "note": None if keyed else "a shared memory has no per-document selection"}
    return report, selections


def length_report(selections: torch.Tensor | None, lengths: list[int], documents: Sequence[wikitext.Document],
                  l0_threshold: float) -> dict[str, Any]:
    """length_vs_l0.json: each document's length in tokens and L0, and their Pearson R."""
    titles = [d.title for d in documents]
    if selections is None:
        return {"skipped": True, "reason": "a shared memory has no per-document selection",
                "documents": [{"title": t, "tokens": length} for t, length in zip(titles, lengths)]}
    l0 = (selections[:len(documents)].abs() > l0_threshold).sum(dim=1).tolist()
    r = pearson_r(lengths, l0)
    return {"l0_threshold": l0_threshold, "pearson_r": r,
            "r_note": None if r is not None else "undefined: fewer than 2 documents, or L0 or length is constant",
            "documents": [{"title": t, "tokens": length, "segments": len(doc.segments), "l0": int(k)}
                          for t, length, doc, k in zip(titles, lengths, documents, l0)]}


def landscape_skipped(memory: DocumentMemory, grid: int) -> str | None:
    """Why the landscape cannot be drawn for this memory and grid (None: it can)."""
    if not memory.config.use_keys:
        return "a shared memory has no keys"
    if grid == 0:
        return "--grid 0"
    if memory.config.key_dim != 2:
        return (f"key_dim is {memory.config.key_dim}; the landscape is drawn over a plane of keys and needs "
                "key_dim 2")
    return None
