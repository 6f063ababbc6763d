"""WikiText articles: load them, pick the run's documents, cut them into segments, tokenize.

Articles come from the Hub dataset `EleutherAI/wikitext_document_level` (one row per article,
column `page`), from a local copy of it (`--data_path`), or from `synthetic.py`.
Document selection and segmentation follow the released code (docs/design.md, "Data"):
NumPy's seeded draw over all articles, in draw order; newlines to spaces, whitespace words, windows of
`segment_length` words with a stride of half that, at most `max_segments` of them.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub.constants
import numpy as np
import torch
from huggingface_hub.utils import LocalEntryNotFoundError, httpx

from docmem import hub, synthetic
from docmem.errors import DataUnavailableError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

DATASETS = ("wikitext-103-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-2-raw-v1", "synthetic")
HUB_DATASET = "EleutherAI/wikitext_document_level"
PAGE_COLUMN = "page"

# An article title line: ` = Title = `, one `=` each side (` = = Section = = ` is not one).
_TITLE_LINE = re.compile(r"= (?!=)(.*\S) =")
_TRUE_VALUES = ("1", "ON", "YES", "TRUE")
# What `datasets.load_dataset` raises when the Hub cannot be reached (checked with datasets 5.2):
# ConnectionError("Couldn't reach ... on the Hub (OfflineModeIsEnabled | LocalEntryNotFoundError)"),
# and, from later downloads, huggingface_hub's LocalEntryNotFoundError or an httpx transport error.
_HUB_UNREACHABLE = (ConnectionError, LocalEntryNotFoundError, httpx.TransportError)


# --- loading ----------------------------------------------------------------------------------

def load_articles(dataset: str, data_split: str = "train", data_path: str | None = None,
                  cache_dir: str | None = None, num_synthetic: int = 0, seed: int = 0) -> list[str]:
    """Raw article texts (with newlines) of one split; empty or whitespace-only articles dropped.

    data_path may be a folder in the `EleutherAI/wikitext_document_level` layout, one parquet file
    (column `page`; data_split is then ignored), or a line-level WikiText text file (split into
    articles at ` = Title = ` lines). Without it the Hub is used (DataUnavailableError offline).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if dataset == "synthetic":
        if data_path is not None:
            raise ValueError("--data_path cannot be used with --dataset synthetic (its articles are generated)")
        if num_synthetic < 1:
            raise ValueError(f"--dataset synthetic needs a number of articles >= 1, got {num_synthetic}")
        pages = synthetic.generate_articles(num_synthetic, seed)
    elif data_path is not None:
        pages = _load_local(Path(data_path), dataset, data_split, cache_dir)
    else:
        pages = _load_hub(dataset, data_split, cache_dir)
    return [page for page in pages if isinstance(page, str) and page.strip()]


def _load_hub(dataset: str, data_split: str, cache_dir: str | None) -> list[str]:
    # An unreachable Hub: read the cache only, rather than wait for the client's retries.
    import datasets  # here, not at the top: a second or more at start-up, and only Hub or parquet data needs it

    unreachable = None if _offline_requested() else hub.unreachable_reason()
    try:
        with _offline_from_environment(force=unreachable is not None):
            rows = datasets.load_dataset(HUB_DATASET, dataset, split=data_split, cache_dir=cache_dir)
    except _HUB_UNREACHABLE as e:
        what = f"{HUB_DATASET} (config {dataset}, split {data_split})"
        if unreachable is not None:
            raise DataUnavailableError(f"the Hugging Face Hub ({hub.endpoint()}) cannot be reached ({unreachable}) "
                                       f"and {what} is not in the cache: {hub.OFFLINE_ADVICE}") from e
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]  # one line, whatever the library wrote
        raise DataUnavailableError(
            f"could not download {what} from the Hugging Face Hub"
            f" ({reason}); pass --data_path with a local copy, or use --dataset synthetic"
        ) from e
    return _pages(rows, HUB_DATASET)


