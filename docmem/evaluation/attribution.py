"""Which document did a text come from? Rank the memory's documents by the text's token CE under
each document's key, against the memory without a key and the plain LM.

A text is tokenized as in training and cut into windows of the run's max_length tokens (each
window is scored on its own, on its tokens after the first; a text's CE is the token-weighted mean
over its windows). Windows are batched with left padding, and a window scores the same tokens
alone or batched (`own_targets`): only the positions shift, which changes the numbers by rounding.
The prefix below the hooked block runs once per window; every key is one batched pass above it.

The evaluation (`evaluate_attribution`, written by evaluate_memory.py as attribution.json):
top-1 accuracy of attributing each training segment to its document, and each held-out
continuation: the text of the same article after the words it was trained on, cut into
pieces of segment_length words (at most max_segments per document). A training segment is
scored as training scored it: its row of the CE table (evaluation/ce_table.py), in training's
batch, which the CE matrix has already scored under every key (`table_scores`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import wikitext
from docmem.batching import Batch
from docmem.config import TrainConfig
from docmem.engines import NO_MEMORY, FastEngine, LossEngine
from docmem.errors import UsageError
from docmem.evaluation.ce_table import CETable
from docmem.evaluation.generation import prompt_batch
from docmem.run_folder import LoadedRun
from document_memories import DocumentMemory
from foundations import Foundation

MIN_HELD_OUT_WORDS = 8  # a shorter tail of an article is not a held-out text


@dataclass
class TextScores:
    tokens: int  # tokens scored
    key_ce: list[float]  # mean token CE under each document's key (key row order)
    no_key: float  # the memory without a key
    no_memory: float  # the plain LM

    def ranking(self) -> list[int]:
        """Documents from the most to the least likely source (lowest CE first)."""
        return [int(i) for i in np.argsort(np.asarray(self.key_ce), kind="stable")]


def text_windows(tokenizer: Any, text: str, max_length: int) -> list[list[int]]:
    if not text.strip():
        raise UsageError("the text is empty")
    ids = tokenizer(text)["input_ids"]
    windows = [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if len(w) >= 2]  # one token predicts nothing
    if not windows:
        raise UsageError(f"the text is {len(ids)} token(s) long: at least 2 are needed to score it")
    return windows


@dataclass
class Scorer:
    """What scoring texts needs: the LM, the memory on its block, and how much to batch."""
    foundation: Foundation
    memory: DocumentMemory | None  # None: a baseline without a memory (score_columns with its own engine)
    layer: int  # the hooked block
    dtype: torch.dtype
    max_length: int  # tokens per window (the run's --max_length)
    rows_per_batch: int = 16
    key_sets_per_pass: int = 16
    progress: str | None = None  # a progress bar's label (None: no bar)
    head_dtype: torch.dtype | None = None  # the vocabulary head's products (None: the head's own; a run's bf16_head)


@torch.no_grad()
def score_texts(scorer: Scorer, texts: Sequence[str]) -> list[TextScores]:
    """Every text's CE under each key, no key, and the plain LM."""
    memory = scorer.memory
    if not memory.config.use_keys:
        raise UsageError("a shared memory (trained without keys) cannot attribute: it has no document keys")
    keys = memory.doc_keys.detach()
    columns: list[Any] = [keys[j] for j in range(keys.shape[0])] + [None, NO_MEMORY]
    engine = FastEngine(scorer.foundation, memory, scorer.layer, scorer.dtype, cache_budget_bytes=0,
                        head_dtype=scorer.head_dtype)
    counts, means = score_columns(engine, scorer, texts, columns)
    n = keys.shape[0]
    return [TextScores(int(counts[t]), means[t, :n].tolist(), float(means[t, n]), float(means[t, n + 1]))
            for t in range(len(texts))]


