"""Small but valid runs drawn at random, and every command that reads a run called on each.

A `RunSpec` is one training command line on the tiny GPT-NeoX (fixtures_tiny) over a WikiText
text file of our own: each article's length in words is drawn, so segments range from a few
words to more than --max_length tokens. `exercise` trains it in this process, then calls every
command that reads a run (evaluate, --forget, --compare, generate, attribute, forget.py with each
method, resume) and returns what each did. A call must end in a result (exit 0) or in a one-line
refusal with a non-zero exit; an exception that escapes a command's main() is a traceback, and
fails the test that called it.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

import attribute
import evaluate_memory
import forget
import generate
import train_guidance
from docmem import synthetic

NEGATIVE_TYPES = ("other", "random", "zero", "perturb")
MEMORIES = ("keyed", "shared")


@dataclass(frozen=True)
class RunSpec:
    """One valid training configuration (the fields are the flags they set)."""

    article_words: tuple[int, ...]  # one article per document, this many words of body each
    max_segments: int
    segment_length: int
    max_length: int
    batch_size: int
    docs_per_step: int
    memory_shards: int
    document_memory: str
    negative_key_type: str
    key_dim: int
    num_epochs: int
    seed: int

    def argv(self, lm_dir: Path, data: Path, save_dir: Path) -> list[str]:
        return ["--lm_path", str(lm_dir), "--data_path", str(data), "--max_labels", str(len(self.article_words)),
                "--max_segments", str(self.max_segments), "--segment_length", str(self.segment_length),
                "--max_length", str(self.max_length), "--batch_size", str(self.batch_size),
                "--docs_per_step", str(self.docs_per_step), "--memory_shards", str(self.memory_shards),
                "--document_memory", self.document_memory, "--negative_key_type", self.negative_key_type,
                "--key_dim", str(self.key_dim), "--num_epochs", str(self.num_epochs), "--seed", str(self.seed),
                "--hook_memory_layer", "2", "--hook_memory_dim", "8", "--lr", "1e-2", "--save_freq", "1",
                "--num_gpus", "0", "--device", "cpu", "--summary_process", "off", "--save_dir", str(save_dir)]


@st.composite
def run_specs(draw: st.DrawFn) -> RunSpec:
    docs = draw(st.integers(1, 8))
    memory = draw(st.sampled_from(MEMORIES))
    return RunSpec(
        article_words=tuple(draw(st.lists(st.integers(3, 90), min_size=docs, max_size=docs))),
        max_segments=draw(st.integers(1, 3)),
        segment_length=draw(st.integers(4, 40)),
        max_length=draw(st.integers(16, 64)),
        batch_size=draw(st.integers(1, 4)),
        docs_per_step=draw(st.integers(1, min(3, docs))),
        memory_shards=draw(st.integers(1, min(3, docs))) if memory == "keyed" else 1,  # a shared memory has no shards
        document_memory=memory,
        negative_key_type=draw(st.sampled_from(NEGATIVE_TYPES)),
        key_dim=draw(st.sampled_from((2, 2, 1, 3))),  # 2 most often: --forget needs it
        num_epochs=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 50)),
    )


def write_articles(path: Path, article_words: tuple[int, ...], seed: int) -> Path:
    """A line-level WikiText file: ` = Title = ` and the first N words of a fictional article."""
    bodies = synthetic.generate_articles(len(article_words), seed=seed)
    lines = [""]
    for i, (body, words) in enumerate(zip(bodies, article_words)):
        text = " ".join(w for w in body.split() if w != "=")
        lines += [f" = Article {i} = ", "", " " + " ".join(text.split()[:words]) + " ", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass
class Outcome:
    command: str
    code: int
    stderr: str

    @property
    def refusal(self) -> str:
        """The command's last stderr line (its one-line refusal when code != 0)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def call(name: str, main: Callable[[list[str]], int], argv: list[str]) -> Outcome:
    """main(argv) in this process; its exit status and stderr. Exceptions other than SystemExit
    propagate: that is the traceback a user would see."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return Outcome(name, int(code or 0), err.getvalue())


@dataclass
class Exercise:
    spec: RunSpec
    run_dir: Path | None
    outcomes: list[Outcome] = field(default_factory=list)


def exercise(spec: RunSpec, lm_dir: Path, folder: Path) -> Exercise:
    """Train `spec`, then call every command that reads the run."""
    data = write_articles(folder / "articles.txt", spec.article_words, spec.seed)
    save_dir = folder / "runs"
    argv = spec.argv(lm_dir, data, save_dir)
    result = Exercise(spec, None)
    result.outcomes.append(call("train", train_guidance.main, argv))
    runs = sorted(p for p in save_dir.glob("run_*") if (p / "summary.json").is_file()) if save_dir.is_dir() else []
    if result.outcomes[-1].code or not runs:
        return result
    run = result.run_dir = runs[-1]
    small = ["--prompt_tokens", "4", "--new_tokens", "6", "--grid", "3", "--threads", "1", "--device", "cpu"]
    plan: list[tuple[str, Callable, list[str]]] = [
        ("evaluate", evaluate_memory.main, ["--run_dir", str(run), *small]),
        ("evaluate --prompt_tokens 30", evaluate_memory.main, ["--run_dir", str(run), *small[2:],
                                                               "--prompt_tokens", "30"]),
        ("evaluate --forget 0", evaluate_memory.main, ["--run_dir", str(run), "--forget", "0", *small]),
        ("evaluate --forget 0 --prompt_tokens 30", evaluate_memory.main,
         ["--run_dir", str(run), "--forget", "0", *small[2:], "--prompt_tokens", "30"]),
        ("evaluate --compare", evaluate_memory.main, ["--compare", str(run), str(run), "--out",
                                                      str(folder / "compare"), *small]),
        ("generate", generate.main, ["--run_dir", str(run), "--doc", "0", "--max_new_tokens", "4", "--no_key",
                                     "--no_memory", "--device", "cpu"]),
        ("attribute", attribute.main, ["--run_dir", str(run), "--text", "The article", "--top", "0",
                                       "--device", "cpu"]),
    ]
    for method in forget.METHODS:
        plan.append((f"forget --method {method}", forget.main,
                     ["--run_dir", str(run), "--doc", "0", "--method", method, "--steps", "2",
                      "--out", str(folder / f"forget_{method}"), "--device", "cpu"]))
    if spec.document_memory == "keyed" and len(spec.article_words) > 1:  # the attack table, with a reference run
        reference = folder / "reference"
        plan.append(("train --exclude_docs 0", train_guidance.main,
                     [*argv[:-1], str(reference), "--exclude_docs", "0", "--memory_shards", "1",
                      "--docs_per_step", "1", "--negative_key_type", spec.negative_key_type]))
        plan.append(("evaluate --forget 0 --reference --forgotten", evaluate_memory.main,
                     ["--run_dir", str(run), "--forget", "0", "--reference", str(reference), "--forgotten",
                      str(folder / "forget_drop_key"), str(folder / "forget_edit"), *small[2:], "--prompt_tokens", "30"]))
    plan.append(("resume", train_guidance.main, ["--resume", str(run), "--num_epochs", str(spec.num_epochs + 1),
                                                 "--summary_process", "off"]))
    for name, main, args in plan:
        result.outcomes.append(call(name, main, args))
    return result
