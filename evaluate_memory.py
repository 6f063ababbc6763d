"""Measure what a trained document memory remembers (METHOD.md section 6, issue 4).

    python evaluate_memory.py --run_dir outputs/demo/run_0 [--prompt_tokens 32 --new_tokens 64 --grid 10]
    python evaluate_memory.py --compare RUN_A RUN_B [...] --out DIR
    python evaluate_memory.py --run_dir RUN --forget DOC      (docmem/forgetting.py: eval/forget_doc_NN.*)

One run: rebuilds the run's frozen LM and documents from its config.yaml, loads its memory/,
and writes into RUN/eval/:

    recall.json, recall.png            ROUGE-1/2/L (recall, precision, F1) of greedy continuations
                                       of each segment's first --prompt_tokens tokens against its
                                       true next tokens, under each condition:
                                         keyed run:  right_key, other_keys (up to --max_other_keys
                                                     other documents' keys each), no_key, no_memory
                                         shared run: memory, no_memory
                                       each continuation is as long as its reference, in tokens
    ce_matrix.json, ce_matrix.png      mean token CE of each document (rows) under each document's
                                       key (columns), plus no_key and no_memory columns
    length_vs_l0.json, .png            per document: L0 of its selection and its length in tokens,
                                       their Pearson R
    landscape.json, landscape.png,     key_dim == 2: perplexity of each document over a grid of keys,
    landscape/doc_NN.png               one heatmap per document, where each minimum lies
    attribution.json                   keyed run: top-1 accuracy of attributing each training segment and
                                       each held-out continuation to its document (docmem/attribution.py)
    selection_stats.json, .png         L0, L2, pairwise and normalised distance over epochs
                                       (metrics.jsonl) and of the final memory
    summary.json                       the headline numbers (what --compare reads)

--compare evaluates the runs that have no eval/ yet, then writes DIR/compare.md, compare.json,
recall.png and selection_stats.png, each run labelled by the config fields that set it apart.
A RUN may also be a save_dir: its newest finished run_N is taken.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

EVAL_DIR = "eval"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MEASURES = ("recall", "precision", "f1")
KEYED_CONDITIONS = ("right_key", "other_keys", "no_key", "no_memory")
SHARED_CONDITIONS = ("memory", "no_memory")
# config fields that say where or how often, not what was trained: never a label in --compare
NON_SEMANTIC_FIELDS = {"save_dir", "save_freq", "top_k_tokens", "cache_budget_gb", "lm_cache_dir", "data_cache_dir",
                       "device", "num_gpus", "reference_loop", "precision"}


class EvalError(RuntimeError):
    """Something about the run or the options that makes evaluation impossible; one line."""


@dataclass
class EvalOptions:
    prompt_tokens: int = 32  # tokens of each segment given as the prompt
    new_tokens: int = 64  # tokens generated (and of reference text scored against)
    grid: int = 10  # landscape: grid x grid keys (0: none; it is the costliest part: grid^2 passes per document)
    l0_threshold: float = 1e-2  # an entry is in use when |s| exceeds this
    max_docs: int | None = None  # evaluate the first N documents only
    max_other_keys: int = 4  # other_keys: at most this many other documents' keys per document
    gen_batch_size: int = 64  # rows per generate() call
    key_sets_per_pass: int = 16  # CE: key sets batched into one suffix pass
    device: str = "auto"  # auto: the run's GPU if it had one and one is here, else cpu
    threads: int = 0  # CPU threads for torch (0: torch's default)

    def validate(self) -> "EvalOptions":
        for name in ("prompt_tokens", "new_tokens", "gen_batch_size", "key_sets_per_pass"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.grid < 2 and self.grid != 0:
            raise EvalError(f"--grid {self.grid}: must be >= 2 (or 0: no landscape)")
        if self.max_other_keys < 1:
            raise EvalError(f"--max_other_keys {self.max_other_keys}: must be >= 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise EvalError(f"--max_docs {self.max_docs}: must be >= 1")
        if self.threads < 0:
            raise EvalError(f"--threads {self.threads}: must be >= 0")
        if not self.l0_threshold >= 0:
            raise EvalError(f"--l0_threshold {self.l0_threshold}: must be >= 0")
        return self


def log(message: str) -> None:
    print(f"[evaluate_memory] {message}", file=sys.stderr, flush=True)


# ---- pure pieces (tested on their own) -------------------------------------------------------

def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, dict[str, float]]]:
    """ROUGE-1/2/L of each prediction against its reference: [{rouge: {recall, precision, f1}}]."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    out = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # score(target, prediction)
        out.append({r: {"recall": scores[r].recall, "precision": scores[r].precision, "f1": scores[r].fmeasure}
                    for r in ROUGE_TYPES})
    return out


def mean_scores(scores: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]] | None:
    """Element-wise mean of rouge_scores() entries; None for an empty list."""
    if not scores:
        return None
    return {r: {m: float(np.mean([s[r][m] for s in scores])) for m in MEASURES} for r in ROUGE_TYPES}


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None where it is undefined (fewer than 2 points, or a constant input)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equal-length 1-d sequences, got shapes {a.shape} and {b.shape}")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.clip(np.corrcoef(a, b)[0, 1], -1.0, 1.0))


