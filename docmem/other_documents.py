"""A fixed draw of other documents for each document: which other keys the CE before and after
training (docmem/training/key_ce.py) and a sampled CE matrix (docmem/evaluation/ce_table.py) score each
document under, so both stay linear in the documents and give the same columns in every process."""
from __future__ import annotations

import torch


def drawn_other_documents(num_docs: int, per_document: int, seed: int = 12345) -> torch.Tensor:
    """(num_docs, per_document) other documents' ids, drawn uniformly for each document from a
    fixed generator: the same table in every process and for every batching."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, num_docs - 1, (num_docs, per_document), generator=generator)
    return draw + (draw >= torch.arange(num_docs).unsqueeze(1)).long()  # skip the document itself