def _offline_requested() -> bool:
    """HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as datasets reads them."""
    value = os.environ.get("HF_DATASETS_OFFLINE")
    if value is None:
        value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE_VALUES


@contextlib.contextmanager
def _offline_from_environment(force: bool = False) -> Iterator[None]:
    """Honour the offline variables as they are now (or go offline anyway: `force`), for this call only.

    datasets and huggingface_hub read them once, at import; set after that (a test, a notebook)
    they would be ignored and the Hub tried, with retries. Offline mode still reads the local cache.
    """
    import datasets.config
    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             huggingface_hub.constants.HF_HUB_OFFLINE)
    if force or _offline_requested():
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         huggingface_hub.constants.HF_HUB_OFFLINE) = saved


def _load_local(path: Path, dataset: str, data_split: str, cache_dir: str | None) -> list[str]:
    if not path.exists():
        raise ValueError(f"--data_path {path} does not exist")
    if path.is_dir():
        return _read_parquet(_find_parquet_files(path, dataset, data_split), cache_dir, path)
    if path.suffix == ".parquet":
        return _read_parquet([path], cache_dir, path)
    return split_wikitext_lines(path.read_text(encoding="utf-8"))


def _is_split_file(name: str, config: str, split: str) -> bool:
    """`<config>-<split>.parquet`, `<split>.parquet`, or shards such as `<split>-00000-of-00002.parquet`."""
    stem = name.removesuffix(".parquet").removeprefix(f"{config}-")
    return stem == split or stem.startswith(f"{split}-")


def _find_parquet_files(folder: Path, config: str, split: str) -> list[Path]:
    """The parquet files of one config and split in a folder of the Hub dataset's layout."""
    config_dir = folder / config
    if (config_dir / split).is_dir():  # the Hub's parquet export: <config>/<split>/0000.parquet
        files = sorted((config_dir / split).glob("*.parquet"))
    elif config_dir.is_dir():
        files = sorted(p for p in config_dir.glob("*.parquet") if _is_split_file(p.name, config, split))
    else:  # the folder itself holds the parquet files of one config
        files = sorted(p for p in folder.glob("*.parquet") if _is_split_file(p.name, config, split))
    if files:
        return files
    configs = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.rglob("*.parquet")))
    if configs and not config_dir.is_dir():
        raise ValueError(
            f"--data_path {folder} has no folder for --dataset {config}; it has: {', '.join(configs)}"
        )
    raise ValueError(
        f"--data_path {folder} has no parquet file for --dataset {config}, split {split!r}"
        " (a parquet file of another name can be given as --data_path itself)"
    )


def _read_parquet(files: list[Path], cache_dir: str | None, data_path: Path) -> list[str]:
    import datasets
    rows = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
    return _pages(rows, f"--data_path {data_path}")


def _pages(rows: datasets.Dataset, source: str) -> list[str]:
    if PAGE_COLUMN not in rows.column_names:
        raise ValueError(f"{source} has no {PAGE_COLUMN!r} column (columns: {', '.join(rows.column_names)})")
    return list(rows[PAGE_COLUMN])


def _is_title_line(line: str) -> bool:
    return _TITLE_LINE.fullmatch(line.strip()) is not None


def split_wikitext_lines(text: str) -> list[str]:
    """Articles of a line-level WikiText file, each from its ` = Title = ` line to the next one.

    Joined back with "\\n", so the articles equal the `page` rows of the document-level dataset.
    Text before the first title (WikiText files open with a blank line) is an article of its own,
    which load_articles drops when it is blank; a file with no title line is one article.
    """
    lines = text.split("\n")  # not splitlines(): WikiText has U+2028 and friends inside lines
    cuts = [0, *(i for i, line in enumerate(lines) if i > 0 and _is_title_line(line)), len(lines)]
    return ["\n".join(lines[start:end]) for start, end in zip(cuts, cuts[1:])]


# --- titles and segments ----------------------------------------------------------------------