def other_documents(doc: int, num_docs: int, limit: int) -> list[int]:
    """Up to `limit` other documents, deterministic and spread evenly over the rest, starting
    with the next one (so every key serves as a wrong key about equally often)."""
    others = [(doc + step) % num_docs for step in range(1, num_docs)]
    if len(others) <= limit:
        return others
    picks = np.linspace(0, len(others) - 1, limit).round().astype(int)
    return [others[i] for i in picks]


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


def compute_landscape(ce_of: Callable[[int, torch.Tensor], list[float]], keys: np.ndarray, grid: int
                      ) -> dict[str, Any]:
    """Perplexity of each document over a grid of 2-d keys.

    ce_of(doc, keys (K, 2)) -> K mean CEs of that document under each key. Returns axis,
    perplexity[doc][y][x] and per document its minimum and its relation to the keys."""
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
    return {"axis": axis.tolist(), "documents": documents}


# ---- loading a run ---------------------------------------------------------------------------

@dataclass
class LoadedRun:
    run_dir: Path
    config: Any  # TrainConfig
    saved: dict  # config.yaml as written (with resolved and documents)
    foundation: Any  # foundations.Foundation
    memory: Any  # document_memories.DocumentMemory
    documents: list  # wikitext.Document, in key order
    dtype: torch.dtype


def resolve_run_dir(path: str | Path) -> Path:
    """A run folder (has config.yaml), or a save_dir: its highest-numbered run_N with a memory."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return path
    if path.is_dir():
        runs = sorted((p for p in path.glob("run_*") if p.name[4:].isdigit() and (p / "memory").is_dir()),
                      key=lambda p: int(p.name[4:]))
        if runs:
            return runs[-1]
        raise EvalError(f"{path}: neither a run folder (no config.yaml) nor a save_dir holding a finished run_N")
    raise EvalError(f"{path}: no such folder")


def read_saved_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise EvalError(f"{run_dir}: no config.yaml (not a run folder written by train_guidance.py)")
    saved = yaml.safe_load(path.read_text())
    if not isinstance(saved, dict):
        raise EvalError(f"{path}: not a mapping")
    return saved


def _device_for(config: Any, requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda:0" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"


FoundationCache = dict[tuple, Any]


def load_run(run_dir: str | Path, options: EvalOptions, foundations: FoundationCache | None = None) -> LoadedRun:
    """The run's LM (from its config), its documents (checked against config.yaml) and its memory."""
    from config import TrainConfig
    from document_memories import MemoryFileError, load_memory
    from foundations import load_foundation
    from train_guidance import load_documents, resolve_dtype

    run_dir = Path(run_dir)
    saved = read_saved_config(run_dir)
    config = TrainConfig.from_dict(saved)
    device = _device_for(config, options.device)
    dtype = resolve_dtype(config, device)
    num_gpus = 0 if device == "cpu" else max(1, config.num_gpus)
    cache_key = (config.lm_name, config.lm_size, config.lm_path, config.lm_cache_dir, num_gpus, str(dtype))
    foundation = (foundations or {}).get(cache_key)
    if foundation is None:
        log(f"loading the LM ({config.lm_path or f'{config.lm_name}-{config.lm_size}'}) on {device}")
        foundation = load_foundation(config.lm_name, config.lm_size, lm_path=config.lm_path,
                                     lm_cache_dir=config.lm_cache_dir, num_gpus=num_gpus, dtype=dtype)
        if foundations is not None:
            foundations[cache_key] = foundation

    documents = load_documents(config)
    expected = [d["title"] if isinstance(d, dict) else str(d) for d in saved.get("documents", [])]
    got = [d.title for d in documents]
    if expected and got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise EvalError(f"{run_dir}: the documents rebuilt from config.yaml differ from those it was trained on "
                        f"(document {first}: {got[first] if first < len(got) else 'none'!r} rebuilt, "
                        f"{expected[first] if first < len(expected) else 'none'!r} trained; {len(got)} vs "
                        f"{len(expected)} documents): the data source or the segmentation code changed")
    for doc, entry in zip(documents, saved.get("documents", [])):
        if isinstance(entry, dict) and "segments" in entry and entry["segments"] != len(doc.segments):
            raise EvalError(f"{run_dir}: document {doc.title!r} has {len(doc.segments)} segments now, "
                            f"{entry['segments']} when trained")

    if config.hook_memory_layer >= foundation.num_blocks:
        raise EvalError(f"{run_dir}: hook_memory_layer {config.hook_memory_layer} is beyond {foundation.name}'s "
                        f"{foundation.num_blocks} blocks")
    block_device = next(foundation.block(config.hook_memory_layer).parameters()).device
    if not (run_dir / "memory").is_dir():
        raise EvalError(f"{run_dir}: no memory/ folder (the run has not finished, or it crashed)")
    try:
        memory = load_memory(run_dir / "memory", device=block_device, expect_hidden_size=foundation.hidden_size,
                             expect_num_docs=len(documents))
    except MemoryFileError as err:
        raise EvalError(str(err)) from err
    memory.eval()
    return LoadedRun(run_dir, config, saved, foundation, memory, documents, dtype)


