"""docs/results.md, and the marked blocks of the other docs, rendered from the result files in docs/results/.

    python -m benchmarks.results            # write docs/results.md and every marked block
    python -m benchmarks.results --check    # exit 1, with a short diff, when a generated text is stale

Each docs/results/NAME.json holds the figures of one table and where they came from: `source`
("measured", written by a benchmark's --record through benchmarks/record.py, or "transcribed from
FILE"), `machine`, `commit`, `date`, `command`. Every figure in docs/results.md comes from such a
file; the headings and sentences around the tables come from SECTIONS below. A block between
`<!-- results: NAME -->` and `<!-- /results -->` in README.md or docs/*.md is rendered the same way.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = "docs/results"
RESULTS_MD = "docs/results.md"
MARKED_FILES = ("README.md", "docs/*.md")  # where marked blocks may sit (docs/results.md is generated whole)
BLOCK = re.compile(r"(<!-- results: ([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)
RERUN = "rerun `python -m benchmarks.results` (it renders docs/results.md and the marked blocks from docs/results/*.json)"
MAX_DIFF_LINES = 40
PROVENANCE = ("source", "machine", "commit", "date", "command")  # every result file has these
MEASURED = "measured"
TRANSCRIBED = "transcribed from"
# the quick start's commands, in the order a newcomer runs them; the `quickstart` block shows these rows
QUICKSTART = ("bash run.sh demo", "python generate.py --run_dir outputs/demo/run_0 --doc 0 --no_memory",
              "python evaluate_memory.py --run_dir outputs/demo/run_0",
              "python evaluate_memory.py --run_dir outputs/demo/run_0 --forget 0",
              "python forget.py --run_dir outputs/demo/run_0 --doc 0 --method unlearn",
              "python -m pytest -q -rs tests")

Table = tuple[list[str], list[list[str]], list[str] | None]  # columns, rows, alignment ("left"/"right") or None


class ResultError(Exception):
    """A result file that cannot be rendered; its message is one line naming the file."""


def transcribed(figures: dict[str, Any]) -> Table:
    """A table kept as its cells: {"columns": [...], "rows": [[...]], "align": [...] (optional)}."""
    return figures["columns"], figures["rows"], figures.get("align")


def or_cells(report_table: Callable[[dict[str, Any]], Table]) -> Callable[[dict[str, Any]], Table]:
    """A benchmark's table that also takes transcribed cells, so a file recorded later replaces them."""
    def table(figures: dict[str, Any]) -> Table:
        return transcribed(figures) if "columns" in figures else report_table(figures)
    return table


def seconds(value: float) -> str:
    return f"{value:.1f} s"


def scaling(figures: dict[str, Any]) -> Table:
    columns = ["documents", "segments", "s / epoch (median of the timed epochs, after the cache-filling one)",
               "first epoch (s)", "prefix cache", "peak RSS"]
    rows = [[str(r["documents"]), str(r["segments"]), f"{r['epoch_s']:.3f}", f"{r['first_epoch_s']:.3f}",
             f"{r['prefix_cache_bytes'] / 2**20:.1f} MiB", f"{r['peak_rss_bytes'] / 2**20:.0f} MiB"]
            for r in figures["rows"]]
    rows.append(["growth exponent (log-log slope in segments)", "", f"**{figures['growth_exponent']:.3f}**", "", "", ""])
    return columns, rows, None


def evaluation_cost(figures: dict[str, Any]) -> Table:
    pairs = figures.get("pairs", [figures])  # --repeats N writes {"pairs": [...]}, one pair writes the pair
    stages = ("recall_generation_s", "ce_matrix_s", "landscape_s", "attribution_s", "measuring_s")
    columns = ["pair", "`bash run.sh demo`", "`evaluate_memory.py`", "evaluation / demo", "recall generation",
               "CE matrix", "landscape", "attribution", "measuring in all", "`evaluate_memory.py --forget 0`"]
    rows = []
    for i, pair in enumerate(pairs):
        row = [str(i + 1), seconds(pair["demo_s"]), seconds(pair["evaluate_s"]), f"**{pair['ratio']:.2f}**"]
        row += [seconds(pair["stages"][s]) if s in pair["stages"] else "–" for s in stages]
        row.append(seconds(pair["forget_s"]) if "forget_s" in pair else "–")
        rows.append(row)
    if len(pairs) > 1:
        rows.append(["median", "", "", f"**{statistics.median(p['ratio'] for p in pairs):.2f}**"] + [""] * 6)
    return columns, rows, None


