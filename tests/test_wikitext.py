"""wikitext.py: loading, titles, segmentation, document selection and tokenization."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.utils import LocalEntryNotFoundError, httpx

import wikitext
from conftest import ROOT, SHARED_DATA, needs_shared
from docmem import synthetic
from fixtures_tiny import build_local_wikitext, build_tokenizer

DOC_LEVEL = SHARED_DATA / "wikitext_document_level"
RAW_FILE = SHARED_DATA / "wikitext_raw" / "wikitext-2-raw.wiki.test.raw"
TOKENS_FILE = SHARED_DATA / "wikitext_raw" / "wikitext-2.wiki.test.tokens"
NUM_TEST_ARTICLES = 62


def words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


# --- segmentation -----------------------------------------------------------------------------

def test_short_article_is_one_segment():
    assert wikitext.segment_article(" = T = \n \n a b  c \n", segment_length=10, max_segments=5) == ["= T = a b c"]


def test_article_of_exactly_segment_length_is_one_window():
    assert wikitext.segment_article(" ".join(words(8)), 8, 10) == [" ".join(words(8))]


def test_windows_with_half_stride():
    segments = wikitext.segment_article(" ".join(words(20)), segment_length=8, max_segments=10)
    # starts 0, 4, 8, 12: the last full window ends at word 20
    assert segments == [" ".join(words(20)[s:s + 8]) for s in (0, 4, 8, 12)]


def test_trailing_partial_window_is_left_out():
    w = words(22)
    segments = wikitext.segment_article(" ".join(w), segment_length=8, max_segments=10)
    assert len(segments) == 4 and segments[-1] == " ".join(w[12:20])
    assert all(len(s.split()) == 8 for s in segments)


def test_max_segments_caps_the_windows():
    w = words(100)
    segments = wikitext.segment_article(" ".join(w), segment_length=8, max_segments=3)
    assert segments == [" ".join(w[0:8]), " ".join(w[4:12]), " ".join(w[8:16])]


def test_odd_and_unit_segment_length():
    w = words(9)
    assert wikitext.segment_article(" ".join(w), 5, 10) == [" ".join(w[s:s + 5]) for s in (0, 2, 4)]  # stride 2
    assert wikitext.segment_article(" ".join(w), 1, 4) == w[:4]  # stride is at least 1


def test_newlines_and_runs_of_whitespace_become_single_spaces():
    article = "a\nb \n\n c\td   e\n"
    assert wikitext.segment_article(article, 100, 10) == ["a b c d e"]
    assert wikitext.segment_article(article, 2, 10) == ["a b", "b c", "c d", "d e"]


def test_article_without_words_has_no_segments():
    assert wikitext.segment_article(" \n \n", 8, 10) == []


@pytest.mark.parametrize("segment_length, max_segments, flag", [(0, 10, "--segment_length"), (8, 0, "--max_segments")])
def test_bad_segment_arguments(segment_length: int, max_segments: int, flag: str):
    with pytest.raises(ValueError, match=flag):
        wikitext.segment_article("a b c", segment_length, max_segments)


# --- titles -----------------------------------------------------------------------------------

def test_title_is_the_first_single_level_heading():
    assert wikitext.extract_title(" = Robert Boulter = \n \n Robert Boulter is an actor . \n") == "Robert Boulter"
    article = " \n = = Not a title = = \n = Kiss You ( One Direction song ) = \n = = Background = = \n"
    assert wikitext.extract_title(article) == "Kiss You ( One Direction song )"


def test_sub_headings_are_not_titles():
    article = " = = Career = = \n \n = = = 2000 – 2005 = = = \n \n He had a guest role in the series ."
    assert wikitext.extract_title(article) == " ".join(article.split()[:8])


def test_title_fallback_is_the_first_words():
    article = "no heading here at all , just words\n and more"
    assert wikitext.extract_title(article) == "no heading here at all , just words"
    assert wikitext.extract_title("a b", num_words=1) == "a"


# --- document selection -----------------------------------------------------------------------

ARTICLES = synthetic.generate_articles(40, seed=7)


def test_select_documents_is_deterministic_and_complete():
    docs = wikitext.select_documents(ARTICLES, max_labels=10, seed=1, segment_length=64, max_segments=3)
    assert docs == wikitext.select_documents(ARTICLES, 10, 1, 64, 3)
    assert [d.index for d in docs] == list(range(10))
    rows = [d.article_index for d in docs]
    assert len(set(rows)) == 10 and all(0 <= r < len(ARTICLES) for r in rows)
    assert rows == wikitext.draw_articles(len(ARTICLES), 10, 1)  # draw order (tests/test_fidelity.py)
    for d in docs:
        assert d.title == wikitext.extract_title(ARTICLES[d.article_index]) and d.title
        assert d.segments == wikitext.segment_article(ARTICLES[d.article_index], 64, 3)
        assert 1 <= len(d.segments) <= 3


def test_different_seeds_pick_different_documents():
    picks = {tuple(d.article_index for d in wikitext.select_documents(ARTICLES, 10, seed, 64, 3)) for seed in range(5)}
    assert len(picks) == 5


def test_drawn_blank_articles_are_dropped_and_the_rest_renumbered():
    articles = ["", " = A = \n a", " \n ", " = B = \n b"]
    docs = wikitext.select_documents(articles, 4, seed=0, segment_length=8, max_segments=2)
    drawn = wikitext.draw_articles(4, 4, 0)
    kept = [row for row in drawn if row in (1, 3)]
    assert [(d.index, d.article_index) for d in docs] == list(enumerate(kept))
    assert {d.article_index: (d.title, d.segments) for d in docs} == {1: ("A", ["= A = a"]), 3: ("B", ["= B = b"])}
    with pytest.raises(ValueError, match="--max_labels"):
        wikitext.select_documents(articles, 5, 0, 8, 2)
    with pytest.raises(ValueError, match="none of the 1 drawn"):
        wikitext.select_documents(["", " "], 1, 0, 8, 2)


@pytest.mark.parametrize("max_labels", [0, 41])
def test_bad_max_labels(max_labels: int):
    with pytest.raises(ValueError, match="--max_labels"):
        wikitext.select_documents(ARTICLES, max_labels, 0, 64, 3)


def _selection_in_subprocess(hash_seed: str) -> list[dict]:
    code = ("import dataclasses, json, wikitext; from docmem import synthetic; "
            "docs = wikitext.select_documents(synthetic.generate_articles(40, 7), 10, 3, 32, 4); "
            "print(json.dumps([dataclasses.asdict(d) for d in docs]))")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout)


def test_selection_is_the_same_in_other_processes():
    here = [dataclasses.asdict(d) for d in wikitext.select_documents(ARTICLES, 10, 3, 32, 4)]
    assert _selection_in_subprocess("1") == _selection_in_subprocess("31337") == here


# --- loading: names, synthetic, local files ---------------------------------------------------

def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="--dataset") as info:
        wikitext.load_articles("wikitext-5-v1", data_path="/nowhere")
    assert all(name in str(info.value) for name in wikitext.DATASETS)


def test_missing_data_path(tmp_path: Path):
    with pytest.raises(ValueError, match="--data_path"):
        wikitext.load_articles("wikitext-2-raw-v1", "test", data_path=str(tmp_path / "absent"))


def test_folder_without_parquet_files(tmp_path: Path):
    with pytest.raises(ValueError, match="--data_path"):
        wikitext.load_articles("wikitext-2-raw-v1", "test", data_path=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_synthetic_dataset():
    assert wikitext.load_articles("synthetic", num_synthetic=5, seed=3) == synthetic.generate_articles(5, 3)
    with pytest.raises(ValueError):
        wikitext.load_articles("synthetic", num_synthetic=0)
    with pytest.raises(ValueError, match="--data_path"):
        wikitext.load_articles("synthetic", data_path="x", num_synthetic=5)


def test_text_file_is_split_at_titles_only(tmp_path: Path):
    path = tmp_path / "wiki.raw"
    path.write_text(" \n = A = \n \n a1 a2 \n \n = = Sub = = \n \n a3 \n \n = B = \n \n b1 \n \n", encoding="utf-8")
    articles = wikitext.load_articles("wikitext-2-raw-v1", data_path=str(path))
    assert articles == [" = A = \n \n a1 a2 \n \n = = Sub = = \n \n a3 \n ", " = B = \n \n b1 \n \n"]
    assert [wikitext.extract_title(a) for a in articles] == ["A", "B"]


def test_parquet_file_drops_blank_pages_and_needs_a_page_column(tmp_path: Path):
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    datasets.Dataset.from_dict({"page": ["", " = A = \n a \n", " \n \n "]}).to_parquet(str(good))
    datasets.Dataset.from_dict({"text": [" = A = \n a \n"]}).to_parquet(str(bad))
    cache = str(tmp_path / "cache")
    assert wikitext.load_articles("wikitext-2-raw-v1", data_path=str(good), cache_dir=cache) == [" = A = \n a \n"]
    with pytest.raises(ValueError, match="'page'"):
        wikitext.load_articles("wikitext-2-raw-v1", data_path=str(bad), cache_dir=cache)


# --- loading the shared WikiText copy ---------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("dataset", ["wikitext-2-raw-v1", "wikitext-103-raw-v1"])
def test_load_document_level_folder(dataset: str, tmp_path: Path):
    articles = wikitext.load_articles(dataset, "test", data_path=str(DOC_LEVEL), cache_dir=str(tmp_path))
    assert len(articles) == NUM_TEST_ARTICLES
    assert wikitext.extract_title(articles[0]) == "Robert Boulter"
    assert wikitext.extract_title(articles[1]) == "Du Fu"
    assert all(a.startswith(" = ") and "\n" in a for a in articles)


def test_load_parquet_file_and_folder_of_one_config(tmp_path: Path):
    copy = build_local_wikitext(tmp_path / "copy")
    config, cache = "wikitext-2-raw-v1", str(tmp_path / "cache")
    from_folder = wikitext.load_articles(config, "test", data_path=str(copy), cache_dir=cache)
    from_file = wikitext.load_articles(config, data_path=str(copy / config / f"{config}-test.parquet"), cache_dir=cache)
    from_config_folder = wikitext.load_articles(config, "test", data_path=str(copy / config), cache_dir=cache)
    assert len(from_folder) == 62 and from_file == from_folder == from_config_folder


@needs_shared
def test_raw_text_file_matches_the_document_level_rows(tmp_path: Path):
    from_raw = wikitext.load_articles("wikitext-2-raw-v1", data_path=str(RAW_FILE))
    from_parquet = wikitext.load_articles("wikitext-2-raw-v1", "test", data_path=str(DOC_LEVEL),
                                          cache_dir=str(tmp_path))
    assert len(from_raw) == NUM_TEST_ARTICLES
    assert from_raw == from_parquet  # byte for byte, sub-headings included
    from_tokens = wikitext.load_articles("wikitext-2-v1", data_path=str(TOKENS_FILE))
    tokens_parquet = wikitext.load_articles("wikitext-2-v1", "test", data_path=str(DOC_LEVEL), cache_dir=str(tmp_path))
    assert from_tokens == tokens_parquet


def test_missing_config_or_split_in_folder(tmp_path: Path):
    copy, cache = str(build_local_wikitext(tmp_path / "copy")), str(tmp_path / "cache")
    with pytest.raises(ValueError, match="--dataset wikitext-103-v1.*wikitext-103-raw-v1"):
        wikitext.load_articles("wikitext-103-v1", "test", data_path=copy, cache_dir=cache)
    with pytest.raises(ValueError, match="split 'train'"):
        wikitext.load_articles("wikitext-2-raw-v1", "train", data_path=copy, cache_dir=cache)


@needs_shared
def test_real_articles_segment_as_in_method_md(tmp_path: Path):
    articles = wikitext.load_articles("wikitext-2-raw-v1", "test", data_path=str(DOC_LEVEL), cache_dir=str(tmp_path))
    docs = wikitext.select_documents(articles, max_labels=10, seed=1, segment_length=128, max_segments=10)
    for d in docs:
        n = len(articles[d.article_index].split())
        expected = 1 if n < 128 else min(10, (n - 128) // 64 + 1)
        assert len(d.segments) == expected
        assert d.segments[0].split() == articles[d.article_index].split()[:128]


# --- the Hub, offline -------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Records, and refuses, any attempt to resolve a host or open a connection."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_offline_hub_raises_data_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: list):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    flags = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    start = time.monotonic()
    with pytest.raises(wikitext.DataUnavailableError) as info:
        wikitext.load_articles("wikitext-103-v1", "train", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "could not download" in message and wikitext.HUB_DATASET in message
    assert "--data_path" in message and "--dataset synthetic" in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, ConnectionError)
    assert no_network == [] and time.monotonic() - start < 10  # no request, no retries
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == flags  # restored


@pytest.mark.parametrize("error", [
    ConnectionError("Couldn't reach 'x' on the Hub\n(LocalEntryNotFoundError)"),
    LocalEntryNotFoundError("file not in the cache\nand outgoing traffic disabled"),
    httpx.ConnectError("[Errno -2] Name or service not known"),
])
def test_unreachable_hub_errors_become_data_unavailable(monkeypatch: pytest.MonkeyPatch, error: Exception):
    def load_dataset(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(wikitext.DataUnavailableError) as info:
        wikitext.load_articles("wikitext-2-raw-v1", "test")
    assert "\n" not in str(info.value) and "--data_path" in str(info.value)
    assert info.value.__cause__ is error


def test_other_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch):
    def load_dataset(*args, **kwargs):
        raise KeyError("page")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(KeyError):
        wikitext.load_articles("wikitext-2-raw-v1", "test")


# --- tokenization -----------------------------------------------------------------------------

@pytest.fixture
def tokenizer():
    """A byte-level BPE tokenizer with `<|endoftext|>` as eos, like Pythia's (trained in the fixture)."""
    return build_tokenizer()