# ---- generation ------------------------------------------------------------------------------

@dataclass
class Prompt:
    doc: int
    segment: int
    ids: list[int]  # the first prompt_tokens tokens of the segment
    reference_ids: list[int]  # the segment's next (up to new_tokens) tokens
    reference: str  # reference_ids decoded


def segment_prompts(tokenizer, documents: Sequence, prompt_tokens: int, new_tokens: int, max_length: int
                    ) -> tuple[list[Prompt], int]:
    """Every segment split into prompt and reference, tokenized as in training (same special
    tokens, truncated to max_length: the memory saw only those tokens). Segments of fewer than
    prompt_tokens + 1 tokens have nothing to recall: skipped and counted."""
    prompts, skipped = [], 0
    for d, doc in enumerate(documents):
        for s, segment in enumerate(doc.segments):
            ids = tokenizer(segment, truncation=True, max_length=max_length)["input_ids"]
            if len(ids) < prompt_tokens + 1:
                skipped += 1
                continue
            reference_ids = ids[prompt_tokens: prompt_tokens + new_tokens]
            prompts.append(Prompt(d, s, ids[:prompt_tokens], reference_ids,
                                  tokenizer.decode(reference_ids, skip_special_tokens=True)))
    return prompts, skipped


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), padded on the left so every row's last token is real."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def _stop_ids(foundation: Any) -> set[int]:
    found = {foundation.tokenizer.eos_token_id}
    generation = getattr(foundation.model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    found.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in found if i is not None}


