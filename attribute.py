"""Which of a run's documents did a text come from?

    python attribute.py --run_dir outputs/demo/run_0 --text "..."
    python attribute.py --run_dir RUN --file passage.txt --top 3 --json

Ranks the documents by the text's mean token cross-entropy under each document's key (lowest
first), next to the memory without a key and the plain LM: a document whose key brings the CE
well below the plain LM's is a likely source.
"""
from __future__ import annotations

import sys
from pathlib import Path

from docmem.cli import new_parser, run_and_print
from docmem.errors import UsageError
from docmem.evaluation.attribution import Scorer, score_texts
from docmem.trained_memory import load_memory_run

PROG = "attribute.py"


def build_parser():
    parser = new_parser(PROG, "Rank a trained memory's documents as the source of a text.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to attribute")
    source.add_argument("--file", help="a UTF-8 text file to attribute")
    parser.add_argument("--top", type=int, default=5, help="documents to list (0: all)")
    return parser


def read_text(args) -> str:
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"--file {args.file}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"--file {args.file}: not UTF-8 text ({err.reason})") from err
    else:
        text = args.text
    if not text.strip():
        raise UsageError(f"{'--file ' + args.file if args.file is not None else '--text'}: the text is empty")
    return text


def attribution(args) -> dict:
    if args.top < 0:
        raise UsageError(f"--top {args.top}: must be >= 0 (0: all)")
    text = read_text(args)
    tm = load_memory_run(args.run_dir, device=args.device)
    (scores,) = score_texts(Scorer(tm.foundation, tm.memory, tm.layer, tm.dtype, tm.max_length), [text])
    ranking = scores.ranking()
    shown = ranking if args.top == 0 else ranking[: args.top]
    return {"tokens": scores.tokens, "no_key_ce": scores.no_key, "no_memory_ce": scores.no_memory,
            "ranking": [{"rank": r + 1, "doc": d, "title": tm.titles[d], "ce": scores.key_ce[d],
                         "ce_below_plain_lm": scores.no_memory - scores.key_ce[d]} for r, d in enumerate(shown)]}


def as_text(result: dict) -> str:
    lines = [f"{result['tokens']} tokens; mean token CE (nats), lowest first:",
             f"{'rank':>4}  {'doc':>3}  {'CE':>7}  {'vs plain LM':>11}  title"]
    lines += [f"{r['rank']:>4}  {r['doc']:>3}  {r['ce']:7.3f}  {-r['ce_below_plain_lm']:+11.3f}  {r['title']}"
              for r in result["ranking"]]
    lines.append(f"{'':>4}  {'':>3}  {result['no_key_ce']:7.3f}  "
                 f"{result['no_key_ce'] - result['no_memory_ce']:+11.3f}  (memory, no key)")
    lines.append(f"{'':>4}  {'':>3}  {result['no_memory_ce']:7.3f}  {0:+11.3f}  (plain LM)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_and_print(PROG, lambda: attribution(args), args.json, as_text)


if __name__ == "__main__":
    sys.exit(main())
