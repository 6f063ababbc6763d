"""The named foundation models (--lm_name, --lm_size): sizes, block counts and where they come from.

Plain constants, so command-line flags such as --hook_memory_layer can be checked before a
multi-gigabyte download starts.
"""
from __future__ import annotations

from . import llama2, pythia, smollm2

MODEL_SIZES: dict[str, tuple[str, ...]] = {
    "pythia": pythia.SIZES,
    "llama2_hf": llama2.SIZES,
    "llama2_chat_hf": llama2.SIZES,
    "smollm2": smollm2.SIZES,
}
NUM_LAYERS: dict[str, dict[str, int]] = {
    "pythia": pythia.NUM_LAYERS,
    "llama2_hf": llama2.NUM_LAYERS,
    "llama2_chat_hf": llama2.NUM_LAYERS,
    "smollm2": smollm2.NUM_LAYERS,
}


def check_name_size(lm_name: str, lm_size: str) -> None:
    """ValueError naming the flag and the allowed values when --lm_name/--lm_size is unknown."""
    if lm_name not in MODEL_SIZES:
        raise ValueError(f"unknown --lm_name {lm_name!r}: choose one of {', '.join(MODEL_SIZES)} (or give --lm_path)")
    if lm_size not in MODEL_SIZES[lm_name]:
        sizes = ", ".join(MODEL_SIZES[lm_name])
        raise ValueError(f"unknown --lm_size {lm_size!r} for {lm_name}: choose one of {sizes}")


def hub_id(lm_name: str, lm_size: str) -> tuple[str, str | None]:
    """(repo id, revision) of a named model on the Hugging Face Hub."""
    check_name_size(lm_name, lm_size)
    if lm_name == "pythia":
        return pythia.hub_id(lm_size)
    if lm_name in ("llama2_hf", "llama2_chat_hf"):
        return llama2.hub_id(lm_size, chat=lm_name == "llama2_chat_hf")
    raise ValueError(f"--lm_name {lm_name} is not downloaded from the Hub: it loads offline from a package")
