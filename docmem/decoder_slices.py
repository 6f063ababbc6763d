"""Running a slice of the decoder's blocks: those up to the hooked block (the prefix) or those above it.

The decoder's own forward runs the slice, its block list swapped for the slice (and its final norm for
an identity when the slice stops below the top), so attention masks, positions and rotary embeddings stay
the library's. The loss engine's prefix cache and greedy decoding's shared prompt pass both use it. Also
here: the distinct rows of a batch, since a row repeated in a batch has the same prefix.

When no block is left above the hooked one, `top` runs the final norm alone: for these architectures
that is all the decoder would do, and it skips building the attention mask, which reads the mask
on the host (a wait for the GPU in every step).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from foundations import Foundation, module_name
from utils import final_norm

# decoders whose forward on inputs_embeds with no blocks is the final norm alone (dropout aside, an
# identity in eval mode); others (GPT-2 adds position embeddings) run the decoder all the same
NORM_ONLY_TOPS = frozenset({"gpt_neox", "llama"})


class DecoderSlices:
    """The decoder of a foundation, run on any contiguous range of its blocks."""

    def __init__(self, foundation: Foundation) -> None:
        self.foundation = foundation
        self.decoder = foundation.decoder()
        self.blocks_name = module_name(self.decoder, foundation.blocks)
        self.norm = final_norm(self.decoder)
        self.norm_name = module_name(self.decoder, self.norm) if not isinstance(self.norm, nn.Identity) else None
        if "." in self.blocks_name + (self.norm_name or ""):  # swapped by setattr: direct children only
            raise ValueError(f"the blocks or final norm are not direct children of {type(self.decoder).__name__}; "
                             "this architecture needs --reference_loop")
        model_type = getattr(getattr(foundation.model, "config", None), "model_type", None)
        self.norm_only_top = model_type in NORM_ONLY_TOPS
        self.slices: dict[tuple[int, int], nn.ModuleList] = {}  # made once: every step runs the same slice

    def top(self, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state for `hidden` (B, T, d) entering block `start`: the blocks from
        there to the last, then the final norm."""
        stop = self.foundation.num_blocks
        if start >= stop and self.norm_only_top and not self.decoder.training:
            return self.norm(hidden)
        with self.blocks(start, stop, final_norm=True) as decoder:
            return decoder(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state

    @contextmanager
    def blocks(self, start: int, stop: int, final_norm: bool) -> Iterator[nn.Module]:
        """The decoder running blocks start..stop-1 only, then its final norm if final_norm (the part below
        a hooked block leaves it out even when that block is the last)."""
        blocks = self.slices.get((start, stop))
        if blocks is None:
            blocks = self.slices[start, stop] = nn.ModuleList(list(self.foundation.blocks)[start:stop])
        original_blocks = getattr(self.decoder, self.blocks_name)
        original_norm = getattr(self.decoder, self.norm_name) if self.norm_name else None
        setattr(self.decoder, self.blocks_name, blocks)
        if self.norm_name and not final_norm:
            setattr(self.decoder, self.norm_name, nn.Identity())
        try:
            yield self.decoder
        finally:
            setattr(self.decoder, self.blocks_name, original_blocks)
            if self.norm_name:
                setattr(self.decoder, self.norm_name, original_norm)


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor
                  ) -> tuple[torch.Tensor | slice, torch.Tensor | None]:
    """The rows to run a prefix on, and for every row which of them it repeats (None: all distinct).
    The distinct rows keep the order in which they first appear."""
    rows = torch.cat([input_ids, attention_mask], dim=1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0]:
        return slice(None), None
    position = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((distinct.shape[0],), rows.shape[0], device=rows.device).scatter_reduce(0, inverse, position,
                                                                                              "amin")
    order = torch.argsort(first)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.shape[0], device=order.device)
    return first[order], slot[inverse]