@torch.no_grad()
def score_columns(engine: LossEngine, scorer: Scorer, texts: Sequence[str], columns: Sequence[Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each text's scored tokens and its token-mean CE under each column of the engine (texts x columns);
    scorer gives the tokenizer, max_length and the batching."""
    tokenizer = scorer.foundation.tokenizer
    rows: list[tuple[int, list[int]]] = [(t, w) for t, text in enumerate(texts)
                                          for w in text_windows(tokenizer, text, scorer.max_length)]
    sums = np.zeros((len(texts), len(columns)))
    counts = np.zeros(len(texts))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = range(0, len(rows), scorer.rows_per_batch)
    for index, start in enumerate(tqdm(starts, desc=scorer.progress, unit="batch", dynamic_ncols=True,
                                       disable=scorer.progress is None)):
        chunk = rows[start: start + scorer.rows_per_batch]
        ids, mask = prompt_batch([w for _, w in chunk], pad_id)
        batch = Batch(index=index, doc_ids=torch.arange(len(chunk)), input_ids=ids, attention_mask=mask,
                      labels=own_targets(ids, mask))
        tokens = (batch.labels[:, 1:] != -100).sum(dim=1).numpy()
        for c in range(0, len(columns), scorer.key_sets_per_pass):
            sets = [col.expand(len(chunk), -1) if isinstance(col, torch.Tensor) else col
                    for col in columns[c: c + scorer.key_sets_per_pass]]
            per_row = torch.stack(engine.losses(batch, sets, per_document=True)).float().cpu().numpy()  # (sets, rows)
            for r, (text_index, _) in enumerate(chunk):
                sums[text_index, c: c + len(sets)] += per_row[:, r] * tokens[r]
        for r, (text_index, _) in enumerate(chunk):
            counts[text_index] += tokens[r]
    return counts, sums / counts[:, None]


def table_scores(table: CETable, documents: Sequence, doc_columns: Sequence[Any], no_key: Any = NO_MEMORY,
                 chosen: Sequence[int] | None = None) -> list[list[TextScores]]:
    """Each chosen document's training segments (in order; every document by default) scored from the
    CE table: per segment its scored tokens and its CE under each document's column (key, adapter),
    `no_key` and the plain LM, as training's loss scores that row of its batch (tests/test_attribute.py
    checks them against the engine on training's batch); with the full CE matrix no pass runs that it
    has not already run."""
    n = len(doc_columns)
    columns = list(doc_columns) + [no_key, NO_MEMORY]
    return [[TextScores(int(tokens), ce[:n], ce[n], ce[n + 1]) for tokens, ce in table.row_ce(d, columns)]
            for d in (range(len(documents)) if chosen is None else chosen)]


def attributed_documents(num_docs: int, limit: int) -> list[int]:
    """The documents whose texts attribution ranks (against every document as a candidate): all of them
    for limit 0 or limit >= num_docs, else `limit` spread evenly over the documents (0, N/limit, ...)."""
    if limit < 0:
        raise ValueError(f"limit {limit}: must be >= 0 (0: every document)")
    if limit == 0 or limit >= num_docs:
        return list(range(num_docs))
    return [(i * num_docs) // limit for i in range(limit)]


def own_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels of left-padded rows of texts: each text's tokens after its first (-100 on padding and on the
    first token, which only padding precedes), so a text scores the same tokens, alone or batched."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(ids.shape[0]), mask.long().argmax(dim=1)] = -100
    return labels


def held_out_texts(article: str, segments: int, segment_length: int, max_segments: int) -> list[str]:
    """The article's text after the words its `segments` training windows covered, in pieces of
    segment_length words (at most max_segments; a last piece of fewer than MIN_HELD_OUT_WORDS is dropped)."""
    words = article.split()
    if len(words) < segment_length:
        return []  # the whole article was one segment
    stride = max(1, segment_length // 2)
    rest = words[stride * (segments - 1) + segment_length:]
    pieces = [rest[i: i + segment_length] for i in range(0, len(rest), segment_length)][:max_segments]
    return [" ".join(p) for p in pieces if len(p) >= MIN_HELD_OUT_WORDS]


def load_held_out(config: TrainConfig, documents: Sequence[wikitext.Document]) -> list[list[str]]:
    """Held-out continuations of each document, from the run's data source (config: TrainConfig)."""
    articles = wikitext.load_articles(config.dataset, data_split=config.data_split, data_path=config.data_path,
                                      cache_dir=config.data_cache_dir, num_synthetic=config.synthetic_articles,
                                      seed=config.seed)
    return [held_out_texts(articles[d.article_index], len(d.segments), config.segment_length, config.max_segments)
            for d in documents]


def attribution_accuracy(texts: Sequence[str], truth: Sequence[int], scores: Sequence[TextScores]) -> dict[str, Any]:
    """Top-1 accuracy and the per-text details."""
    items = []
    for text, doc, s in zip(texts, truth, scores):
        ranking = s.ranking()
        items.append({"document": doc, "top1": ranking[0], "correct": ranking[0] == doc, "rank": ranking.index(doc) + 1,
                      "ce_right_key": s.key_ce[doc], "ce_best_other_key": min(
                          (c for j, c in enumerate(s.key_ce) if j != doc), default=None),
                      "ce_no_key": s.no_key, "ce_no_memory": s.no_memory, "tokens": s.tokens,
                      "text_start": text[:80]})
    correct = sum(i["correct"] for i in items)
    return {"texts": len(items), "correct": correct, "top1_accuracy": correct / len(items) if items else None,
            "mean_rank": float(np.mean([i["rank"] for i in items])) if items else None,
            "right_key_below_plain_lm": sum(i["ce_right_key"] < i["ce_no_memory"] for i in items), "items": items}


def evaluate_attribution(run: LoadedRun, documents: Sequence, rows_per_batch: int, key_sets_per_pass: int,
                         table: CETable, limit: int = 0) -> dict[str, Any]:
    """Attribution accuracy on training segments (from `table`, the run's CE table of `documents`) and
    held-out continuations (run: LoadedRun) of `attributed_documents(len(documents), limit)`, each ranked
    against every document's key."""
    scorer = Scorer(run.foundation, run.memory, run.config.hook_memory_layer, run.dtype, run.config.max_length,
                    rows_per_batch, key_sets_per_pass, head_dtype=run.head_dtype)
    keys = run.memory.doc_keys.detach()
    chosen = attributed_documents(len(documents), limit)
    training = table_scores(table, documents, [keys[j] for j in range(keys.shape[0])], no_key=None, chosen=chosen)
    return attribution_report(run.config, documents, lambda texts, label: score_texts(replace(scorer, progress=label),
                                                                                      texts), training, chosen)


def attribution_report(config: TrainConfig, documents: Sequence, score: Callable[[list[str], str], list[TextScores]],
                       training: list[list[TextScores]], chosen: Sequence[int] | None = None) -> dict[str, Any]:
    """Top-1 attribution of the chosen documents' (default: every document's) training segments (`training`:
    each chosen document's segments scored, table_scores) and held-out continuations; score(texts, label)
    gives each held-out text's CE under every document's condition (a key, an adapter, the document in the
    prompt): every document stays a candidate."""
    chosen = list(range(len(documents))) if chosen is None else list(chosen)
    segments = [s for d in chosen for s in documents[d].segments]
    segment_scores = [s for doc_scores in training for s in doc_scores]
    if len(segment_scores) != len(segments):
        raise ValueError(f"{len(segment_scores)} training segment scores for {len(segments)} segments")
    held_out = load_held_out(config, [documents[d] for d in chosen])
    held_texts = [t for doc_texts in held_out for t in doc_texts]
    return {"documents": [d.title for d in documents],
            "attributed_documents": chosen if len(chosen) < len(documents) else "all",
            "rule": "top-1 = the document whose key gives the text the lowest mean token CE",
            "training_segments_scored": "as in training: each segment's tokens in its training batch "
                                        "(the CE matrix's rows)",
            "training_segments": attribution_accuracy(segments, [d for d in chosen for _ in documents[d].segments],
                                                      segment_scores),
            "held_out": attribution_accuracy(held_texts, [d for d, doc_texts in zip(chosen, held_out) for _ in doc_texts],
                                             score(held_texts, "attribution: held_out") if held_texts else [])}
