"""The document in the prompt (a baseline with no training): each document's training text, tokenized,
placed before the text being generated or scored. Its condition for a document is that document's text
in the context; NO_MEMORY is the plain LM with no context.

`training_text` rebuilds the words a document's segments cover (windows of segment_length words with a
stride of half that: each later segment adds its last `stride` words). `PromptEngine` is an
engines.LossEngine whose key sets are document indices: the scored tokens are the same under every
condition (each row's real tokens after its first), so CEs compare across contexts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import wikitext
from docmem.batching import Batch, left_pad
from docmem.engines import NO_MEMORY, KeySet
from foundations import Foundation


def training_text(document: wikitext.Document, segment_length: int) -> str:
    """The words the document's segments cover, each once, in order."""
    stride = max(1, segment_length // 2)
    words = document.segments[0].split()
    for segment in document.segments[1:]:
        later = segment.split()
        words += later[len(later) - stride:] if len(later) > stride else later
    return " ".join(words)


def context_ids(tokenizer: object, documents: Sequence[wikitext.Document], segment_length: int) -> list[list[int]]:
    """Each document's training text as token ids (tokenized as segments are)."""
    return [tokenizer(training_text(d, segment_length))["input_ids"] for d in documents]  # type: ignore[operator]


class PromptEngine:
    """Token CE of a batch with a document's text before every row (one key set = one document index),
    or NO_MEMORY (no context). Runs the whole LM; nothing trains."""

    def __init__(self, foundation: Foundation, contexts: list[list[int]]) -> None:
        self.foundation, self.contexts = foundation, contexts
        self.pad_id = foundation.tokenizer.pad_token_id if foundation.tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def losses(self, batch: Batch, key_sets: Sequence[KeySet], per_document: bool = False) -> list[torch.Tensor]:
        out = []
        for key in key_sets:
            if isinstance(key, str) and key == NO_MEMORY:
                context: list[int] = []
            elif isinstance(key, int):
                context = self.contexts[key]
            else:
                raise ValueError(f"a prompt baseline's condition is a document index or NO_MEMORY, not {key!r}")
            out.append(self._ce(batch, context, per_document))
        return out

    def _ce(self, batch: Batch, context: list[int], per_document: bool) -> torch.Tensor:
        rows, targets = [], []
        for ids, mask in zip(batch.input_ids, batch.attention_mask):
            real = ids[mask.bool()].tolist()
            rows.append(context + real)
            # the row's first token is never scored (without a context nothing predicts it)
            targets.append([-100] * (len(context) + 1) + real[1:])
        width = max(len(r) for r in rows)
        ids = torch.cat([left_pad(torch.tensor([r]), width, self.pad_id) for r in rows])
        mask = torch.cat([left_pad(torch.ones(1, len(r), dtype=torch.long), width, 0) for r in rows])
        labels = torch.cat([left_pad(torch.tensor([t]), width, -100) for t in targets])
        device = self.foundation.input_device
        logits = self.foundation.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        labels = labels.to(logits.device)
        per_token = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                ignore_index=-100, reduction="none")  # (rows, T - 1)
        sums, counts = per_token.sum(dim=1).cpu(), (labels[:, 1:] != -100).sum(dim=1).float().cpu()
        if not per_document:
            return sums.sum() / counts.sum().clamp(min=1)
        _, group = torch.unique_consecutive(batch.group_ids, return_inverse=True)
        groups = int(group.max()) + 1
        return (torch.zeros(groups).index_add(0, group, sums) / torch.zeros(groups).index_add(0, group, counts)
                .clamp(min=1))

    def clear_cache(self) -> None:
        pass