def unlearn_cost(figures: dict[str, Any]) -> Table:
    columns = ["", "the training", f"`forget.py --method unlearn` ({figures['steps']} steps)", "ratio"]
    rows = [["in the process (summary.json, forget.py's `unlearn_seconds`)", seconds(figures["training_s"]),
             seconds(figures["unlearn_s"]), f"**{figures['unlearn_over_training']:.2f}**"]]
    if figures.get("demo_s"):
        rows.append(["command against command (wall clock)", seconds(figures["demo_s"]),
                     seconds(figures["forget_command_s"]), f"{figures['command_over_command']:.2f}"])
    return columns, rows, None


def summary_process(figures: dict[str, Any]) -> Table:
    columns = ["`--summary_process`", "the command", "`wall_seconds`", "`train_seconds`", "`summary_seconds`"]
    rows = [[f"`{mode}`", *(seconds(run[k]) for k in ("command_s", "wall_seconds", "train_seconds", "summary_seconds"))]
            for mode, run in figures["runs"].items()]
    same = "the same bytes" if figures["same_files"] else "**different**"
    rows.append(["on / off", "", f"**{figures['ratio_wall_on_over_off']:.2f}**", "",
                 f"{figures['files']} files, {same} in both runs"])
    return columns, rows, None


def many_documents(figures: dict[str, Any]) -> Table:
    columns = ["documents", "epochs", "documents a step", "`wall_seconds`", "`train_seconds` (the steps)",
               "`prefix_seconds` (the frozen LM below the hook, once)", "outside the steps", "outside, the prefix aside",
               "config.yaml"]
    f = figures
    rows = [[str(f["documents"]), str(f["epochs"]), str(f["docs_per_step"]), seconds(f["wall_seconds"]),
             seconds(f["train_seconds"]), seconds(f["prefix_seconds"]), f"**{seconds(f['outside_seconds'])}**",
             seconds(f["outside_seconds_but_the_prefix"]), f"{f['config_yaml_bytes'] / 1000:.0f} KB"]]
    return columns, rows, None


def one_row_step(figures: dict[str, Any]) -> Table:
    columns = ["shape", "hooked block", "tokens", "step", "its matrix products alone", "step / products",
               "the same in thread CPU time", "in no operation (profiled)", "most self time (profiled, per step)"]
    rows = [[f"`{r['shape']}`", f"{r['layer']} of {r['blocks']}", str(r["seq"]), f"{r['step_s'] * 1e3:.2f} ms",
             f"{r['matmuls_s'] * 1e3:.2f} ms ({r['matrix_products']})", f"**{r['ratio']:.2f}**",
             f"{r['step_cpu_s'] * 1e3:.2f} / {r['matmuls_cpu_s'] * 1e3:.2f} ms = **{r['ratio_cpu']:.2f}**",
             f"{r['outside_ops_share']:.0%}",
             ", ".join(f"`{op['op']}` {op['self_ms']:.2f} ms" for op in r["top_ops"][:3])]
            for r in figures["rows"]]
    return columns, rows, None


def quickstart(figures: dict[str, Any]) -> Table:
    """The quick start's commands and one wall time each, from the newcomer's table ("not measured"
    for a command the file has no row for)."""
    by_command = {row[0]: row[1] for row in figures["rows"]}
    return ["command", "wall time"], [[f"`{c}`", by_command.get(c, "not measured")] for c in QUICKSTART], None


def newcomer(figures: dict[str, Any]) -> Table:
    columns, rows, align = transcribed(figures)
    return columns, [[f"`{row[0]}`", *row[1:]] for row in rows], align


@dataclass(frozen=True)
class Section:
    name: str  # its result file: docs/results/NAME.json
    heading: str
    text: str  # what is measured and how to remake it; no figures (those come from the file)
    table: Callable[[dict[str, Any]], Table] = transcribed


