"""A single GGUF file as --lm_path (llama.cpp's format): transformers dequantizes it on load, as for
the packaged SmolLM2, when it supports the file's architecture (llama, mistral, qwen2, gpt2, ...)."""
from __future__ import annotations

from pathlib import Path

GGUF_SUFFIX = ".gguf"


def is_gguf_file(path: str | Path) -> bool:
    return Path(path).expanduser().suffix.lower() == GGUF_SUFFIX


def gguf_block_count(path: str | Path) -> int | None:
    """The block count the file's metadata declares (`<architecture>.block_count`), if any.

    Raises ValueError when the file is not a readable GGUF file."""
    from gguf import GGUFReader  # optional: only a .gguf --lm_path needs it; reads the header (memory-mapped)

    try:
        reader = GGUFReader(str(Path(path).expanduser()))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"not a readable GGUF file ({type(err).__name__}: {err})") from err
    arch = reader.fields.get("general.architecture")
    if arch is None:
        return None
    count = reader.fields.get(f"{arch.contents()}.block_count")
    return int(count.contents()) if count is not None else None
