"""The frozen foundation LM: what the rest of docmem needs to know about it, for any architecture.

A `Foundation` bundles a causal LM with its tokenizer and the list of its transformer blocks,
found from the module tree rather than from a hard-coded attribute name, so the memory hook
can sit on any block of GPT-NeoX (Pythia), Llama, GPT-2 and similar models.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Foundation:
    model: PreTrainedModel  # causal LM, eval mode, every parameter requires_grad=False
    tokenizer: PreTrainedTokenizerBase  # pad_token = eos_token, padding_side = "left"
    name: str  # "pythia-1b", "smollm2-135m", or the --lm_path given
    hidden_size: int
    num_blocks: int
    blocks: nn.ModuleList  # the transformer blocks, in order

    def block(self, index: int) -> nn.Module:
        """The block whose output the memory hook replaces (0-based, as --hook_memory_layer)."""
        # No negative indices: a negative --hook_memory_layer is almost certainly a typo.
        position = operator.index(index) if hasattr(index, "__index__") and not isinstance(index, bool) else None
        if position is None or not 0 <= position < self.num_blocks:
            raise ValueError(
                f"--hook_memory_layer {index!r} is out of range for {self.name}, which has "
                f"{self.num_blocks} blocks: use 0 to {self.num_blocks - 1}"
            )
        return self.blocks[position]

    @property
    def input_device(self) -> torch.device:
        """Where input ids must go: the device of the input embedding (the first GPU when split)."""
        return next(self.model.get_input_embeddings().parameters()).device

    def decoder(self) -> nn.Module:
        """The base model that owns `blocks` (model.gpt_neox, model.model, model.transformer, ...)."""
        return _parent_of(self.model, self.blocks)


def module_name(root: nn.Module, target: nn.Module) -> str:
    """The dotted name of `target` inside `root` (a direct child's name has no dot)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _parent_of(root: nn.Module, target: nn.Module) -> nn.Module:
    name = module_name(root, target)
    parent_name = name.rpartition(".")[0]
    return root.get_submodule(parent_name) if parent_name else root


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks, found from the architecture.

    Candidates are the ModuleLists whose length equals config.num_hidden_layers (every
    transformers config maps its own name, e.g. GPT-2's n_layer, onto it); the one holding the
    most parameters wins, so a per-layer list of small modules (norms, adapters) never does.
    """
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None) if config is not None else None
    candidates = [
        module for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    if not candidates:
        wanted = f" with {expected} entries (config.num_hidden_layers)" if expected is not None else ""
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList{wanted}")
    # max() keeps the first of equals, i.e. the outermost list in module order.
    return max(candidates, key=_parameter_count)


def block_device(foundation: Foundation, index: int) -> torch.device:
    """The device a block's parameters live on: where the memory module of that block belongs."""
    block = foundation.block(index)
    for parameter in block.parameters():
        return parameter.device
    return foundation.input_device


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad with the end-of-text token on the left, as the method does (docs/design.md, "Data").

    The pad token is always set to eos, even when the tokenizer has its own (transformers 5
    gives Pythia's tokenizer `<|padding|>`): the method pads with eos, and left padding keeps the
    last position of every row a real token for generation.
    """
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token to pad with")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # A BPE tokenizer decodes without the WordPiece space clean-up: transformers 5.17+ ignores the flag
    # for BPE (and warns once), earlier 5.x applied it. False gives every version the same text.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and type(getattr(backend, "model", None)).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Nothing of the LM trains, and dropout is off (released-code defects 4 and 8)."""
    model.requires_grad_(False)
    model.eval()
    return model


def from_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "custom") -> Foundation:
    """Wrap an already built causal LM: freeze it, prepare the tokenizer, find its blocks."""
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output layer: docmem needs a causal LM (AutoModelForCausalLM)")
    freeze(model)
    prepare_tokenizer(tokenizer)
    # generate() warns on every call when the model has no pad id.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    blocks = find_blocks(model)
    # Every transformers config maps its own name (GPT-2's n_embd) onto hidden_size; else ask the embedding.
    embedding = next(model.get_input_embeddings().parameters())
    hidden_size: int = getattr(model.config, "hidden_size", None) or embedding.shape[-1]
    return Foundation(
        model=model, tokenizer=tokenizer, name=name,
        hidden_size=hidden_size, num_blocks=len(blocks), blocks=blocks,
    )
