"""Capacity past the paper (`run.sh scale`): bits stored per trainable parameter in capacity_report.py,
from fake run folders (a hand computation) and from a real tiny run's evaluation (its CE table's scored
tokens), and the preset's command lines, recorded by a fake $PYTHON."""
from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import evaluate_memory as em
from benchmarks import capacity_report
from conftest import ROOT
from document_memories import DocumentMemory, MemoryConfig, load_memory
from fixtures_memory import copy_run, tiny_run  # noqa: F401  (fixture)
from fixtures_tiny import subprocess_env, tiny_lm_dir  # noqa: F401  (fixture)


def fake_run(folder: Path, kind: str, ce: dict, tensors: dict[str, tuple[int, ...]] | None = None,
             lora: dict | None = None, documents: int = 2) -> Path:
    """folder/run_0 with config.yaml, eval/summary.json, eval/ce_matrix.json and (memory) memory.safetensors."""
    run = folder / "run_0"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"document_memory": kind, "hook_memory_dim": 4, "key_dim": 2,
                                                     "max_labels": documents}))
    own = {"keyed": "right_key", "lora": "right_key"}.get(kind, "memory")
    summary = {"documents": len(ce["no_memory"]), "rougeL_recall": {own: 0.5, "no_memory": 0.1},
               "ce": {"diagonal_mean": 2.0, "memory_mean": 2.0, "no_memory_mean": 3.0},
               "attribution_top1_accuracy": {"training_segments": 1.0, "held_out": 0.5} if own == "right_key" else None}
    if lora:
        summary["lora"] = lora
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    (run / "eval" / "ce_matrix.json").write_text(json.dumps(ce))
    if tensors:
        (run / "memory").mkdir()
        save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(run / "memory" / "memory.safetensors"))
    return run


def test_bits_per_parameter_is_the_hand_computation(tmp_path, capsys):
    ln2 = math.log(2)
    keyed = fake_run(tmp_path / "keyed_n2", "keyed",
                     {"matrix": [[2.0, 3.0], [3.5, 1.5]], "no_memory": [3.0, 4.0], "scored_tokens": [10, 20]},
                     {"up.weight": (4, 8), "up.bias": (4,), "doc_keys": (2, 2)})  # fixed keys are not trained
    shared = fake_run(tmp_path / "shared_n2", "shared",
                      {"matrix": None, "memory": [2.5, 3.0], "no_memory": [3.0, 4.0], "scored_tokens": [10, 20]},
                      {"up.weight": (4, 8), "gate.weight": (4, 2), "gate.bias": (4,)})  # its gate is never used
    lora = fake_run(tmp_path / "lora_n2", "lora",
                    {"matrix": [[1.0, 3.0], [3.0, 5.0]], "no_memory": [3.0, 4.0], "scored_tokens": [7, 3]},
                    lora={"trainable_parameters": 100, "rank": 1})
    partial = fake_run(tmp_path / "keyed_n3", "keyed",  # evaluated with --max_docs 2: not every token scored
                       {"matrix": [[2.0, 3.0], [3.5, 1.5]], "no_memory": [3.0, 4.0], "scored_tokens": [10, 20]},
                       {"up.weight": (4, 8)}, documents=3)
    out = tmp_path / "report"
    code = capacity_report.main([str(p.parent) for p in (keyed, shared, lora, partial)]
                                + [str(tmp_path / "keyed_n1000"), "--out", str(out), "--record", str(tmp_path / "r.json")])
    assert code == 0
    rows = {Path(r["run_dir"]).parent.name if "run_0" in r["run_dir"] else Path(r["run_dir"]).name: r
            for r in json.loads((out / "capacity.json").read_text())["rows"]}
    assert rows["keyed_n2"]["parameters"] == 36
    assert rows["keyed_n2"]["bits_per_parameter"] == pytest.approx((10 * (3 - 2) + 20 * (4 - 1.5)) / ln2 / 36)
    assert rows["keyed_n2"]["bits_stored"]["tokens"] == 30
    assert rows["shared_n2"]["parameters"] == 32
    assert rows["shared_n2"]["bits_per_parameter"] == pytest.approx((10 * 0.5 + 20 * 1.0) / ln2 / 32)
    assert rows["lora_n2"]["bits_per_parameter"] == pytest.approx((7 * 2 + 3 * -1) / ln2 / 100)  # a loss counts too
    assert rows["keyed_n2"]["attribution_training"] == 1.0 and rows["shared_n2"]["attribution_training"] is None
    assert rows["keyed_n3"]["bits_per_parameter"] is None and "2 of 3" in rows["keyed_n3"]["bits_note"]
    assert "missing" in rows["keyed_n1000"] and rows["keyed_n1000"]["documents"] == 1000
    table = (out / "capacity.md").read_text()
    assert "bits / parameter" in table.splitlines()[0] and "Allen-Zhu" in table and "3.6" in table
    assert f"| {rows['keyed_n2']['bits_per_parameter']:.3g} |" in table
    assert (out / "capacity.png").is_file()
    record = json.loads((tmp_path / "r.json").read_text())
    assert "bits / parameter" in json.dumps(record)
    capsys.readouterr()