SECTIONS: tuple[Section, ...] = (
    Section("quickstart", "What a newcomer sees",
            "The wall time of each command of the set-up and the quick start, on a CPU, once SmolLM2's weights "
            "are in the cache. Remake a row by running its command.", newcomer),
    Section("lm_load", "Loading SmolLM2",
            "The first command that loads SmolLM2 dequantizes its packaged GGUF file and caches the result; every "
            "later command loads the cache."),
    Section("evaluation_cost", "What the evaluation costs",
            "`bash run.sh demo`, then `evaluate_memory.py` on its run with the default settings, then the same "
            "with `--forget 0`, each timed by wall clock as a user sees it (the LM's loading included), with the "
            "stages the evaluation logs.", or_cells(evaluation_cost)),
    Section("evaluation_detail", "Where the evaluation's time goes",
            "The pictures drawn beside the measuring, the garbage collector's frozen objects, and recall's greedy "
            "decoding, each timed on the demo."),
    Section("unlearn_cost", "What unlearning costs",
            "`bash run.sh demo`, then `forget.py --method unlearn` on its run: the fine-tuning against the "
            "training inside its process, and the whole command against the whole demo command.", or_cells(unlearn_cost)),
    Section("summary_process", "Summaries drawn by a helper process",
            "The demo trained twice with a summary every epoch: its pictures drawn by the training process "
            "(`off`), then by a helper process while training goes on (`on`), one training thread.",
            or_cells(summary_process)),
    Section("demo_recall", "The demo, measured: recall",
            "ROUGE-L recall of greedy continuations of the fp32 demo's segments under each condition."),
    Section("demo_ce", "The demo, measured: training and the CE matrix",
            "The fp32 demo's training CE, its CE matrix and landscape, and the pairs of documents whose keys lie "
            "near each other."),
    Section("demo_attribution", "The demo, measured: attribution",
            "Attributing each training segment and each held-out continuation of the fp32 demo to its document."),
    Section("forgetting", "Forgetting, measured",
            "The forgotten document's ROUGE-L recall (and CE, nats) before and after `drop_key` and `edit`, on the "
            "fp32 demo."),
    Section("key_attack", "Forgetting against a key-searching attacker",
            "Mean token CE of the forgotten document (nats; lower = better recalled) under the old key, other keys, "
            "the grid and the attack's best key; verbatim = tokens greedy generation reproduces before the first "
            "wrong one."),
    Section("retrain_shard", "Exact forgetting: retraining one shard",
            "`forget.py --method retrain_shard` on the demo trained with shards, against the training it forgets "
            "from."),
    Section("retrain_shard_scale", "Exact forgetting at 1,000 documents",
            "`bench_retrain_shard.py`: 1,000 fictional documents in 10 shards (`--memory_shards 10`, the many-document "
            "shape: SmolLM2-135M, 256 entries, key_dim 8, 16 documents a step, 2 epochs); `forget.py --method "
            "retrain_shard` on document 0 against the full training, and every shard's memory against a fresh run "
            "with `--exclude_docs 0`, on an idle machine (`--no_attack`)."),
    Section("retrain_shard_attack", "The key-searching attacker at 1,000 documents",
            "`evaluate_memory.py --forget 0 --reference FRESH --forgotten FORGOTTEN --grid 0` on the same shape's "
            "runs of an earlier measurement (commit `c86febf`, beside the scale sweep): "
            "the attack starts from the old key, the 64 keys under which the document's CE is lowest, and random "
            "keys. The forgotten memory equals the fresh run's, so its attack finds what the reference's finds."),
    Section("shard_cost", "What sharding costs",
            "Recall, CE matrix and attribution of the demo trained with one memory and with several shards, in fp32."),
    Section("precision", "Precision: the demo in fp32 and with `--precision auto`",
            "The demo trained in both precisions and evaluated, side by side."),
    Section("compare", "Compared with the alternatives, on the demo's documents",
            "Every method trained by the same harness on the demo's documents, each at its best learning rate, "
            "and measured by the same evaluation."),
    Section("capacity", "How many documents one memory holds",
            "Right-key and other-key recall and CE as documents are added: fictional documents of one segment each, "
            "one run per cell, with the settings of the command below."),
    Section("scale", "Capacity past the paper: 100, 300 and 1,000 documents",
            "`bash run.sh scale`, cell by cell, joined by `benchmarks.capacity_report`: recall, CE, attribution top-1 "
            "(every document a candidate) and bits stored per trainable parameter, with each cell's epochs and "
            "minutes on this CPU (the 100-document keyed cell ran beside other jobs at a load of 4; the others "
            "alone). The cells ran at commit b49e105, the report at the commit below."),
    Section("demo_fast_path", "The demo, fast path against the reference loop",
            "Seconds per epoch of the demo's training with the prefix cache (the fast path) and with two full hooked "
            "passes per step (`--reference_loop`)."),
    Section("sweep_times", "What the comparison and the capacity sweep take",
            "Wall time of the two sweeps above, and what adding one document costs each kind of method."),
    Section("scaling", "Time per epoch against the number of documents",
            "The training loop (fast path, `other` negatives, AdamW) of a tiny GPT-NeoX, one torch thread; the "
            "growth exponent is the slope of log(time per epoch) against log(segments): one means linear.", or_cells(scaling)),
    Section("many_documents", "A thousand documents: the time outside the training steps",
            "`bench_many_documents.py`: `train_guidance.py` as a user runs it on SmolLM2-135M (the offline GGUF), "
            "fictional documents of one 48-word segment, 256 entries on block 27, key_dim 8, `other` negatives, "
            "16 documents a step, 2 epochs. summary.json's `wall_seconds` against `train_seconds` (the epochs' "
            "steps) and `prefix_seconds` (the frozen LM below the hooked block, run once per batch before the "
            "first CE; every step then reads it).", many_documents),
    Section("train_step_cpu", "One training step on a CPU",
            "`bench_train_step.py`: the released loop (a), two frozen passes (b) and the fast path (c), median "
            "seconds of the timed steps, fp32, hook at the last block."),
    Section("one_row_step", "One document per step: the step against its matrix products",
            "`bench_one_row.py`: a training step of the fast path on one row (the paper's order: one document a "
            "step, its positive and an `other` negative key, guidance, backward, clipping, AdamW) against the same "
            "matrix products run bare on random tensors of their shapes, timed in turn in one run, one torch "
            "thread; medians of wall time and of the thread's CPU time (which leaves out the time other processes "
            "take the core). Then a profile of a few steps: the share of the step in no operation (Python, "
            "dispatch) and the operations with the most self time.", or_cells(one_row_step)),
    Section("summaries", "What the periodic summaries cost",
            "The summaries of a paper-sized run (its documents, a Pythia-1B-wide vocabulary), drawn one after another."),
    Section("gpu_smoke", "The GPU check's smoke run",
            "Every stage of the GPU check at tiny sizes on a CPU, through the kit code on a kit it builds itself."),
    Section("gpu", "On a GPU",
            "The GPU check (`benchmarks/gpu_check.py`) on the paper's shapes and runs."),
    Section("gpu_check_stages", "The GPU check, stage by stage",
            "Each stage of `benchmarks/gpu_check.py`: what finished within its limit, and its figures."),
)
BLOCK_TABLES: dict[str, Callable[[dict[str, Any]], Table]] = {"quickstart": quickstart}


