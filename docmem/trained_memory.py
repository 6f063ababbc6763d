"""A trained memory, ready to use: `load_memory_run(path)` -> frozen LM + memory + document titles.

    from docmem.trained_memory import load_memory_run
    tm = load_memory_run("outputs/demo/run_0")          # a run folder, its memory/, or a save_dir
    print(tm.select(0).generate())                       # document 0, prompted with its opening title

`select(doc)` takes an index or a title; `no_key()` runs the memory without a key; `plain_lm()`
bypasses it. Each returns a new view that holds its own condition and shares the loaded LM and
memory (no copy of any weight), so `a = tm.select(0); b = tm.plain_lm()` keeps two conditions: `a`
generates document 0 and `b` the plain LM, in any order. The memory is attached (a forward hook)
only while `generate` runs, so the LM is left untouched between calls and other code can attach
its own hooks.

What to load comes from memory/memory_config.json's provenance block; an older memory/ without
one takes it from its run's config.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from docmem.config import RUN_CONFIG_NAME, TrainConfig, load_run_config
from docmem.engines import NO_MEMORY
from docmem.errors import DocmemError, MemoryRunError, UnknownDocumentError, UsageError
from docmem.provenance import provenance_from_saved
from docmem.run_folder import LORA_CONFIG_NAME, MEMORY_DIR, resolve_run_dir
from docmem.sharding import load_any_memory
from document_memories import (
    CONFIG_NAME,
    PROVENANCE_FIELD,
    DocumentMemory,
    MemoryFileError,
    read_memory_json,
)
from foundations import Foundation, block_device, load_foundation
from foundations.placement import resolve_dtype
from hook_lm import attach_memory


def locate_memory(path: str | Path) -> tuple[Path, Path | None]:
    """(memory folder, run folder or None) for a run folder, a memory/ folder or a save_dir."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MemoryRunError(f"{path}: no such folder")
    if not path.is_dir():
        raise MemoryRunError(f"{path}: not a folder (give a run folder save_dir/run_N or its memory/ folder)")
    if (path / CONFIG_NAME).is_file():
        run_dir = path.parent if (path.parent / RUN_CONFIG_NAME).is_file() else None
        return path, run_dir
    _refuse_lora(path)
    try:
        run_dir = resolve_run_dir(path)
    except DocmemError as err:
        raise MemoryRunError(f"{path}: neither a run folder, a memory/ folder nor a save_dir with a finished run") from err
    _refuse_lora(run_dir / MEMORY_DIR)
    if not (run_dir / MEMORY_DIR / CONFIG_NAME).is_file():
        raise MemoryRunError(f"{run_dir}: no {MEMORY_DIR}/{CONFIG_NAME} (the run has not finished, or it crashed)")
    return run_dir / MEMORY_DIR, run_dir


def _refuse_lora(memory_dir: Path) -> None:
    if (memory_dir / LORA_CONFIG_NAME).is_file():
        raise MemoryRunError(f"{memory_dir.parent if memory_dir.name == MEMORY_DIR else memory_dir}: a LoRA baseline "
                             "run (--document_memory lora or lora_shared); this script takes keyed and shared "
                             "memories: measure the run with evaluate_memory.py --run_dir")


