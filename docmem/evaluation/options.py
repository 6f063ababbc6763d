"""What an evaluation measures and how: EvalOptions (evaluate_memory.py's flags), and the
small file helpers every measurement shares. The files are described in docs/run_folder.md."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docmem.atomic import write_atomic
from docmem.errors import EvalError

EVAL_DIR = "eval"  # run_N/eval/: every file a run's evaluation writes


@dataclass
class EvalOptions:
    prompt_tokens: int = 32  # tokens of each segment given as the prompt
    new_tokens: int = 64  # tokens generated (and of reference text scored against)
    grid: int = 10  # landscape: grid x grid keys (0: none; it is the costliest part: grid^2 passes per document)
    l0_threshold: float = 1e-2  # an entry is in use when |s| exceeds this
    max_docs: int | None = None  # evaluate the first N documents only
    max_other_keys: int = 4  # other_keys: at most this many other documents' keys per document
    gen_batch_size: int = 128  # rows decoded together (each row leaves its batch when it has its tokens)
    key_sets_per_pass: int = 16  # CE: key sets batched into one suffix pass
    ce_other_keys: int = 0  # CE matrix: 0 = every key; K = each document's own key and K drawn others (linear)
    attribution_docs: int = 0  # attribution: 0 = every document's texts; Q = Q documents' (all N candidates)
    device: str = "auto"  # auto: the run's GPU if it had one and one is here, else cpu
    threads: int = 0  # CPU threads for torch (0: torch's default)

    def validate(self) -> EvalOptions:
        for name in ("prompt_tokens", "new_tokens", "gen_batch_size", "key_sets_per_pass"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.grid < 2 and self.grid != 0:
            raise EvalError(f"--grid {self.grid}: must be >= 2 (or 0: no landscape)")
        if self.max_other_keys < 1:
            raise EvalError(f"--max_other_keys {self.max_other_keys}: must be >= 1")
        for name in ("ce_other_keys", "attribution_docs"):
            if getattr(self, name) < 0:
                raise EvalError(f"--{name} {getattr(self, name)}: must be >= 0 (0: every document)")
        if self.max_docs is not None and self.max_docs < 1:
            raise EvalError(f"--max_docs {self.max_docs}: must be >= 1")
        if self.threads < 0:
            raise EvalError(f"--threads {self.threads}: must be >= 0")
        if not self.l0_threshold >= 0:
            raise EvalError(f"--l0_threshold {self.l0_threshold}: must be >= 0")
        return self


def write_json(path: Path, data: Any) -> Path:
    """Pretty JSON, non-ASCII kept, NaN/inf refused (they are not JSON)."""
    return write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
