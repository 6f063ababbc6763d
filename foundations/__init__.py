"""The frozen foundation LMs docmem puts a document memory into (Pythia, Llama-2, SmolLM2, any --lm_path)."""
from docmem.errors import FoundationUnavailableError

from .common import (
    Foundation,
    block_device,
    find_blocks,
    freeze,
    from_model,
    module_name,
    prepare_tokenizer,
)
from .devices import gpu_count, split_device_map
from .load import load_foundation, load_pretrained
from .registry import MODEL_SIZES, NUM_LAYERS, check_name_size, hub_id

__all__ = [
    "Foundation",
    "FoundationUnavailableError",
    "MODEL_SIZES",
    "NUM_LAYERS",
    "block_device",
    "check_name_size",
    "find_blocks",
    "freeze",
    "from_model",
    "gpu_count",
    "hub_id",
    "load_foundation",
    "load_pretrained",
    "module_name",
    "prepare_tokenizer",
    "split_device_map",
]