def read_run_yaml(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a dict (checked as training wrote it)."""
    return load_run_config(run_dir, flag="run_dir")[1]


def read_provenance(memory_dir: Path, run_dir: Path | None) -> dict[str, Any]:
    """The memory's provenance block; for an older memory/, built from its run's config.yaml."""
    provenance = read_memory_json(memory_dir).get(PROVENANCE_FIELD)
    if isinstance(provenance, dict):
        return provenance
    if run_dir is None:
        raise MemoryRunError(f"{memory_dir}: an older memory/ (no provenance in {CONFIG_NAME}) needs its run's "
                             f"{RUN_CONFIG_NAME} in the folder above it")
    return provenance_from_saved(read_run_yaml(run_dir))


def auto_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def document_index(documents: list[dict[str, Any]], doc: int | str) -> int:
    """An index (int or digits) or an exact title among provenance documents -> its key row."""
    text = str(doc).strip()
    n = len(documents)
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < n:
            return index
        raise UnknownDocumentError(f"--doc {text}: no such document index (allowed: 0..{n - 1}, or a title)")
    for d in documents:
        if d["title"] == text:
            return int(d["index"])
    shown = ", ".join(repr(d["title"]) for d in documents[:10]) + (", ..." if n > 10 else "")
    raise UnknownDocumentError(f"--doc {text!r}: no document has this title (allowed: 0..{n - 1} or one of {shown})")


@dataclass(frozen=True)
class TrainedMemory:
    """A loaded memory under one condition (the plain LM as loaded); select(), no_key() and plain_lm()
    return other views of the same LM and memory."""

    foundation: Foundation
    memory: DocumentMemory
    layer: int  # the hooked block
    documents: list[dict[str, Any]]  # provenance documents: index (= key row), title, source_row, segments
    provenance: dict[str, Any]
    memory_dir: Path
    run_dir: Path | None
    dtype: torch.dtype
    # what generate() runs with: a (1, key_dim) key, None (memory without a key) or NO_MEMORY
    condition: torch.Tensor | str | None = field(default=NO_MEMORY)
    label: str = "no_memory"
    selected: int | None = None  # the selected document, if any

    @property
    def titles(self) -> list[str]:
        return [d["title"] for d in self.documents]

    @property
    def openings(self) -> list[str]:
        """Each document's title as it opens the document (the default prompt)."""
        return [d.get("opening") or d["title"] for d in self.documents]

    @property
    def max_length(self) -> int:
        return int((self.provenance.get("data") or {}).get("max_length") or 256)

    def doc_index(self, doc: int | str) -> int:
        """An index (int or digits) or an exact title -> the document's key row."""
        return document_index(self.documents, doc)

    def key(self, doc: int | str) -> torch.Tensor:
        """The document's key, (1, key_dim)."""
        if not self.memory.config.use_keys:
            raise UnknownDocumentError("this is a shared memory (trained without keys): it has no document to select")
        return self.memory.keys_for([self.doc_index(doc)]).detach()

    def select(self, doc: int | str) -> TrainedMemory:
        """A view that generates under the document's key (this one is left as it is)."""
        index = self.doc_index(doc)
        return replace(self, condition=self.key(index), label=f"doc {index}: {self.titles[index]}", selected=index)

    def no_key(self) -> TrainedMemory:
        """A view that runs the memory without a key."""
        return replace(self, condition=None, label="no_key", selected=None)

    def plain_lm(self) -> TrainedMemory:
        """A view that bypasses the memory: the frozen LM alone."""
        return replace(self, condition=NO_MEMORY, label="no_memory", selected=None)

    @torch.no_grad()
    def generate(self, prompt: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> str:
        """The continuation of `prompt` (default: the selected document's title as it opens the document,
        e.g. `= Title =` for a WikiText article; its bare title for a memory saved without it) under this view's
        condition: greedy when temperature is 0, else sampled (seeded)."""
        if prompt is None:
            if self.selected is None:
                raise UsageError("no prompt given and no document selected to take the title of")
            prompt = self.openings[self.selected]
        if not prompt.strip():
            raise UsageError("the prompt is empty")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokenizer = self.foundation.tokenizer
        encoded = tokenizer(prompt, return_tensors="pt").to(self.foundation.input_device)
        sample = temperature > 0
        options: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
                                   if sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
        keys = self.condition if isinstance(self.condition, torch.Tensor) else None
        with attach_memory(self.foundation.block(self.layer), self.memory, keys) as hook, torch.random.fork_rng(
                devices=[self.foundation.input_device] if self.foundation.input_device.type == "cuda" else []):
            hook.enabled = not (isinstance(self.condition, str) and self.condition == NO_MEMORY)
            torch.manual_seed(seed)
            out = self.foundation.model.generate(**encoded, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                                 num_beams=1, pad_token_id=tokenizer.pad_token_id, **options)
        return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def load_memory_run(path: str | Path, device: str = "auto") -> TrainedMemory:
    """The frozen LM of the run, its memory on the hooked block's device, and its documents."""
    memory_dir, run_dir = locate_memory(path)
    provenance = read_provenance(memory_dir, run_dir)
    model = provenance.get("model") or {}
    layer = provenance.get("hook_memory_layer")
    if not isinstance(layer, int) or not (model.get("lm_path") or model.get("lm_name")):
        raise MemoryRunError(f"{memory_dir}: its provenance names no base model or hooked block")
    device = auto_device(device)
    dtype = resolve_dtype(TrainConfig(precision=provenance.get("precision") or "auto"), device)
    lm_cache_dir = read_run_yaml(run_dir).get("lm_cache_dir") if run_dir is not None else None
    foundation = load_foundation(model.get("lm_name") or "", model.get("lm_size") or "", lm_path=model.get("lm_path"),
                                 lm_cache_dir=lm_cache_dir, num_gpus=0 if device == "cpu" else 1, dtype=dtype)
    if layer >= foundation.num_blocks:
        raise MemoryRunError(f"{memory_dir}: hooked block {layer} is beyond {foundation.name}'s {foundation.num_blocks} blocks")
    documents = list(provenance.get("documents") or [])
    try:
        memory = load_any_memory(memory_dir, device=block_device(foundation, layer), expect_hidden_size=foundation.hidden_size,
                             expect_num_docs=len(documents) or None)
    except MemoryFileError as err:
        raise MemoryRunError(str(err)) from err
    memory.eval()
    return TrainedMemory(foundation, memory, layer, documents, provenance, memory_dir, run_dir, dtype)
