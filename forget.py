"""Take one document out of a trained memory, without retraining; writes a new memory/ folder.

    python forget.py --run_dir outputs/demo/run_0 --doc 0 --method edit
    python forget.py --run_dir RUN --doc "Some Title" --method drop_key --out RUN/memory_without_title

--method drop_key removes the document's key (it can no longer be selected; its content stays in
the weights, one key away); --method edit also projects the selection direction that only this
document used out of the memory (see docmem/forgetting.py and the README). The new folder loads
like any memory/ (generate.py, attribute.py --run_dir NEW). Measure the effect with
`python evaluate_memory.py --run_dir RUN --forget DOC`. The LM is not loaded.
"""
from __future__ import annotations

import sys
from pathlib import Path

from docmem.cli import new_parser, run_and_print
from docmem.forgetting import FORGET_METHODS, forget, forgotten_provenance
from docmem.trained_memory import (
    MemoryRunError,
    document_index,
    locate_memory,
    read_provenance,
)
from document_memories import load_memory

PROG = "forget.py"


def build_parser():
    parser = new_parser(PROG, "Take one document out of a trained memory (no retraining).", loads_lm=False)
    parser.add_argument("--doc", required=True, metavar="TITLE_OR_INDEX", help="the document to forget")
    parser.add_argument("--method", choices=FORGET_METHODS, default="edit",
                        help="drop_key: remove its key; edit: also project its own selection direction out")
    parser.add_argument("--out", default=None,
                        help="new memory folder (default: memory_forget_<doc>_<method> beside the memory)")
    return parser


def forget_command(args) -> dict:
    memory_dir, run_dir = locate_memory(args.run_dir)
    provenance = read_provenance(memory_dir, run_dir)
    documents = provenance.get("documents") or []
    doc = document_index(documents, args.doc)
    out = Path(args.out) if args.out else memory_dir.parent / f"memory_forget_{doc}_{args.method}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MemoryRunError(f"--out {out}: exists and is not an empty folder (choose another)")
    memory = load_memory(memory_dir, expect_num_docs=len(documents) or None)
    forget(memory, doc, args.method).save(out, provenance=forgotten_provenance(provenance, doc, args.method))
    return {"out": str(out), "forgotten": {"index": doc, "title": documents[doc]["title"]}, "method": args.method,
            "documents_left": len(documents) - 1}


def as_text(result: dict) -> str:
    return (f"wrote {result['out']}: document {result['forgotten']['index']} ({result['forgotten']['title']!r}) "
            f"forgotten by {result['method']}; {result['documents_left']} documents left")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_and_print(PROG, lambda: forget_command(args), args.json, as_text)


if __name__ == "__main__":
    sys.exit(main())
