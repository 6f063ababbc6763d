"""Bad command lines fail fast: exit 2, one stderr line naming the flag, no traceback, and no model
(nor, where the flags alone tell, any data) loaded. --resume keeps the run's own config."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import foundations
import train_guidance
import wikitext
from conftest import ROOT
from docmem.config import ConfigError, TrainConfig, build_parser, parse_args
from fixtures_tiny import build_local_wikitext, subprocess_env, tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to load a model or articles fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a bad command line got as far as loading")

    monkeypatch.setattr(foundations, "load_foundation", forbidden)
    monkeypatch.setattr(wikitext, "load_articles", forbidden)


@pytest.fixture
def model_never_loads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(foundations, "load_foundation", forbidden)


def fails_cleanly(argv: list[str], capsys, code: int = 2, after_loading: bool = False) -> str:
    """main(argv) exits `code` with exactly one stderr line and no traceback; returns that line.
    after_loading: the model's loading progress may come before that line."""
    with pytest.raises(SystemExit) as exit_info:
        train_guidance.main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = err.splitlines()[-1:] if after_loading else err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("train_guidance.py: error: ")
    return lines[0]


@pytest.fixture
def saved_run(tmp_path):
    """A run folder as a started run leaves it (config.yaml only), made without training."""
    run_dir = tmp_path / "out" / "run_0"
    run_dir.mkdir(parents=True)
    parse_args(["--dataset", "synthetic", "--max_labels", "3", "--lr", "0.01", "--num_epochs", "4",
                "--save_dir", str(tmp_path / "out")]).save_yaml(run_dir / "config.yaml")
    return run_dir