def load(root: Path, name: str) -> dict[str, Any]:
    """docs/results/NAME.json, refused in one line when it lacks its figures or a provenance field."""
    path = root / RESULTS_DIR / f"{name}.json"
    where = f"{RESULTS_DIR}/{name}.json"
    if not path.is_file():
        raise ResultError(f"{where}: no such result file (write it with the benchmark's --record, or transcribe it)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultError(f"{where}: not JSON ({err})") from err
    missing = [k for k in (*PROVENANCE, "figures") if not record.get(k)]
    if missing:
        raise ResultError(f"{where}: missing {', '.join(missing)} (every result file records "
                          f"{', '.join(PROVENANCE)} and its figures)")
    if record["source"] != MEASURED and not record["source"].startswith(TRANSCRIBED):
        raise ResultError(f"{where}: source {record['source']!r} is neither {MEASURED!r} nor '{TRANSCRIBED} FILE'")
    return record


def provenance_line(record: dict[str, Any]) -> str:
    if record["source"] == MEASURED:
        load_note = f", 1-minute load average {record['load_average_1m']}" if "load_average_1m" in record else ""
        return (f"Measured on {record['machine']}, {record['date']}, at commit `{record['commit']}`{load_note}: "
                f"`{record['command']}`.")
    measured_at = f" Measured at {record['measured_at']}." if "measured_at" in record else ""
    return (f"{record['source'][0].upper()}{record['source'][1:]} (figures last changed at commit "
            f"`{record['commit']}`, {record['date']}); machine: {record['machine']}; command: "
            f"`{record['command']}`.{measured_at}")


def markdown_table(table: Table) -> str:
    columns, rows, align = table
    rule = ["---:" if a == "right" else "---" for a in (align or ["left"] * len(columns))]
    lines = [columns, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def block_line(name: str, record: dict[str, Any]) -> str:
    """A marked block's short provenance: the file, and docs/results.md for the rest."""
    return (f"From `{RESULTS_DIR}/{name}.json` ({record['source']}, commit `{record['commit']}`, {record['date']}; "
            f"machine and command in `{RESULTS_MD}`).")


def render_table(root: Path, name: str, table: Callable[[dict[str, Any]], Table], block: bool = False) -> str:
    """One result file's table and the line that says where it came from (short in a marked block)."""
    record = load(root, name)
    try:
        body = markdown_table(table(record["figures"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ResultError(f"{RESULTS_DIR}/{name}.json: its figures lack what the table needs ({err!r})") from err
    return f"{body}\n\n{block_line(name, record) if block else provenance_line(record)}"


def render_results(root: Path) -> str:
    """The whole of docs/results.md."""
    known = {s.name for s in SECTIONS}
    unknown = sorted(p.stem for p in (root / RESULTS_DIR).glob("*.json") if p.stem not in known)
    if unknown:
        raise ResultError(f"{RESULTS_DIR}/{unknown[0]}.json: no section of benchmarks/results.py renders it")
    parts = ["# Measured results", "",
             "Generated by `python -m benchmarks.results` from the result files in `docs/results/`; do not edit "
             "by hand (`python -m benchmarks.results --check` fails when this file and those files disagree). "
             "Each table says where its figures come from: measured by the command shown, or transcribed from "
             "an earlier README with the commit where they last changed.", ""]
    for section in SECTIONS:
        parts += [f"## {section.heading}", "", section.text, "", render_table(root, section.name, section.table), ""]
    return "\n".join(parts)


def render_blocks(root: Path, path: Path, text: str) -> str:
    """`text`, the contents of `path`, with every marked block rendered from its result file."""
    sections = {s.name: s.table for s in SECTIONS}

    def one(match: re.Match[str]) -> str:
        name = match.group(2)
        table = BLOCK_TABLES.get(name) or sections.get(name)
        if table is None:
            raise ResultError(f"{path.relative_to(root)}: <!-- results: {name} --> names no table of "
                              "benchmarks/results.py")
        return f"{match.group(1)}{render_table(root, name, table, block=True)}\n{match.group(4)}"

    return BLOCK.sub(one, text)


def marked_files(root: Path) -> list[Path]:
    found = sorted({p for pattern in MARKED_FILES for p in root.glob(pattern)} - {root / RESULTS_MD})
    return [p for p in found if p.is_file()]


def expected(root: Path) -> dict[Path, str]:
    """Every generated text, by file: docs/results.md whole, and each file with a marked block."""
    out = {root / RESULTS_MD: render_results(root)}
    for path in marked_files(root):
        text = path.read_text()
        if BLOCK.search(text):
            out[path] = render_blocks(root, path, text)
    return out


def stale(root: Path) -> list[str]:
    """A unified diff (short) of each generated text that differs from what the result files give."""
    diffs = []
    for path, text in expected(root).items():
        now = path.read_text() if path.is_file() else ""
        if now != text:
            name = str(path.relative_to(root))
            lines = list(difflib.unified_diff(now.splitlines(), text.splitlines(), f"{name} (now)",
                                              f"{name} (from {RESULTS_DIR})", lineterm="", n=1))
            cut = len(lines) > MAX_DIFF_LINES
            diffs.append("\n".join(lines[:MAX_DIFF_LINES] + ([f"... ({len(lines) - MAX_DIFF_LINES} more lines)"]
                                                              if cut else [])))
    return diffs


def write(root: Path) -> list[Path]:
    """Write every generated text that changed; returns those files."""
    changed = []
    for path, text in expected(root).items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a generated text is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to render (default: this one)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            diffs = stale(args.root)
            for diff in diffs:
                print(diff)
            if diffs:
                print(f"generated results are stale: {RERUN}")
                return 1
            return 0
        for path in write(args.root):
            print(f"wrote {path.relative_to(args.root)}")
    except ResultError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
