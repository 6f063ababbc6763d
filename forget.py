"""Take one document out of a trained memory; writes a new memory/ folder (or a new run folder).

    python forget.py --run_dir outputs/demo/run_0 --doc 0 --method unlearn
    python forget.py --run_dir RUN --doc "Some Title" --method retrain_shard     (a --memory_shards run)

--method retrain_shard (exact, SISA): retrains only the document's shard, from its initial state, on
its remaining documents, and copies every other shard: the new run folder equals a fresh run with
--exclude_docs (bitwise on CPU). Needs the run's LM and data; a shard left empty is dropped.
--method unlearn (approximate, any memory): a short fine-tuning that makes the document as unlikely
under every key as under a memory never trained on it, keeping the others' recall (docmem/forgetting/unlearning.py).
--method drop_key removes the document's key (its content stays in the weights, one key away);
--method edit also projects the selection direction only this document used out of the memory. Neither
removes the content from the weights (docs/forgetting.md).
Measure with `python evaluate_memory.py --run_dir RUN --forget DOC`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from docmem.cli import new_parser, run_and_print
from docmem.errors import UsageError
from docmem.forgetting.edits import FORGET_METHODS, forget, forgotten_provenance
from docmem.forgetting.unlearning import UNLEARN_DEFAULTS, unlearn_run
from docmem.sharding import load_any_memory
from docmem.trained_memory import (
    MemoryRunError,
    document_index,
    locate_memory,
    read_provenance,
    read_run_yaml,
)
from docmem.training.shard_runs import forget_by_retraining, retrained_shard, unfinished_retrain
from train_guidance import train_and_finish

PROG = "forget.py"
METHODS = (*FORGET_METHODS, "unlearn", "retrain_shard")


def build_parser():
    parser = new_parser(PROG, "Take one document out of a trained memory.")
    parser.add_argument("--doc", required=True, metavar="TITLE_OR_INDEX", help="the document to forget")
    parser.add_argument("--method", choices=METHODS, default="edit",
                        help="retrain_shard: exact (sharded runs); unlearn: short fine-tuning; drop_key: remove its "
                             "key; edit: also project its own selection direction out")
    parser.add_argument("--out", default=None, help="new memory folder (retrain_shard: new run folder; default: "
                                                    "memory_forget_<doc>_<method> beside the memory)")
    parser.add_argument("--steps", type=int, default=UNLEARN_DEFAULTS.steps, help="unlearn: optimizer steps")
    return parser


def forget_command(args) -> dict:
    memory_dir, run_dir = locate_memory(args.run_dir)
    provenance = read_provenance(memory_dir, run_dir)
    documents = provenance.get("documents") or []
    gone = [f.get("title") for f in provenance.get("forgotten") or []]
    if str(args.doc) in gone:
        raise UsageError(f"--doc {args.doc!r}: already forgotten in {memory_dir}")
    doc = document_index(documents, args.doc)
    base = run_dir if args.method == "retrain_shard" and run_dir is not None else memory_dir
    out = Path(args.out) if args.out else base.parent / f"{base.name}_forget_{doc}_{args.method}"
    position = _draw_position(run_dir, documents, doc) if args.method == "retrain_shard" and run_dir else None
    continuing = position is not None and unfinished_retrain(out, run_dir, position)  # after a kill: go on
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not continuing:
        raise MemoryRunError(f"--out {out}: exists and is not an empty folder (choose another)")
    started = time.time()
    result = {"out": str(out), "forgotten": {"index": doc, "title": documents[doc]["title"]}, "method": args.method,
              "documents_left": len(documents) - 1}
    if args.method == "retrain_shard":
        if run_dir is None:
            raise UsageError("--method retrain_shard needs the run folder (its config.yaml and shards/)")
        if position is None:
            raise UsageError(f"--method retrain_shard: {run_dir} has one shard (--memory_shards 1); use --method "
                             "unlearn, or train again with --exclude_docs")
        _, summary = forget_by_retraining(run_dir, position, out, train_and_finish)
        result["full_training_seconds"] = _training_seconds(run_dir)
        # the retrained shard's own time (the summary's wall_seconds also counts the shards copied unchanged)
        shard = retrained_shard(run_dir, position)
        retrained = ((summary or {}).get("shards") or {}).get(str(shard))
        result["retrained_seconds"] = retrained["wall_seconds"] if retrained else None
    elif args.method == "unlearn":
        if run_dir is None:
            raise UsageError("--method unlearn needs the run folder (its LM and documents)")
        result.update(unlearn_run(run_dir, doc, out, args.steps, args.device))
        result["full_training_seconds"] = _training_seconds(run_dir)
    else:
        memory = load_any_memory(memory_dir, expect_num_docs=len(documents) or None)
        forget(memory, doc, args.method).save(out, provenance=forgotten_provenance(provenance, doc, args.method))
    result["seconds"] = time.time() - started
    return result


def _draw_position(run_dir: Path, documents: list, doc: int) -> int | None:
    """The document's draw position in a sharded run (None: the run has one shard)."""
    position = (read_run_yaml(run_dir).get("documents") or [{}] * len(documents))[doc].get("draw_position")
    return None if position is None else int(position)


def _training_seconds(run_dir: Path) -> float | None:
    path = run_dir / "summary.json"
    return float(json.loads(path.read_text())["wall_seconds"]) if path.is_file() else None


def as_text(result: dict) -> str:
    text = (f"wrote {result['out']}: document {result['forgotten']['index']} ({result['forgotten']['title']!r}) "
            f"forgotten by {result['method']}; {result['documents_left']} documents left; {result['seconds']:.1f} s")
    if result.get("full_training_seconds"):
        text += f" (the full training took {result['full_training_seconds']:.1f} s)"
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_and_print(PROG, lambda: forget_command(args), args.json, as_text)


if __name__ == "__main__":
    sys.exit(main())