SEGMENTS = ["Hello world", "A much longer segment , with many more words in it than the first one has .", "x"]


def _check_left_padded(tokenizer, segments: list[str], batch: dict[str, torch.Tensor]) -> None:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == labels.dtype == torch.long
    for row, segment in enumerate(segments):
        real = tokenizer(segment)["input_ids"]
        pad = ids.shape[1] - len(real)
        assert mask[row].tolist() == [0] * pad + [1] * len(real)  # padding on the left
        assert ids[row, pad:].tolist() == real
        assert (ids[row, :pad] == tokenizer.pad_token_id).all()
    assert torch.equal(labels == -100, mask == 0)  # -100 exactly on the padding
    assert torch.equal(labels[mask == 1], ids[mask == 1])


def test_tokenize_left_pads_and_masks_labels(tokenizer):
    batch = wikitext.tokenize_segments(tokenizer, SEGMENTS, max_length=64)
    assert tokenizer.padding_side == "left"
    assert batch["input_ids"].shape[1] == max(len(tokenizer(s)["input_ids"]) for s in SEGMENTS)
    _check_left_padded(tokenizer, SEGMENTS, batch)


def test_tokenize_pads_with_eos_when_there_is_no_pad_token(tokenizer):
    tokenizer.pad_token = None
    segments = ["an eos in the text <|endoftext|> is a real token", "short"]
    batch = wikitext.tokenize_segments(tokenizer, segments, max_length=64)
    assert tokenizer.pad_token == tokenizer.eos_token
    _check_left_padded(tokenizer, segments, batch)
    eos = tokenizer.eos_token_id
    assert (batch["input_ids"][1] == eos).sum() > 1  # pads are eos ...
    in_text = (batch["input_ids"][0] == eos) & (batch["attention_mask"][0] == 1)
    assert in_text.sum() == 1 and (batch["labels"][0][in_text] == eos).all()  # ... yet a real eos keeps its label


def test_tokenize_truncates_to_max_length(tokenizer):
    long = " ".join(f"word{i}" for i in range(300))
    batch = wikitext.tokenize_segments(tokenizer, [long, "short"], max_length=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == tokenizer(long)["input_ids"][:16]  # the start is kept
    assert batch["attention_mask"][0].all() and (batch["labels"][0] != -100).all()
    _check_left_padded(tokenizer, ["short"], {k: v[1:] for k, v in batch.items()})


def test_tokenize_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="--max_length"):
        wikitext.tokenize_segments(tokenizer, ["a"], max_length=0)
    with pytest.raises(ValueError):
        wikitext.tokenize_segments(tokenizer, [], max_length=8)
