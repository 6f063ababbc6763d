"""A GGUF file's dequantized model kept as a plain transformers folder, so it is parsed once.

transformers reads a GGUF file's header for the config, again for the tokenizer and again for
the weights, then dequantizes them, a cost paid by every command that loads it (training,
evaluation, generation, unlearning). The first load writes what it built (config.json, the
tokenizer, model.safetensors in fp32: the exact dequantized values) to a cache folder; later loads
read that folder, much faster, and get the same weights bit for bit. The folder is named by the file's path, size, modification time and the transformers
version (which does the dequantizing), so a changed file or a new transformers builds anew.

The cache lives in $DOCMEM_CACHE_DIR, else $XDG_CACHE_HOME/docmem, else ~/.cache/docmem;
DOCMEM_CACHE_DIR=none turns it off. A cache that cannot be written only costs the speed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_ENV = "DOCMEM_CACHE_DIR"
OFF = "none"
COMPLETE = "docmem_gguf_cache.txt"  # written last: a folder without it is unfinished and ignored


def cache_root() -> Path | None:
    """Where converted GGUF models are kept, or None when the cache is turned off."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "docmem"


def cached_folder(gguf_path: Path) -> Path | None:
    """The cache folder for this GGUF file as it is now (it may not exist yet); None when off."""
    root = cache_root()
    if root is None:
        return None
    resolved = gguf_path.expanduser().resolve()
    stat = resolved.stat()
    identity = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers.__version__}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return root / "gguf" / f"{resolved.stem}-{digest}"


def is_complete(folder: Path | None) -> bool:
    return folder is not None and (folder / COMPLETE).is_file()


def store(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    """Write the dequantized model and its tokenizer to `folder`, atomically: written in a
    temporary folder beside it, then renamed, so a reader never sees half a model."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as err:
        log.warning("not caching the dequantized GGUF model in %s (%s): the next load parses the file again",
                    folder, err)
        return
    # The weights are plain fp32 tensors once dequantized; only the quantizer record blocks saving.
    quantizer, config_record = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if config_record is not None:
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE).write_text(f"dequantized from {source}\n")
        staging.rename(folder)
    except OSError as err:
        # A full disk, or another process that finished the same folder first: neither loses anything.
        if not is_complete(folder):
            log.warning("could not cache the dequantized GGUF model in %s (%s)", folder, err)
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if config_record is not None:
            model.config.quantization_config = config_record
