"""Where the foundation's weights go: CPU, one GPU, or its blocks split evenly over several GPUs."""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PreTrainedModel

from .common import find_blocks

logger = logging.getLogger(__name__)

DeviceMap = dict[str, int]


def gpu_count(num_gpus: int) -> int:
    """How many GPUs to use for --num_gpus: 0 means CPU.

    Without CUDA every request falls back to CPU with a warning, so the same command line runs
    on a laptop; with CUDA, asking for more GPUs than exist is an error.
    """
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0:
        raise ValueError(f"--num_gpus must be a whole number >= 0, got {num_gpus!r}")
    if num_gpus == 0:
        return 0
    if not torch.cuda.is_available():
        logger.warning("--num_gpus %d asked for but CUDA is not available: running on CPU", num_gpus)
        return 0
    available = torch.cuda.device_count()
    if num_gpus > available:
        raise ValueError(f"--num_gpus {num_gpus} asked for but only {available} CUDA GPU(s) are visible")
    return num_gpus


def _contains(module: nn.Module, targets: list[nn.Module]) -> bool:
    return any(sub is t for sub in module.modules() for t in targets)


def split_device_map(model: PreTrainedModel, num_gpus: int) -> DeviceMap:
    """An accelerate device map splitting the blocks evenly over GPUs 0..num_gpus-1.

    Blocks go in contiguous runs (block i on GPU i * num_gpus // num_blocks); modules before the
    blocks (input embedding, dropout) go on the first GPU, those after them (final norm, output
    layer) on the last. A tied output layer shares the embedding's weight, so it stays on the first.
    `model` may be an empty (meta) skeleton: only its module tree is read.
    """
    if num_gpus < 1:
        raise ValueError(f"split_device_map needs at least one GPU, got {num_gpus}")
    blocks = find_blocks(model)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # On an empty skeleton the weights are not tied yet, so the config has the last word.
    tied = head is not None and (
        head.weight is embedding.weight or bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    )
    first, last = 0, num_gpus - 1
    landmarks = [m for m in (blocks, embedding, head) if m is not None]
    device_map: DeviceMap = {}
    after_blocks = False  # module order says whether a leftover module runs before or after the blocks

    def visit(prefix: str, module: nn.Module) -> None:
        nonlocal after_blocks
        for child_name, child in module.named_children():
            name = prefix + child_name
            if child is blocks:
                for i in range(len(blocks)):
                    device_map[f"{name}.{i}"] = i * num_gpus // len(blocks)
                after_blocks = True
            elif child is embedding:
                device_map[name] = first
            elif child is head:
                device_map[name] = first if tied else last
            elif _contains(child, landmarks):
                visit(name + ".", child)
            else:
                device_map[name] = last if after_blocks else first
        # Tensors owned directly by a module that was split into its children.
        owned = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, _ in owned:
            device_map[prefix + tensor_name] = last if after_blocks else first

    visit("", model)
    return device_map
