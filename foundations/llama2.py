"""Llama-2, base and chat, in the Hugging Face format (gated on the Hub: accept the licence first)."""
from __future__ import annotations

NUM_LAYERS: dict[str, int] = {"7b": 32, "13b": 40}
SIZES: tuple[str, ...] = tuple(NUM_LAYERS)


def hub_id(size: str, chat: bool = False) -> tuple[str, None]:
    """(repo id, revision) on the Hugging Face Hub; the main branch, so no revision."""
    suffix = "-chat-hf" if chat else "-hf"
    return f"meta-llama/Llama-2-{size}{suffix}", None
