"""A tiny Pythia-shaped model (3 blocks, hidden 32, a 512-token byte-level BPE tokenizer trained
here on synthetic articles) saved to a folder, so `train_guidance.py --lm_path` runs a whole
training in seconds, with nothing from ../shared; and helpers to run it.

Import the fixtures into a test module (`from fixtures_tiny import tiny_lm_dir`); the folder is
built once per test session.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow
import pytest
import torch
from pyarrow import parquet
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from conftest import ROOT
from docmem import synthetic

TRAIN_SCRIPT = ROOT / "train_guidance.py"
TINY_VOCAB = 512
END_OF_TEXT = "<|endoftext|>"  # Pythia's bos = eos token, so the tiny model pads as Pythia does
_BUILT: dict[str, Path] = {}


def build_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (every text encodes, as with GPT-NeoX's) trained on synthetic
    articles: the data the tiny runs train on. Deterministic, well under a second to train."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(synthetic.generate_articles(40, seed=0), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)


def build_local_wikitext(folder: Path, configs: tuple[str, ...] = ("wikitext-2-raw-v1", "wikitext-2-v1",
                                                                   "wikitext-103-raw-v1")) -> Path:
    """A local copy in the layout of EleutherAI/wikitext_document_level, test split only:
    <config>/<config>-test.parquet, a `page` column of synthetic articles (as many as the
    shared copy's wikitext-2 test split has, 62)."""
    pages = synthetic.generate_articles(62, seed=3)
    for config in configs:
        (folder / config).mkdir(parents=True, exist_ok=True)
        parquet.write_table(pyarrow.table({"page": pages}), folder / config / f"{config}-test.parquet")
    return folder


def build_tiny_lm(folder: Path) -> Path:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    if "lm" not in _BUILT:
        _BUILT["lm"] = build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
    return _BUILT["lm"]


def tiny_argv(lm_dir: Path, save_dir: Path, *extra: str, num_epochs: int = 6, save_freq: int = 2) -> list[str]:
    """A complete, quick training command line (3 documents, 3 batches an epoch)."""
    return ["--lm_path", str(lm_dir), "--dataset", "synthetic", "--synthetic_articles", "10", "--max_labels", "3",
            "--max_segments", "2", "--segment_length", "32", "--max_length", "64", "--hook_memory_layer", "2",
            "--num_epochs", str(num_epochs), "--save_freq", str(save_freq), "--num_gpus", "0", "--lr", "1e-2",
            "--save_dir", str(save_dir), *extra]


# torchrun on one machine, its rendezvous and its processes bound to the loopback address, not to
# "localhost" or the host name (--standalone's), which an odd machine may not resolve to itself
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", "docmem-test", "--local-addr", "127.0.0.1"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"})
    env.update(extra)
    return env


def start_training(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A training process in the background, its stderr going to `log` (a pipe could fill up and
    stall it while nobody reads). Wait for it with finish()."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *argv], cwd=ROOT, env=subprocess_env(**env),
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for the process; returns its stderr."""
    proc.wait(timeout=timeout)
    return proc.log.read_text()


def run_training(argv: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *argv], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the file has `count` lines (or more), while the process runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before {path} had {count} lines: "
                                 f"{proc.log.read_text()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {count} lines in {timeout} s")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same training: memory weights bitwise, metrics lines, summaries."""
    wa, wb = load_tensors(a / "memory" / "memory.safetensors"), load_tensors(b / "memory" / "memory.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name], wb[name]), name
    assert (a / "metrics.jsonl").read_text().splitlines() == (b / "metrics.jsonl").read_text().splitlines()
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    for key in ("wall_seconds", "train_seconds", "summary_seconds", "prefix_seconds", "run_dir"):  # timings differ
        sa.pop(key), sb.pop(key)
    assert sa == sb
    folders = sorted(p.name for p in (a / "summaries").iterdir())
    assert folders == sorted(p.name for p in (b / "summaries").iterdir())
    for folder in folders:
        for name in ("selection.json", "logit_lens.json"):
            assert (a / "summaries" / folder / name).read_text() == (b / "summaries" / folder / name).read_text()
    from PIL import Image

    for name in ("losses.gif", "docreps.gif", "logits.gif"):
        with Image.open(a / name) as ga, Image.open(b / name) as gb:
            assert ga.n_frames == gb.n_frames, name


@pytest.fixture(scope="session")
def reference_runs(tiny_lm_dir, tmp_path_factory) -> list[Path]:
    """Two uninterrupted training processes with the same flags and different PYTHONHASHSEED,
    started at the same moment into one --save_dir. Returns their run folders."""
    if "reference" not in _BUILT:
        folder = tmp_path_factory.mktemp("reference")
        save_dir = folder / "runs"
        procs = [start_training(tiny_argv(tiny_lm_dir, save_dir), folder / f"log_{seed}", PYTHONHASHSEED=seed)
                 for seed in ("1", "2")]
        for proc in procs:
            err = finish(proc)
            assert proc.returncode == 0, err[-3000:]
        runs = sorted(save_dir.iterdir())
        assert [r.name for r in runs] == ["run_0", "run_1"]
        _BUILT["reference"] = save_dir
    return sorted(_BUILT["reference"].iterdir())