def test_a_sampled_cell_gives_the_same_bits_and_says_it_was_sampled(tmp_path, capsys):
    """A cell evaluated with --ce_other_keys / --attribution_docs (ce_matrix.json without its matrix, the own
    keys' CE in `diagonal`): the same bits as the full matrix, a note, and the cell's minutes."""
    ce = {"matrix": None, "diagonal": [2.0, 1.5], "no_memory": [3.0, 4.0], "scored_tokens": [10, 20]}
    run = fake_run(tmp_path / "keyed_n2", "keyed", ce, {"up.weight": (4, 8), "up.bias": (4,)})
    summary = json.loads((run / "eval" / "summary.json").read_text())
    summary.update(settings={"ce_other_keys": 4, "attribution_docs": 10}, wall_seconds=120.0)
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    (run / "summary.json").write_text(json.dumps({"wall_seconds": 60.0}))
    out = tmp_path / "report"
    assert capacity_report.main([str(run.parent), "--out", str(out)]) == 0
    (row,) = json.loads((out / "capacity.json").read_text())["rows"]
    assert row["bits_per_parameter"] == pytest.approx((10 * (3 - 2) + 20 * (4 - 1.5)) / math.log(2) / 36)
    assert row["cell_minutes"] == pytest.approx(3.0)
    table = (out / "capacity.md").read_text()
    assert "| 3.0 |" in table and "CE other keys over 4 drawn per document, attribution of 10 documents" in table
    capsys.readouterr()


def test_scored_tokens_of_a_real_evaluation(tiny_run, tmp_path, capsys):  # noqa: F811
    """ce_matrix.json's scored_tokens are the tokens its means are over: the attribution's training segments
    (each row of the CE table, with its tokens) pool to the same; bits / parameter follow from them."""
    run = copy_run(tiny_run, tmp_path / "keyed_n3")
    assert em.main(["--run_dir", str(run), "--prompt_tokens", "8", "--new_tokens", "8", "--grid", "0"]) == 0
    ce = json.loads((run / "eval" / "ce_matrix.json").read_text())
    items = json.loads((run / "eval" / "attribution.json").read_text())["training_segments"]["items"]
    n = len(ce["titles"])
    assert all(1 <= i["rank"] <= n for i in items)  # every document a candidate
    nats = 0.0
    for d in range(n):
        mine = [i for i in items if i["document"] == d]
        assert ce["scored_tokens"][d] == sum(i["tokens"] for i in mine) > 0
        nats += sum(i["tokens"] * (i["ce_no_memory"] - i["ce_right_key"]) for i in mine)
    row = capacity_report.read_row(run.parent)
    assert row["parameters"] == sum(p.numel() for p in load_memory(run / "memory").trainable_parameters())
    assert row["bits_per_parameter"] == pytest.approx(nats / math.log(2) / row["parameters"], rel=1e-6)
    capsys.readouterr()


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A $PYTHON that writes its arguments, one line per call, and does nothing else."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "calls.txt"
    script = tmp_path / "python"
    script.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {shlex.quote(str(log))}\necho >> {shlex.quote(str(log))}\n')
    script.chmod(0o755)
    return script, log


