"""Generate from a trained memory, one block per condition.

    python generate.py --run_dir outputs/demo/run_0 --doc 0                       # prompt: its title as it opens it
    python generate.py --run_dir RUN --doc "Some Title" --doc 3 --prompt "..." --no_memory
    python generate.py --run_dir RUN --doc all --no_key --json

--doc (repeatable, an index or a title, or `all`) selects documents' keys; --no_key adds the
memory without a key and --no_memory the plain LM, each with the same prompt. Greedy unless
--temperature > 0 (then sampled with --top_p, seeded by --seed).
"""
from __future__ import annotations

import sys

from docmem.cli import new_parser, run_and_print
from docmem.errors import UsageError
from docmem.trained_memory import (
    document_index,
    load_memory_run,
    locate_memory,
    read_provenance,
)

PROG = "generate.py"


def build_parser():
    parser = new_parser(PROG, "Generate from a trained document memory.")
    parser.add_argument("--doc", action="append", default=[], metavar="TITLE_OR_INDEX",
                        help="document to select (repeatable; `all` for every document)")
    parser.add_argument("--prompt", default=None, help="the prompt (default: the selected document's title as it opens the document, e.g. '= Title =' for a WikiText article)")
    parser.add_argument("--no_key", action="store_true", help="also generate with the memory and no key")
    parser.add_argument("--no_memory", action="store_true", help="also generate with the plain LM")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling")
    return parser


def check_args(args) -> None:
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty: give some text, or leave it out to prompt with the document's title")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p {args.top_p}: must be in (0, 1]")
    if not args.doc and not (args.no_key or args.no_memory):
        raise UsageError("nothing to generate: give --doc TITLE_OR_INDEX (or all), --no_key or --no_memory")
    if not args.doc and args.prompt is None:
        raise UsageError("--no_key/--no_memory without --doc need --prompt")


def generations(args) -> list[dict]:
    documents = read_provenance(*locate_memory(args.run_dir)).get("documents") or []
    # (documents are checked before the LM loads)
    docs = list(range(len(documents))) if "all" in args.doc else [document_index(documents, d) for d in args.doc]
    tm = load_memory_run(args.run_dir, device=args.device)
    plans = [(tm.select(doc), args.prompt or tm.openings[doc]) for doc in docs]  # (view, prompt)
    prompts = list(dict.fromkeys(p for _, p in plans)) or [args.prompt]
    for prompt in prompts:
        if args.no_key:
            plans.append((tm.no_key(), prompt))
        if args.no_memory:
            plans.append((tm.plain_lm(), prompt))
    out = []
    for view, prompt in plans:
        text = view.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed)
        out.append({"condition": view.label, "doc": view.selected,
                    "title": None if view.selected is None else view.titles[view.selected],
                    "prompt": prompt, "continuation": text})
    return out


def as_text(results: list[dict]) -> str:
    return "\n".join(f"=== {r['condition']} | prompt: {r['prompt']!r}\n{r['prompt']}{r['continuation']}\n" for r in results)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> list[dict]:
        check_args(args)
        return generations(args)

    return run_and_print(PROG, work, args.json, as_text)


if __name__ == "__main__":
    sys.exit(main())