def extract_title(article: str, num_words: int = 8) -> str:
    """The text of the first ` = Title = ` line; without one, the first `num_words` words."""
    for line in article.split("\n"):
        match = _TITLE_LINE.fullmatch(line.strip())
        if match:
            return match.group(1).strip()
    return " ".join(article.split()[:num_words])


def opening(segment: str, title: str) -> str:
    """How a document opens with its title, as it was trained: the ` = Title = ` heading (newlines
    are spaces in a segment), or the title itself where the article has no heading. Generation
    prompted with this continues the document where training saw it continue."""
    heading = f"= {title} ="
    return heading if segment.startswith(heading) else title


def segment_article(article: str, segment_length: int, max_segments: int) -> list[str]:
    """Word windows of one article, each joined with single spaces.

    Fewer than segment_length words: the whole article is one segment (none if it has no words),
    as released. Otherwise full windows only, starting at 0, stride, 2*stride, ... (stride =
    segment_length // 2, at least 1) while the window fits, at most max_segments of them; the last
    up to stride - 1 words are then in no segment (a trailing partial window would repeat most of
    the one before). The last full window is kept: the released `range` stopped one window early,
    so an article of exactly segment_length words had no segment (docs/fidelity.md).
    """
    if segment_length < 1:
        raise ValueError(f"--segment_length must be >= 1, got {segment_length}")
    if max_segments < 1:
        raise ValueError(f"--max_segments must be >= 1, got {max_segments}")
    words = article.split()  # any whitespace, newlines included
    if len(words) < segment_length:
        return [" ".join(words)] if words else []
    stride = max(1, segment_length // 2)
    starts = range(0, len(words) - segment_length + 1, stride)[:max_segments]
    return [" ".join(words[start:start + segment_length]) for start in starts]


@dataclass
class Document:
    """One document of the run: its key is number `index`; `article_index` is its row in the source."""

    index: int
    article_index: int
    title: str
    segments: list[str]


def draw_articles(num_articles: int, max_labels: int, seed: int) -> list[int]:
    """The released draw: NumPy's generator seeded with `seed` picks max_labels distinct rows of
    all num_articles, in draw order. (The released code seeds the global generator and calls
    np.random.choice(range(N), K, replace=False) first; a local RandomState gives the same rows.)"""
    if max_labels < 1:
        raise ValueError(f"--max_labels must be >= 1, got {max_labels}")
    if max_labels > num_articles:
        raise ValueError(f"--max_labels {max_labels} is more than the {num_articles} articles available")
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be in 0 .. 2**32 - 1 (NumPy's seed range), got {seed}")
    return [int(row) for row in np.random.RandomState(seed).choice(num_articles, max_labels, replace=False)]


def select_documents(articles: list[str], max_labels: int, seed: int,
                     segment_length: int, max_segments: int) -> list[Document]:
    """The run's documents, as the released code picks them: draw_articles over all articles,
    kept in draw order (key i is the i-th drawn article that has a segment); drawn articles
    without a segment are dropped, so a run may have fewer than max_labels documents.

    Each drawn row is its own document (the released code looked articles up by title, so two
    drawn articles with one title became one; docs/fidelity.md).
    """
    documents = []
    for row in draw_articles(len(articles), max_labels, seed):
        segments = segment_article(articles[row], segment_length, max_segments)
        if segments:
            documents.append(Document(index=len(documents), article_index=row,
                                      title=extract_title(articles[row]), segments=segments))
    if not documents:
        raise ValueError(f"none of the {max_labels} drawn articles has a word to train on")
    return documents


# --- tokenization -----------------------------------------------------------------------------

def tokenize_segments(tokenizer: PreTrainedTokenizerBase, segments: list[str],
                      max_length: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (-100 on padding) of a batch of segments.

    Sets the tokenizer to left padding, with pad = eos when it has no pad token (Pythia and Llama-2
    have none). Padding is to the longest segment; truncation keeps the first max_length tokens.
    Labels mask padding by the attention mask, not by token id: pad == eos, and eos may be real text.
    """
    if max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {max_length}")
    if not segments:
        raise ValueError("no segments to tokenize")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    encoded = tokenizer(segments, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