def bad_invocations(tmp_path, saved_run) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "empty_model").mkdir()
    return [
        (["--lm_size", "3b"], "--lm_size"),
        (["--lm_name", "gpt5"], "--lm_name"),
        (["--lm_name", "llama2_hf"], "--lm_size"),  # the default size 1b is not a Llama-2 size
        (["--hook_memory_layer", "16"], "--hook_memory_layer"),  # pythia-1b has blocks 0..15
        (["--lm_name", "pythia", "--lm_size", "70m", "--hook_memory_layer", "6"], "--hook_memory_layer"),
        (["--hook_memory_layer", "-1"], "--hook_memory_layer"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.001"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "abc"], "--lr"),
        (["--lr"], "--lr"),
        (["--grad_clip_coeff", "inf"], "--grad_clip_coeff"),
        (["--guidance", "-0.1"], "--guidance"),
        (["--batch_size", "0"], "--batch_size"),
        (["--batch_size", "1.5"], "--batch_size"),
        (["--num_epochs", "0"], "--num_epochs"),
        (["--max_length", "0"], "--max_length"),
        (["--max_segements", "0"], "--max_segments"),
        (["--key_dim", "0"], "--key_dim"),
        (["--hook_memory_dim", "-3"], "--hook_memory_dim"),
        (["--key_internal_layers", "0"], "--key_internal_layers"),
        (["--seed", "-1"], "--seed"),
        (["--max_labels", "1"], "--max_labels"),  # `other` negatives need a second document
        (["--dataset", "synthetic", "--synthetic_articles", "5", "--max_labels", "6"], "--max_labels"),
        (["--dataset", "wikitext-7"], "--dataset"),
        (["--dataset", "synthetic", "--data_path", str(tmp_path)], "--data_path"),
        (["--data_path", str(tmp_path / "missing.parquet")], "--data_path"),
        (["--key_activation", "wiggle"], "--key_activation"),
        (["--lm_act", "wiggle"], "--lm_act"),
        (["--negative_key_type", "opposite"], "--negative_key_type"),
        (["--guidance_loss", "l3"], "--guidance_loss"),
        (["--lr_scheduler", "exponential"], "--lr_scheduler"),
        (["--precision", "fp8"], "--precision"),
        (["--device", "tpu"], "--device"),
        *([(["--device", "cuda:0"], "--device")] if not torch.cuda.is_available() else []),
        (["--document_memory", "global"], "--document_memory"),
        (["--save_dir", str(a_file / "runs")], "--save_dir"),
        (["--save_dir", str(a_file)], "--save_dir"),
        (["--lm_path", str(tmp_path / "no_model_here")], "--lm_path"),
        (["--lm_path", str(tmp_path / "empty_model")], "--lm_path"),
        (["--resume", str(tmp_path / "no_run_here")], "--resume"),
        (["--resume", str(tmp_path / "not_a_run")], "--resume"),
        (["--resume", str(saved_run), "--lr", "0.1"], "--lr"),
        (["--resume", str(saved_run), "--max_labels", "4"], "--max_labels"),
        (["--resume", str(saved_run), "--num_epochs", "0"], "--num_epochs"),
        (["--learning_rate", "0.1"], "--learning_rate"),  # unknown flag
        (["--lr_schedulr", "cosine"], "--lr_schedulr"),  # a typo is unknown too (no abbreviations)
        (["--num_epoch", "3"], "--num_epoch"),
        (["--learn_doc_keys=yes"], "--learn_doc_keys"),
        (["extra_positional"], "extra_positional"),
    ]


def test_at_least_twenty_bad_invocations_exit_2_in_one_line(tmp_path, saved_run, capsys, nothing_loads):
    cases = bad_invocations(tmp_path, saved_run)
    assert len(cases) >= 20
    started = time.monotonic()
    for argv, named in cases:
        line = fails_cleanly(argv + ["--save_dir", str(tmp_path / "out")] if "--save_dir" not in argv else argv,
                             capsys)
        assert named in line, (argv, line)
    assert time.monotonic() - started < 30, "validation should not load anything big"
    assert not (tmp_path / "out" / "run_1").exists()  # no run folder made
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run_0"]


def test_bad_layer_for_a_model_folder_is_found_from_its_config_json(tiny_lm_dir, tmp_path, capsys, nothing_loads):
    argv = tiny_argv(tiny_lm_dir, tmp_path / "out")
    line = fails_cleanly(argv + ["--hook_memory_layer", "3"], capsys)  # the tiny model has 3 blocks
    assert "--hook_memory_layer 3" in line and "0..2" in line
    assert not (tmp_path / "out").exists()  # nothing written, not even save_dir


def test_layer_checked_again_against_the_loaded_model(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """A model whose config.json declares no block count is checked once it has loaded."""
    monkeypatch.setattr("docmem.config._num_blocks", lambda data: None)
    line = fails_cleanly(tiny_argv(tiny_lm_dir, tmp_path / "out") + ["--hook_memory_layer", "5"], capsys,
                         after_loading=True)
    assert "--hook_memory_layer 5" in line and "blocks 0..2" in line
    assert not (tmp_path / "out").exists()


def test_data_errors_are_found_before_the_model_loads(tmp_path, capsys, model_never_loads):
    copy = build_local_wikitext(tmp_path / "copy", configs=("wikitext-2-v1",))
    base = ["--save_dir", str(tmp_path / "out"), "--lm_name", "pythia", "--lm_size", "70m", "--hook_memory_layer", "5"]
    line = fails_cleanly(base + ["--data_path", str(copy), "--dataset", "wikitext-103-v1"], capsys)
    assert "--data_path" in line and "wikitext-103-v1" in line
    parquet = copy / "wikitext-2-v1" / "wikitext-2-v1-test.parquet"
    line = fails_cleanly(base + ["--data_path", str(parquet), "--dataset", "wikitext-2-v1", "--max_labels", "100000"],
                         capsys, after_loading=True)  # (the data's loading progress may come first)
    assert "--max_labels 100000" in line and "articles are available" in line


def test_resume_uses_the_saved_config(saved_run):
    config = parse_args(["--resume", str(saved_run)])
    assert (config.lr, config.max_labels, config.num_epochs, config.dataset) == (0.01, 3, 4, "synthetic")
    assert config.resume == str(saved_run)
    # the same values given again are fine; num_epochs may grow; others may not change
    config = parse_args(["--resume", str(saved_run), "--lr", "1e-2", "--dataset", "synthetic", "--num_epochs", "9"])
    assert config.num_epochs == 9 and config.lr == 0.01
    with pytest.raises(ConfigError) as err:
        parse_args(["--resume", str(saved_run), "--seed", "2"])
    assert err.value.flag == "seed" and "started with 1" in str(err.value)


def test_resume_with_a_corrupt_config_yaml(saved_run, capsys, nothing_loads):
    (saved_run / "config.yaml").write_text("lr: [unclosed\n")
    assert "--resume" in fails_cleanly(["--resume", str(saved_run)], capsys)
    (saved_run / "config.yaml").write_text("lr: fast\n")
    line = fails_cleanly(["--resume", str(saved_run)], capsys)
    assert "--resume" in line and "lr" in line


def test_save_dir_check_writes_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    parse_args(["--save_dir", str(target)])
    assert list(tmp_path.iterdir()) == []


def test_new_flags_are_in_the_help():
    text = build_parser().format_help()
    assert "--resume" in text and "--detect_anomaly" in text
    assert TrainConfig().resume is None and TrainConfig().detect_anomaly is False


@pytest.mark.parametrize("argv, named", [
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--hook_memory_layer", "40"], "--hook_memory_layer"),
])
def test_real_process_one_line_exit_2(argv, named, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train_guidance.py"), *argv, "--save_dir", str(tmp_path)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""


def test_help_still_prints_and_exits_0():
    done = subprocess.run([sys.executable, str(ROOT / "train_guidance.py"), "--help"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--resume" in done.stdout and done.stderr == ""