def scale(tmp_path: Path, *flags: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    python, log = fake_python(tmp_path)
    done = subprocess.run(["bash", "run.sh", "scale", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(PYTHON=str(python), SCALE_DIR=str(tmp_path / "s"), **env))
    calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return done, calls


def flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_scale_preset_command_lines(tmp_path):
    root = tmp_path / "s"
    (root / "keyed_n100" / "run_0" / "eval").mkdir(parents=True)
    (root / "keyed_n100" / "run_0" / "eval" / "summary.json").write_text("{}")  # done: skipped
    (root / "shared_n100" / "run_0").mkdir(parents=True)
    (root / "shared_n100" / "run_0" / "summary.json").write_text("{}")  # trained, not evaluated
    (root / "keyed_n7").mkdir()  # a cell of another grid in the same folder
    done, calls = scale(tmp_path, "--lr", "1e-2")
    assert done.returncode == 0, done.stderr
    trainings = {flag(c, "--save_dir"): c for c in calls if c[0] == "train_guidance.py"}
    evaluations = [flag(c, "--run_dir") for c in calls if c[0] == "evaluate_memory.py"]
    cells = [f"{kind}_n{n}" for n in (100, 300, 1000) for kind in ("keyed", "shared", "lora")]
    assert sorted(trainings) == sorted(str(root / c) for c in cells[2:])
    assert sorted(evaluations) == sorted(str(root / c) for c in cells[1:])
    shapes = {100: ("101", "7", "30", "16"), 300: ("175", "11", "10", "16"), 1000: ("320", "20", "3", "16")}
    for cell, call in trainings.items():
        kind, n = Path(cell).name.rsplit("_n", 1)
        assert flag(call, "--document_memory") == kind and flag(call, "--max_labels") == n == flag(call, "--synthetic_articles")
        assert (flag(call, "--hook_memory_dim"), flag(call, "--key_dim"), flag(call, "--num_epochs"),
                flag(call, "--docs_per_step")) == shapes[int(n)]
        assert call[-2:] == ["--lr", "1e-2"] and flag(call, "--lm_name") == "smollm2"
    for n, (m, k, _, _) in shapes.items():  # the rule's parameters are the memory's, under 1 M
        config = MemoryConfig(hidden_size=576, num_docs=n, memory_dim=int(m), key_dim=int(k))
        with torch.device("meta"):
            params = sum(p.numel() for p in DocumentMemory(config).trainable_parameters())
        assert params == 576 ** 2 + 2 * 576 + int(m) * (2 * 576 + int(k) + 2) <= 1_000_000
    report = calls[-1]
    assert report[:2] == ["-m", "benchmarks.capacity_report"] and flag(report, "--out") == str(root / "report")
    assert report[4:] == [str(root / c) for c in cells] + [str(root / "keyed_n7")]
    assert "keyed_n100: done" in done.stderr


def test_scale_preset_one_cell_and_its_refusals(tmp_path):
    done, calls = scale(tmp_path, SCALE_DOCS="5", SCALE_METHODS="lora", SCALE_EPOCHS="2")
    assert done.returncode == 0, done.stderr
    (train,) = [c for c in calls if c[0] == "train_guidance.py"]
    assert (flag(train, "--docs_per_step"), flag(train, "--num_epochs"), flag(train, "--hook_memory_dim"),
            flag(train, "--key_dim")) == ("5", "2", "23", "2")
    for env in ({"SCALE_METHODS": "keyed rag"}, {"SCALE_DOCS": "100 x"}):
        shutil.rmtree(tmp_path / "s", ignore_errors=True)
        done, calls = scale(tmp_path / "r", **env)
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and not calls
        assert not (tmp_path / "r" / "s").exists()  # refused before anything ran
    done = subprocess.run(["bash", "run.sh", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "scale" in done.stderr