@torch.no_grad()
def generate_greedy(foundation: Any, memory: Any, layer: int, prompts: Sequence[Sequence[int]], keys: Any,
                    new_tokens: int | Sequence[int], batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (new token ids, cut at the first end-of-text) with the memory on `layer`.

    keys: a (rows, key_dim) tensor (one key per prompt), None (memory without a key), or
    engines.NO_MEMORY (the plain LM). new_tokens: one count for all rows, or one per row (each
    batch then generates only as far as its longest row needs)."""
    from engines import NO_MEMORY
    from hook_lm import attach_memory

    if isinstance(keys, torch.Tensor) and keys.shape[0] != len(prompts):
        raise ValueError(f"{keys.shape[0]} keys for {len(prompts)} prompts")
    wanted = [new_tokens] * len(prompts) if isinstance(new_tokens, int) else list(new_tokens)
    if len(wanted) != len(prompts):
        raise ValueError(f"{len(wanted)} token counts for {len(prompts)} prompts")
    pad_id = foundation.tokenizer.pad_token_id
    stop = _stop_ids(foundation)
    out: list[list[int]] = []
    with attach_memory(foundation.block(layer), memory) as hook:
        hook.enabled = not (isinstance(keys, str) and keys == NO_MEMORY)
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start: start + batch_size]
            ids, mask = left_pad(rows, pad_id)
            hook.keys = keys[start: start + len(rows)] if isinstance(keys, torch.Tensor) else None
            device = foundation.input_device
            generated = foundation.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                max_new_tokens=max(1, max(wanted[start: start + len(rows)])), min_new_tokens=0, pad_token_id=pad_id, num_beams=1,
                temperature=None, top_p=None, top_k=None)
            for n, row in zip(wanted[start: start + len(rows)], generated[:, ids.shape[1]:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                out.append(row[:min(cut, n)])
    return out


def evaluate_recall(run: LoadedRun, documents: Sequence, options: EvalOptions) -> dict[str, Any]:
    """ROUGE of greedy continuations under every condition, per document and averaged."""
    from engines import NO_MEMORY

    foundation, memory, config = run.foundation, run.memory, run.config
    tokenizer = foundation.tokenizer
    prompts, skipped = segment_prompts(tokenizer, documents, options.prompt_tokens, options.new_tokens,
                                       config.max_length)
    if not prompts:
        raise EvalError(f"every segment is shorter than --prompt_tokens {options.prompt_tokens} + 1 tokens: "
                        "lower --prompt_tokens")
    n_docs = len(documents)
    keyed = config.uses_keys
    doc_keys = memory.doc_keys.detach()[:n_docs]

    # condition -> (rows of (prompt index, key document or None), keys for generate)
    plans: dict[str, tuple[list[tuple[int, int | None]], Any]] = {}
    if keyed:
        rows = [(i, p.doc) for i, p in enumerate(prompts)]
        plans["right_key"] = (rows, doc_keys[[p.doc for p in prompts]])
        rows = [(i, j) for i, p in enumerate(prompts) for j in other_documents(p.doc, n_docs, options.max_other_keys)]
        if rows:
            plans["other_keys"] = (rows, doc_keys[[j for _, j in rows]])
        plans["no_key"] = ([(i, None) for i in range(len(prompts))], None)
    else:
        plans["memory"] = ([(i, None) for i in range(len(prompts))], None)
    plans["no_memory"] = ([(i, None) for i in range(len(prompts))], NO_MEMORY)

    per_document: list[dict[str, Any]] = [
        {"title": doc.title, "segments": len(doc.segments), "scored_segments": 0, "conditions": {}}
        for doc in documents]
    for p in prompts:
        per_document[p.doc]["scored_segments"] += 1
    examples: dict[int, dict[str, Any]] = {}
    for condition, (rows, keys) in plans.items():
        started = time.time()
        texts = [prompts[i].ids for i, _ in rows]
        # generate (and score) as many tokens as the reference has: a segment near its end has fewer
        # than new_tokens left, and a longer continuation would only dilute precision
        continuations = generate_greedy(foundation, memory, config.hook_memory_layer, texts, keys,
                                        [len(prompts[i].reference_ids) for i, _ in rows], options.gen_batch_size)
        decoded = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
        scores = rouge_scores(decoded, [prompts[i].reference for i, _ in rows])
        for d in range(n_docs):
            mine = [s for s, (i, _) in zip(scores, rows) if prompts[i].doc == d]
            per_document[d]["conditions"][condition] = mean_scores(mine)
        for text, (i, key_doc) in zip(decoded, rows):
            p = prompts[i]
            if p.doc not in examples:
                examples[p.doc] = {"title": documents[p.doc].title, "segment": p.segment,
                                   "prompt": tokenizer.decode(p.ids, skip_special_tokens=True),
                                   "reference": p.reference, "continuations": {}}
            if p.segment == examples[p.doc]["segment"] and condition not in examples[p.doc]["continuations"]:
                label = condition if key_doc is None or condition == "right_key" else f"{condition} (key of {key_doc})"
                examples[p.doc]["continuations"][condition] = {"key_of": key_doc, "label": label, "text": text}
        log(f"recall: {condition}: {len(rows)} generations in {time.time() - started:.1f}s")

    mean: dict[str, Any] = {}
    for condition in plans:
        rows_ = [doc["conditions"][condition] for doc in per_document if doc["conditions"].get(condition)]
        mean[condition] = {r: {m: float(np.mean([x[r][m] for x in rows_])) for m in MEASURES} for r in ROUGE_TYPES}
    return {
        "settings": {"prompt_tokens": options.prompt_tokens, "new_tokens": options.new_tokens,
                     "max_other_keys": options.max_other_keys, "decoding": "greedy",
                     "scored_tokens": "each continuation is as many tokens as its reference (up to new_tokens)",
                     "rouge": "rouge-score RougeScorer(rouge1, rouge2, rougeL), no stemming"},
        "conditions": list(plans),
        "segments_scored": len(prompts), "segments_skipped_too_short": skipped,
        "mean": mean, "per_document": per_document,
        "examples": [examples[d] for d in sorted(examples)],
    }


# ---- token cross-entropy: the CE matrix and the landscape ------------------------------------

class CETable:
    """Mean token CE of a document's segments under given key sets, with the prefix cached once."""

    def __init__(self, run: LoadedRun, documents: Sequence, options: EvalOptions) -> None:
        from engines import FastEngine
        from batching import make_batches

        self.memory = run.memory
        self.per_pass = options.key_sets_per_pass
        batches = make_batches(list(documents), run.foundation.tokenizer, run.config.batch_size,
                               run.config.max_length)
        self.by_doc: list[list] = [[] for _ in documents]
        for batch in batches:
            self.by_doc[int(batch.doc_ids[0])].append(batch)
        self.engine = FastEngine(run.foundation, run.memory, run.config.hook_memory_layer, run.dtype,
                                 cache_budget_bytes=int(run.config.cache_budget_gb * (1 << 30)))

    def tokens(self, doc: int) -> int:
        """Tokens the document was trained on (padding excluded)."""
        return int(sum(int(b.attention_mask.sum()) for b in self.by_doc[doc]))

    @torch.no_grad()
    def ce(self, doc: int, columns: Sequence[Any]) -> list[float]:
        """One CE per column: a (key_dim,) key, None (memory, no key) or engines.NO_MEMORY."""
        sums = np.zeros(len(columns))
        total = 0
        for batch in self.by_doc[doc]:
            rows = batch.input_ids.shape[0]
            tokens = int((batch.labels[:, 1:] != -100).sum())
            for start in range(0, len(columns), self.per_pass):
                chunk = columns[start: start + self.per_pass]
                key_sets = [c.to(self.memory.doc_keys).expand(rows, -1) if isinstance(c, torch.Tensor) else c
                            for c in chunk]
                values = self.engine.losses(batch, key_sets)
                sums[start: start + len(chunk)] += np.array([v.item() for v in values]) * tokens
            total += tokens
        return (sums / max(total, 1)).tolist()


def evaluate_ce_matrix(table: CETable, run: LoadedRun, documents: Sequence) -> dict[str, Any]:
    from engines import NO_MEMORY

    n = len(documents)
    titles = [d.title for d in documents]
    if not run.config.uses_keys:
        rows = [table.ce(d, [None, NO_MEMORY]) for d in range(n)]
        return {"titles": titles, "matrix": None, "shared_memory": True,
                "memory": [r[0] for r in rows], "no_memory": [r[1] for r in rows],
                "note": "a shared memory has no keys: one CE per document with the memory and without it"}
    keys = run.memory.doc_keys.detach()[:n]
    rows = [table.ce(d, [keys[j] for j in range(n)] + [None, NO_MEMORY]) for d in range(n)]
    matrix = np.array([r[:n] for r in rows])
    off = matrix[~np.eye(n, dtype=bool)]
    argmins = [int(np.argmin(matrix[i])) for i in range(n)]
    return {
        "titles": titles, "matrix": matrix.tolist(), "rows": "documents", "columns": "keys (same order)",
        "no_key": [r[n] for r in rows], "no_memory": [r[n + 1] for r in rows],
        "diagonal_mean": float(np.diag(matrix).mean()), "off_diagonal_mean": float(off.mean()) if off.size else None,
        "row_argmin": argmins, "diagonal_lowest_rows": sum(a == i for i, a in enumerate(argmins)),
        "diagonal_lowest_every_row": all(a == i for i, a in enumerate(argmins)),
    }


# ---- the whole evaluation of one run ---------------------------------------------------------

def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_loaded(run: LoadedRun, options: EvalOptions) -> dict[str, Any]:
    """Every measurement of one run, written into run_dir/eval/; returns summary.json's content.

    Callable right after training with the objects already in memory (--eval_at_end)."""
    import analysis_plots
    from utils import selection_stats

    options.validate()
    run.memory.eval()
    started = time.time()
    out = run.run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    documents = run.documents[: options.max_docs] if options.max_docs else run.documents
    n = len(documents)
    titles = [d.title for d in documents]
    keyed = run.config.uses_keys
    memory = run.memory
    log(f"{run.run_dir}: {n} documents, {'keyed' if keyed else 'shared'} memory on block "
        f"{run.config.hook_memory_layer} of {run.foundation.name}")

    # 1. recall in generation
    recall = evaluate_recall(run, documents, options)
    _write_json(out / "recall.json", recall)
    analysis_plots.plot_recall_bars(recall["mean"], out / "recall.png",
                                    title=f"{run.run_dir.name}: ROUGE recall of greedy continuations "
                                          f"({recall['segments_scored']} segments, {n} documents)")

    # 2. CE matrix (token level, no generation)
    t0 = time.time()
    table = CETable(run, documents, options)
    ce = evaluate_ce_matrix(table, run, documents)
    _write_json(out / "ce_matrix.json", ce)
    if ce["matrix"] is not None:
        analysis_plots.plot_ce_matrix(np.array(ce["matrix"]), titles, out / "ce_matrix.png")
    log(f"CE matrix in {time.time() - t0:.1f}s")
    attribution = None
    if keyed:  # which document a text came from: training segments and held-out continuations
        from docmem.attribution import evaluate_attribution

        attribution = evaluate_attribution(run, documents, options.gen_batch_size, options.key_sets_per_pass)
        _write_json(out / "attribution.json", attribution)
        attribution = {k: attribution[k]["top1_accuracy"] for k in ("training_segments", "held_out")}
        log(f"attribution top-1 accuracy: {attribution}")

    # 3. selection statistics over training and of the final memory
    history = read_metrics(run.run_dir)
    final_stats = None
    if keyed:
        with torch.no_grad():
            selections = memory.selection(memory.doc_keys.detach()).float().cpu()
        final_stats = selection_stats(selections, options.l0_threshold)
    per_epoch = [{k: h.get(k) for k in ("epoch", "l0", "l2", "pairwise_distance", "normalized_distance")}
                 for h in history if h.get("l0") is not None]
    _write_json(out / "selection_stats.json", {
        "l0_threshold": options.l0_threshold, "final": final_stats, "per_epoch": per_epoch,
        "note": None if keyed else "a shared memory has no per-document selection"})
    analysis_plots.plot_selection_stats({run.run_dir.name: history}, out / "selection_stats.png",
                                        title=f"{run.run_dir.name}: memory-selection statistics (mean over documents)")

    # 4. memory size against document length
    lengths = [table.tokens(d) for d in range(n)]
    if keyed:
        sel = selections[:n]
        l0 = (sel.abs() > options.l0_threshold).sum(dim=1).tolist()
        r = pearson_r(lengths, l0)
        length_json: dict[str, Any] = {
            "l0_threshold": options.l0_threshold, "pearson_r": r,
            "r_note": None if r is not None else "undefined: fewer than 2 documents, or L0 or length is constant",
            "documents": [{"title": t, "tokens": length, "segments": len(doc.segments), "l0": int(k)}
                          for t, length, doc, k in zip(titles, lengths, documents, l0)]}
        analysis_plots.plot_length_vs_l0(lengths, l0, titles, out / "length_vs_l0.png", r, options.l0_threshold)
    else:
        r = None
        length_json = {"skipped": True, "reason": "a shared memory has no per-document selection",
                       "documents": [{"title": t, "tokens": length} for t, length in zip(titles, lengths)]}
    _write_json(out / "length_vs_l0.json", length_json)

    # 5. the DocRep landscape
    t0 = time.time()
    landscape_summary: dict[str, Any] | None = None
    if not keyed:
        _write_json(out / "landscape.json", {"skipped": True, "reason": "a shared memory has no keys"})
    elif options.grid == 0:
        _write_json(out / "landscape.json", {"skipped": True, "reason": "--grid 0"})
    elif memory.config.key_dim != 2:
        _write_json(out / "landscape.json", {"skipped": True, "reason": f"key_dim is {memory.config.key_dim}; the "
                                             "landscape is drawn over a plane of keys and needs key_dim 2"})
    else:
        keys = memory.doc_keys.detach()[:n].float().cpu().numpy()
        land = compute_landscape(lambda doc, cands: table.ce(doc, list(cands)), keys, options.grid)
        land.update({"grid": options.grid, "titles": titles, "perplexity_index": "[document][y][x]"})
        near = sum(d["minimum_nearest_own_key"] for d in land["documents"])
        land["minima_nearest_own_key"] = near
        _write_json(out / "landscape.json", land)
        axis = np.array(land["axis"])
        ppls = [np.array(d["perplexity"]) for d in land["documents"]]
        minima = [tuple(d["minimum"]["key"]) for d in land["documents"]]
        own = [tuple(k) for k in keys.tolist()]
        for d, (ppl, title) in enumerate(zip(ppls, titles)):
            analysis_plots.plot_landscape(ppl, axis, own[d], [k for j, k in enumerate(own) if j != d], minima[d],
                                          f"{d}: {title}\nperplexity over keys (min {ppl.min():.3g})",
                                          out / "landscape" / f"doc_{d:02d}.png")
        analysis_plots.plot_landscape_overview(ppls, axis, own, minima, titles, out / "landscape.png")
        landscape_summary = {"minima_nearest_own_key": near, "documents": n,
                             "mean_distance_minimum_to_own_key":
                                 float(np.mean([d["distance_minimum_to_own_key"] for d in land["documents"]]))}
        log(f"landscape ({options.grid}x{options.grid} keys) in {time.time() - t0:.1f}s")

    summary = _summarise(run, options, recall, ce, final_stats, r, landscape_summary, time.time() - started)
    summary["attribution_top1_accuracy"] = attribution
    _write_json(out / "summary.json", summary)
    log(f"written to {out} in {summary['wall_seconds']:.0f}s")
    return summary


def _summarise(run: LoadedRun, options: EvalOptions, recall: dict, ce: dict, final_stats: dict | None,
               r: float | None, landscape: dict | None, seconds: float) -> dict[str, Any]:
    rouge_l = {c: recall["mean"][c]["rougeL"]["recall"] for c in recall["conditions"]}
    acceptance = None
    if run.config.uses_keys:
        def ratio(a: float, b: float | None) -> float | None:
            return None if b is None else (math.inf if b == 0 and a > 0 else (a / b if b else None))

        right = rouge_l["right_key"]
        vs_other = ratio(right, rouge_l.get("other_keys"))
        vs_plain = ratio(right, rouge_l["no_memory"])
        acceptance = {
            "rougeL_recall_right_over_other_keys": vs_other, "rougeL_recall_right_over_no_memory": vs_plain,
            "ce_diagonal_lowest_every_row": ce["diagonal_lowest_every_row"],
            "passed": bool((vs_other is None or vs_other >= 2) and vs_plain is not None and vs_plain >= 2
                           and ce["diagonal_lowest_every_row"]),
            "criteria": "ROUGE-L recall right_key >= 2x other_keys and >= 2x no_memory; CE row minima on the diagonal",
        }
        ce_part = {k: ce[k] for k in ("diagonal_mean", "off_diagonal_mean", "diagonal_lowest_rows",
                                       "diagonal_lowest_every_row")}
        ce_part.update({"no_key_mean": float(np.mean(ce["no_key"])), "no_memory_mean": float(np.mean(ce["no_memory"]))})
    else:
        ce_part = {"memory_mean": float(np.mean(ce["memory"])), "no_memory_mean": float(np.mean(ce["no_memory"]))}
    # json.dumps(allow_nan=False) rejects inf: write it as a string
    if acceptance:
        for k in ("rougeL_recall_right_over_other_keys", "rougeL_recall_right_over_no_memory"):
            if acceptance[k] == math.inf:
                acceptance[k] = "inf"
    return {
        "run_dir": str(run.run_dir), "document_memory": run.config.document_memory,
        "documents": len(ce["titles"]), "settings": asdict(options),
        "rougeL_recall": rouge_l, "recall_mean": recall["mean"],
        "segments_scored": recall["segments_scored"], "segments_skipped_too_short": recall["segments_skipped_too_short"],
        "ce": ce_part, "selection_final": final_stats, "length_l0_pearson_r": r, "landscape": landscape,
        "acceptance": acceptance, "wall_seconds": seconds,
    }


def evaluate_trained(run_dir: str | Path, config: Any, foundation: Any, memory: Any, documents: list,
                     dtype: torch.dtype, options: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate right after training (train_guidance.py --eval_at_end), reusing the loaded LM."""
    run = LoadedRun(Path(run_dir), config, {}, foundation, memory, documents, dtype)
    return evaluate_loaded(run, options or EvalOptions())


def evaluate_run(run_dir: str | Path, options: EvalOptions, foundations: FoundationCache | None = None
                 ) -> dict[str, Any]:
    run = load_run(resolve_run_dir(run_dir), options.validate(), foundations)
    return evaluate_loaded(run, options)


# ---- comparing runs --------------------------------------------------------------------------

def differing_fields(configs: Sequence[dict]) -> list[str]:
    """TrainConfig fields whose values are not the same in every run (where/how-often fields aside)."""
    from config import TrainConfig

    names = [f.name for f in fields(TrainConfig) if f.name not in NON_SEMANTIC_FIELDS]
    return [n for n in names if len({json.dumps(_field(c, n), sort_keys=True) for c in configs}) > 1]


def _field(config: dict, name: str) -> Any:
    """A config value; a field the run predates reads as TrainConfig's default."""
    from config import TrainConfig

    if name in config:
        return config[name]
    default = TrainConfig.__dataclass_fields__.get(name)
    return None if default is None else default.default


def run_labels(configs: Sequence[dict], names: Sequence[str]) -> list[str]:
    """Each run labelled by the fields where it departs from the most common value among the runs
    (a field without a single most common value is named in every label); a run that departs
    nowhere is the 'baseline'. Duplicate labels get the run's name."""
    varying = differing_fields(configs)
    modes: dict[str, str | None] = {}
    for f in varying:
        counts = Counter(json.dumps(_field(c, f), sort_keys=True) for c in configs).most_common()
        # no single most common value (e.g. two runs): name the field in every label
        modes[f] = counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else None
    labels = []
    for c in configs:
        parts = [f"{f}={_field(c, f)}" for f in varying if json.dumps(_field(c, f), sort_keys=True) != modes[f]]
        labels.append(", ".join(parts) if parts else "baseline")
    counts = Counter(labels)
    return [f"{label} [{name}]" if counts[label] > 1 else label for label, name in zip(labels, names)]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def compare(run_paths: Sequence[str | Path], out: str | Path, options: EvalOptions) -> dict[str, Any]:
    """Evaluate the runs that lack eval/summary.json, then one table and overlaid curves for all."""
    import analysis_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [resolve_run_dir(p) for p in run_paths]
    foundations: FoundationCache = {}
    summaries, configs, histories = [], [], []
    for run_dir in run_dirs:
        path = run_dir / EVAL_DIR / "summary.json"
        if path.is_file():
            summaries.append(json.loads(path.read_text()))
        else:
            log(f"{run_dir} has no {EVAL_DIR}/ yet: evaluating it")
            summaries.append(evaluate_run(run_dir, options, foundations))
        configs.append(read_saved_config(run_dir))
        histories.append(read_metrics(run_dir))
    names = [f"{d.parent.name}/{d.name}" for d in run_dirs]
    labels = run_labels(configs, names)
    conditions = list(dict.fromkeys(c for s in summaries for c in s["rougeL_recall"]))
    stat_keys = ("l0", "l2", "pairwise_distance", "normalized_distance")

    rows = []
    for label, run_dir, summary, config in zip(labels, run_dirs, summaries, configs):
        ce = summary["ce"]
        sel = summary.get("selection_final") or {}
        rows.append({
            "label": label, "run_dir": str(run_dir),
            "config": {f: _field(config, f) for f in differing_fields(configs)},
            "rougeL_recall": {c: summary["rougeL_recall"].get(c) for c in conditions},
            "ce_diagonal_mean": ce.get("diagonal_mean", ce.get("memory_mean")),
            "ce_off_diagonal_mean": ce.get("off_diagonal_mean"),
            "ce_diagonal_lowest_rows": ce.get("diagonal_lowest_rows"),
            "ce_no_memory_mean": ce.get("no_memory_mean"),
            "selection_final": {k: sel.get(k) for k in stat_keys} if sel else None,
            "length_l0_pearson_r": summary.get("length_l0_pearson_r"),
            "acceptance_passed": (summary.get("acceptance") or {}).get("passed"),
            "documents": summary.get("documents"),
        })

    header = (["run"] + [f"R-L rec. {c}" for c in conditions]
              + ["CE diag", "CE off-diag", "diag lowest", "CE no_mem", "L0", "L2", "pairwise", "normalized", "R"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        sel = row["selection_final"] or {}
        cells = ([row["label"]] + [_fmt(row["rougeL_recall"][c]) for c in conditions]
                 + [_fmt(row["ce_diagonal_mean"]), _fmt(row["ce_off_diagonal_mean"]),
                    "–" if row["ce_diagonal_lowest_rows"] is None else f"{row['ce_diagonal_lowest_rows']}/{row['documents']}",
                    _fmt(row["ce_no_memory_mean"])]
                 + [_fmt(sel.get(k), 2) for k in stat_keys] + [_fmt(row["length_l0_pearson_r"])])
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    varying = differing_fields(configs)
    notes = [
        "",
        f"Runs differ in: {', '.join(varying) if varying else 'nothing (same settings)'}. "
        "Each is labelled by where it departs from the most common setting.",
        "R-L rec.: mean ROUGE-L recall of greedy continuations (over documents). For a shared memory, "
        "`memory` is the memory without key and CE diag is its mean CE. CE in nats/token. "
        "L0/L2/pairwise/normalized: final memory selection, mean over documents. "
        "R: Pearson R of L0 against document length.",
        "",
        *[f"- {row['label']}: `{row['run_dir']}`" for row in rows],
    ]
    (out / "compare.md").write_text("\n".join(lines + notes) + "\n")
    report = {"runs": rows, "conditions": conditions, "differing_fields": varying}
    _write_json(out / "compare.json", report)
    analysis_plots.plot_compare_recall(labels, {c: [row["rougeL_recall"][c] for row in rows] for c in conditions},
                                       out / "recall.png")
    analysis_plots.plot_selection_stats(dict(zip(labels, histories)), out / "selection_stats.png",
                                        title="memory-selection statistics over epochs (mean over documents)")
    log(f"comparison of {len(rows)} runs written to {out}")
    print("\n".join(lines))
    return report


# ---- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate_memory.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run_dir", help="a run folder save_dir/run_N (or a save_dir: its newest finished run)")
    what.add_argument("--compare", nargs="+", metavar="RUN", help="runs to set side by side (evaluated if needed)")
    parser.add_argument("--out", help="folder of the comparison (with --compare)")
    parser.add_argument("--forget", metavar="DOC", help="with --run_dir: measure forgetting this document (index or "
                        "title) both ways (drop_key, edit), before and after; writes eval/forget_doc_NN.json and .md")
    defaults = EvalOptions()
    parser.add_argument("--prompt_tokens", type=int, default=defaults.prompt_tokens, help="segment tokens given as the prompt")
    parser.add_argument("--new_tokens", type=int, default=defaults.new_tokens, help="tokens generated greedily and scored")
    parser.add_argument("--grid", type=int, default=defaults.grid, help="landscape: grid x grid keys (key_dim 2); 0 = no landscape")
    parser.add_argument("--l0_threshold", type=float, default=defaults.l0_threshold, help="entries with |s| above this are in use")
    parser.add_argument("--max_docs", type=int, default=None, help="evaluate only the first N documents")
    parser.add_argument("--max_other_keys", type=int, default=defaults.max_other_keys,
                        help="other_keys: at most this many other documents' keys per document")
    parser.add_argument("--gen_batch_size", type=int, default=defaults.gen_batch_size, help="rows per generate() call")
    parser.add_argument("--key_sets_per_pass", type=int, default=defaults.key_sets_per_pass,
                        help="CE: key sets batched into one pass over the upper blocks")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads for torch; 0 = torch's default (on a busy machine 1 can be much faster)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from foundations import FoundationUnavailableError
    from wikitext import DataUnavailableError

    args = build_parser().parse_args(argv)
    options = EvalOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, grid=args.grid,
                          l0_threshold=args.l0_threshold, max_docs=args.max_docs, max_other_keys=args.max_other_keys,
                          gen_batch_size=args.gen_batch_size, key_sets_per_pass=args.key_sets_per_pass,
                          device=args.device, threads=args.threads)
    try:
        options.validate()
        if options.threads:
            torch.set_num_threads(options.threads)
        if args.compare:
            if not args.out:
                raise EvalError("--compare needs --out DIR")
            if args.forget is not None:
                raise EvalError("--forget goes with --run_dir (one run), not --compare")
            compare(args.compare, args.out, options)
        elif args.forget is not None:
            from docmem.forgetting import evaluate_forgetting, forgetting_table

            try:
                print(forgetting_table(evaluate_forgetting(args.run_dir, args.forget, options)))
            except ValueError as err:
                raise EvalError(str(err)) from err
        else:
            if args.out:
                raise EvalError("--out goes with --compare; a single run writes into RUN/eval/")
            summary = evaluate_run(args.run_dir, options)
            print(json.dumps({k: summary[k] for k in ("run_dir", "rougeL_recall", "ce", "length_l0_pearson_r",
                                                      "landscape", "attribution_top1_accuracy", "acceptance")}, indent=1))
    except EvalError as err:
        sys.stderr.write(f"evaluate_memory.py: error: {err}\n")
        return 2
    except (FoundationUnavailableError, DataUnavailableError) as err:
        sys.stderr.write(f"evaluate_memory.py: error: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
