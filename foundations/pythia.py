"""Pythia (GPT-NeoX architecture), the deduplicated runs at their final checkpoint, as the paper uses."""
from __future__ import annotations

# Block counts from the Pythia model cards; the hook's default block 15 is the last of 1b.
NUM_LAYERS: dict[str, int] = {
    "70m": 6, "160m": 12, "410m": 24, "1b": 16, "1.4b": 24, "2.8b": 32, "6.9b": 32, "12b": 36,
}
SIZES: tuple[str, ...] = tuple(NUM_LAYERS)
REVISION = "step143000"  # the last training step: the fully trained model


def hub_id(size: str) -> tuple[str, str]:
    """(repo id, revision) on the Hugging Face Hub; `size` must be one of SIZES."""
    return f"EleutherAI/pythia-{size}-deduped", REVISION
