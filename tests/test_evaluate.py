"""evaluate_memory.py: ROUGE wiring, the condition switch, selection statistics, the landscape,
Pearson R, and an end-to-end evaluation of a keyed and a shared (keyless) tiny run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import evaluate_memory as em
from conftest import tiny_model
from docmem.batching import Batch
from docmem.engines import NO_MEMORY, FastEngine
from docmem.errors import EvalError
from docmem.evaluation import compare, generation, landscape, options
from document_memories import DocumentMemory, MemoryConfig, load_memory
from fixtures_tiny import tiny_lm_dir  # noqa: F401
from foundations import from_model
from utils import selection_stats

# ---- ROUGE -----------------------------------------------------------------------------------


def test_rouge_known_strings():
    (s,) = generation.rouge_scores(["the cat sat on the mat"], ["the cat lay on a mat"])
    # unigrams in common: the, cat, on, mat (4 of 6 each side); bigrams: "the cat" (1 of 5)
    for measure in ("recall", "precision", "f1"):
        assert s["rouge1"][measure] == pytest.approx(4 / 6)
        assert s["rouge2"][measure] == pytest.approx(1 / 5)
        assert s["rougeL"][measure] == pytest.approx(4 / 6)  # LCS: the cat on mat


def test_rouge_recall_is_against_the_reference():
    # a short prediction: recall is over the reference's words, precision over the prediction's
    (s,) = generation.rouge_scores(["the cat"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx({"recall": 2 / 6, "precision": 1.0, "f1": 0.5})
    assert s["rouge2"] == pytest.approx({"recall": 1 / 5, "precision": 1.0, "f1": 2 * 0.2 / 1.2})
    (empty, exact) = generation.rouge_scores(["", "Sat on the mat."], ["sat on the mat", "sat on the mat"])
    assert empty["rougeL"]["recall"] == 0.0
    assert exact["rougeL"] == pytest.approx({"recall": 1.0, "precision": 1.0, "f1": 1.0})  # case and punctuation
    mean = generation.mean_scores([empty, exact])
    assert mean["rougeL"]["recall"] == pytest.approx(0.5) and generation.mean_scores([]) is None
    with pytest.raises(ValueError):
        generation.rouge_scores(["a"], [])


# ---- statistics ------------------------------------------------------------------------------


def test_selection_stats_on_hand_made_selections():
    s = torch.tensor([[3.0, 4.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, -6.0, 8.0]])
    stats = selection_stats(s)
    assert stats["l0"] == pytest.approx(4 / 3)  # 2, 0 and 2 entries in use
    assert stats["l2"] == pytest.approx(5.0)  # norms 5, 0, 10
    pairwise = (5.0 + math.sqrt(125.0) + 10.0) / 3  # ||s0-s1||, ||s0-s2||, ||s1-s2||
    assert stats["pairwise_distance"] == pytest.approx(pairwise)
    assert stats["normalized_distance"] == pytest.approx(pairwise / 5.0)
    # the threshold decides what counts as in use
    small = torch.tensor([[0.005, 0.5, -0.02, 0.0]])
    assert selection_stats(small)["l0"] == 2
    assert selection_stats(small, l0_threshold=1e-3)["l0"] == 3
    assert selection_stats(small)["pairwise_distance"] == 0.0  # one document: no pairs


def test_pearson_r_known_data():
    assert landscape.pearson_r([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert landscape.pearson_r([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert landscape.pearson_r([3, 3, 3], [1, 2, 3]) is None  # constant input: undefined, not NaN
    assert landscape.pearson_r([1, 2], [5, 5]) is None
    assert landscape.pearson_r([1], [2]) is None
    with pytest.raises(ValueError):
        landscape.pearson_r([1, 2], [1, 2, 3])


def test_other_documents_are_deterministic_and_never_the_document():
    assert generation.other_documents(0, 5, 4) == [1, 2, 3, 4]
    assert generation.other_documents(2, 3, 4) == [0, 1]
    picks = generation.other_documents(3, 10, 4)
    assert len(picks) == 4 == len(set(picks)) and 3 not in picks and picks == generation.other_documents(3, 10, 4)
    assert generation.other_documents(0, 1, 4) == []


# ---- landscape -------------------------------------------------------------------------------


def test_landscape_grid_shape_and_minimum():
    axis = np.linspace(-1, 1, 5)
    keys = landscape.grid_keys(axis)
    assert keys.shape == (25, 2)
    assert keys[2 * 5 + 4].tolist() == [1.0, 0.0]  # row y index 2, column x index 4

    targets = np.array([[0.5, -0.5], [-1.0, 1.0], [0.1, 0.1]])
    seen = []

    def ce_of(doc, candidates):  # a crafted CE: squared distance to the document's target
        seen.append(candidates.shape)
        return ((candidates.numpy() - targets[doc]) ** 2).sum(axis=1)

    land = landscape.compute_landscape(ce_of, targets, grid=5)
    assert land["axis"] == pytest.approx(axis.tolist()) and seen == [(25, 2)] * 3
    first = land["documents"][0]
    ppl = np.array(first["perplexity"])
    assert ppl.shape == (5, 5)
    assert first["minimum"]["key"] == [0.5, -0.5] and (first["minimum"]["x_index"], first["minimum"]["y_index"]) == (3, 1)
    assert ppl[1, 3] == pytest.approx(1.0) and ppl.min() == ppl[1, 3]  # exp(0)
    assert land["documents"][1]["minimum"]["key"] == [-1.0, 1.0]
    assert land["documents"][2]["minimum"]["key"] == [0.0, 0.0]  # nearest grid point
    assert all(d["minimum_nearest_own_key"] for d in land["documents"])
    assert land["documents"][2]["distance_minimum_to_own_key"] == pytest.approx(math.sqrt(0.02))


def test_landscape_axis_covers_the_keys():
    assert landscape.landscape_axis(np.array([[0.3, -0.9]]), 10).tolist() == pytest.approx(np.linspace(-1, 1, 10).tolist())
    wide = landscape.landscape_axis(np.array([[1.4, -0.2], [0.0, -1.2]]), 7)
    assert wide[0] == pytest.approx(-1.54) and wide[-1] == pytest.approx(1.54)
    with pytest.raises(ValueError, match="2-d keys"):
        landscape.compute_landscape(lambda d, c: [0.0], np.zeros((2, 3)), 4)


def test_prompt_batch_pads_on_the_left():
    ids, mask = generation.prompt_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ---- the condition switch on a trained tiny memory -------------------------------------------


class _Tok:  # generate_greedy only reads pad/eos ids; from_model sets padding
    eos_token = "<eos>"
    pad_token = "<eos>"
    eos_token_id = 0
    pad_token_id = 0
    padding_side = "left"


def test_condition_switch_changes_generation():
    """Train a memory on two random token sequences (one per document), then generate from each
    sequence's first tokens: the right key recalls the sequence, other conditions do not."""
    foundation = from_model(tiny_model("gpt_neox", num_layers=3), _Tok())
    memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=2, memory_dim=32),
                            generator=torch.Generator().manual_seed(0))
    seqs = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    batches = [Batch(d, torch.tensor([d]), seqs[d:d + 1], torch.ones(1, 16, dtype=torch.long), seqs[d:d + 1].clone())
               for d in range(2)]
    engine = FastEngine(foundation, memory, 2, torch.float32)
    optimizer = torch.optim.AdamW(memory.trainable_parameters(), lr=1e-2)
    for step in range(150):
        batch = batches[step % 2]
        (ce,) = engine.losses(batch, [memory.keys_for(batch.doc_ids)])
        optimizer.zero_grad()
        ce.backward()
        optimizer.step()
    memory.eval()

    prompts = [seqs[d, :4].tolist() for d in range(2)]
    truth = [seqs[d, 4:].tolist() for d in range(2)]
    keys = memory.doc_keys.detach()
    right = generation.generate_greedy(foundation, memory, 2, prompts, keys, 12)
    swapped = generation.generate_greedy(foundation, memory, 2, prompts, keys.flip(0), 12)
    no_key = generation.generate_greedy(foundation, memory, 2, prompts, None, 12)
    plain = generation.generate_greedy(foundation, memory, 2, prompts, NO_MEMORY, 12)
    assert right == truth  # recalled exactly with the document's own key
    for other in (swapped, no_key, plain):
        assert all(o != r for o, r in zip(other, right))
    # one row at a time, and with a ragged (left-padded) batch, gives the same continuations
    assert generation.generate_greedy(foundation, memory, 2, prompts, keys, 12, batch_size=1) == right
    ragged = generation.generate_greedy(foundation, memory, 2, [prompts[0], seqs[1, 1:4].tolist()], keys, 12)
    alone = generation.generate_greedy(foundation, memory, 2, [seqs[1, 1:4].tolist()], keys[1:], 12)
    assert ragged[0] == right[0] and ragged[1] == alone[0]
    with pytest.raises(ValueError, match="keys for"):
        generation.generate_greedy(foundation, memory, 2, prompts, keys[:1], 4)


# ---- end to end on a tiny saved Pythia-shaped model ------------------------------------------

TRAIN_ARGS = ["--num_gpus", "0", "--dataset", "synthetic", "--synthetic_articles", "10", "--max_labels", "3",
              "--max_segments", "2", "--segment_length", "24", "--max_length", "48", "--hook_memory_layer", "2",
              "--hook_memory_dim", "8", "--num_epochs", "3", "--save_freq", "3", "--lr", "1e-2"]
EVAL_ARGS = ["--prompt_tokens", "8", "--new_tokens", "8", "--grid", "3"]


@pytest.fixture(scope="module")
def trained_runs(tiny_lm_dir, tmp_path_factory) -> dict[str, Path]:
    import train_guidance

    root = tmp_path_factory.mktemp("eval_runs")
    runs = {}
    for name, extra in (("keyed", []), ("shared", ["--document_memory", "shared"])):
        assert train_guidance.main(["--lm_path", str(tiny_lm_dir), *TRAIN_ARGS, *extra,
                                    "--save_dir", str(root / name)]) == 0
        runs[name] = root / name / "run_0"
    return runs


def _png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_shared_baseline_trains_without_keys(trained_runs):
    run = trained_runs["shared"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["document_memory"] == "shared"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["ce_negative"] is None and "l0" not in m for m in metrics)
    memory = load_memory(run / "memory")
    assert not memory.config.use_keys
    x = torch.randn(2, 5, memory.config.hidden_size)
    with torch.no_grad():  # keys make no difference to a shared memory
        torch.testing.assert_close(memory(x, memory.doc_keys[[0, 1]]), memory(x, None))


def test_end_to_end_keyed_and_shared(trained_runs, tmp_path, capsys):
    keyed, shared = trained_runs["keyed"], trained_runs["shared"]
    assert em.main(["--run_dir", str(keyed), *EVAL_ARGS]) == 0
    out = keyed / "eval"
    for name in ("recall.json", "recall.png", "ce_matrix.json", "ce_matrix.png", "length_vs_l0.json",
                 "length_vs_l0.png", "landscape.json", "landscape.png", "selection_stats.json",
                 "selection_stats.png", "summary.json"):
        assert (out / name).is_file(), name
    for png in out.glob("**/*.png"):
        _png(png)
    assert sorted(p.name for p in (out / "landscape").iterdir()) == ["doc_00.png", "doc_01.png", "doc_02.png"]

    recall = json.loads((out / "recall.json").read_text())
    assert recall["conditions"] == ["right_key", "other_keys", "no_key", "no_memory"]
    for condition in recall["conditions"]:
        for rouge in ("rouge1", "rouge2", "rougeL"):
            assert set(recall["mean"][condition][rouge]) == {"recall", "precision", "f1"}
            assert 0.0 <= recall["mean"][condition][rouge]["recall"] <= 1.0
    assert len(recall["per_document"]) == 3
    assert recall["segments_scored"] + recall["segments_skipped_too_short"] == 6

    ce = json.loads((out / "ce_matrix.json").read_text())
    assert np.array(ce["matrix"]).shape == (3, 3) and len(ce["titles"]) == 3 == len(ce["no_memory"])
    titles = [d["title"] for d in yaml.safe_load((keyed / "config.yaml").read_text())["documents"]]
    assert ce["titles"] == titles
    land = json.loads((out / "landscape.json").read_text())
    assert np.array([d["perplexity"] for d in land["documents"]]).shape == (3, 3, 3)
    length = json.loads((out / "length_vs_l0.json").read_text())
    assert len(length["documents"]) == 3 and all(d["tokens"] > 0 for d in length["documents"])
    stats = json.loads((out / "selection_stats.json").read_text())
    assert len(stats["per_epoch"]) == 3 and stats["final"]["l0"] <= 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acceptance"] is not None and set(summary["rougeL_recall"]) == set(recall["conditions"])

    # the shared run: keyless conditions, no matrix, no landscape
    assert em.main(["--run_dir", str(shared.parent), *EVAL_ARGS]) == 0  # a save_dir resolves to its run
    recall = json.loads((shared / "eval" / "recall.json").read_text())
    assert recall["conditions"] == ["memory", "no_memory"]
    assert json.loads((shared / "eval" / "landscape.json").read_text())["skipped"] is True
    assert json.loads((shared / "eval" / "ce_matrix.json").read_text())["matrix"] is None

    # one table for both
    report_dir = tmp_path / "report"
    assert em.main(["--compare", str(keyed), str(shared), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "compare.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["document_memory=keyed", "document_memory=shared"]
    assert report["differing_fields"] == ["document_memory"]
    table = (report_dir / "compare.md").read_text()
    assert "R-L rec. right_key" in table and "R-L rec. memory" in table
    _png(report_dir / "recall.png")
    _png(report_dir / "selection_stats.png")
    capsys.readouterr()


def test_max_docs_measures_the_first_documents(trained_runs, tmp_path, capsys):
    import shutil

    run = shutil.copytree(trained_runs["keyed"], tmp_path / "run_0")
    assert em.main(["--run_dir", str(run), *EVAL_ARGS, "--max_docs", "2"]) == 0
    ce = json.loads((run / "eval" / "ce_matrix.json").read_text())
    assert np.array(ce["matrix"]).shape == (2, 2)
    attribution = json.loads((run / "eval" / "attribution.json").read_text())
    items = attribution["training_segments"]["items"]
    # the first 2 documents' segments, each ranked among all 3 documents' keys
    assert [i["document"] for i in items] == [0, 0, 1, 1] and all(1 <= i["rank"] <= 3 for i in items)
    # a segment's right-key CE is its row of the CE table: the CE matrix's diagonal pools them by tokens
    for d in range(2):
        mine = [i for i in items if i["document"] == d]
        pooled = sum(i["ce_right_key"] * i["tokens"] for i in mine) / sum(i["tokens"] for i in mine)
        assert pooled == pytest.approx(ce["matrix"][d][d], rel=1e-9)
    capsys.readouterr()


def test_sampled_ce_matrix_and_attribution_are_the_full_ones_entries(trained_runs, tmp_path, capsys):
    """--ce_other_keys K scores each document under its own key and K drawn others (linear in N), and
    --attribution_docs Q attributes Q documents' texts against every key: the figures they keep are the
    full evaluation's."""
    import shutil

    from docmem.other_documents import drawn_other_documents

    full_run = shutil.copytree(trained_runs["keyed"], tmp_path / "full" / "run_0")
    sampled_run = shutil.copytree(trained_runs["keyed"], tmp_path / "sampled" / "run_0")
    for run in (full_run, sampled_run):  # another test may have evaluated the fixture's run
        shutil.rmtree(run / "eval", ignore_errors=True)
    assert em.main(["--run_dir", str(full_run), *EVAL_ARGS, "--grid", "0"]) == 0
    assert em.main(["--run_dir", str(sampled_run), *EVAL_ARGS, "--grid", "0", "--ce_other_keys", "1",
                    "--attribution_docs", "2"]) == 0
    full = json.loads((full_run / "eval" / "ce_matrix.json").read_text())
    sampled = json.loads((sampled_run / "eval" / "ce_matrix.json").read_text())
    matrix = np.array(full["matrix"])
    assert sampled["matrix"] is None and not (sampled_run / "eval" / "ce_matrix.png").exists()
    drawn = drawn_other_documents(3, 1).tolist()
    assert sampled["sampled_columns"] == drawn
    np.testing.assert_allclose(sampled["diagonal"], np.diag(matrix), rtol=1e-5)
    np.testing.assert_allclose(sampled["sampled_ce"], [[matrix[d][j] for j in drawn[d]] for d in range(3)], rtol=1e-5)
    np.testing.assert_allclose(sampled["no_memory"], full["no_memory"], rtol=1e-5)
    assert sampled["off_diagonal_mean"] == pytest.approx(np.mean([matrix[d][drawn[d][0]] for d in range(3)]), rel=1e-5)
    assert sampled["scored_tokens"] == full["scored_tokens"]

    full_attr = json.loads((full_run / "eval" / "attribution.json").read_text())
    attr = json.loads((sampled_run / "eval" / "attribution.json").read_text())
    assert attr["attributed_documents"] == [0, 1] and full_attr["attributed_documents"] == "all"
    for part in ("training_segments", "held_out"):
        mine = attr[part]["items"]
        theirs = [i for i in full_attr[part]["items"] if i["document"] in (0, 1)]
        assert [i["document"] for i in mine] == [i["document"] for i in theirs] and mine
        for a, b in zip(mine, theirs):  # every document is still a candidate: the same ranks
            assert a["rank"] == b["rank"] and a["top1"] == b["top1"]
            assert a["ce_right_key"] == pytest.approx(b["ce_right_key"], rel=1e-5)
    summary = json.loads((sampled_run / "eval" / "summary.json").read_text())
    assert summary["settings"]["ce_other_keys"] == 1 and summary["ce"]["diagonal_mean"] == pytest.approx(
        float(np.diag(matrix).mean()), rel=1e-5)
    capsys.readouterr()


@pytest.mark.parametrize("flag", ["--ce_other_keys", "--attribution_docs"])
def test_sampling_flags_refuse_negative_counts(flag, capsys):
    assert em.main(["--run_dir", "unused", flag, "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) == 1


def test_mismatched_documents_fail_clearly(trained_runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run_0"
    shutil.copytree(trained_runs["keyed"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["documents"][1]["title"] = "Not The Trained Article"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert em.main(["--run_dir", str(run), *EVAL_ARGS]) == 2
    err = capsys.readouterr().err
    assert "differ from those it was trained on" in err and "Not The Trained Article" in err
    assert em.main(["--run_dir", str(tmp_path / "nowhere")]) == 2
    assert em.main(["--compare", str(run)]) == 2  # --out missing
    assert "--compare needs --out" in capsys.readouterr().err


def test_run_labels_name_what_differs():
    base = {"key_activation": "tanh", "guidance": 0.1, "save_dir": "a"}
    configs = [dict(base), dict(base, key_activation="relu", save_dir="b"), dict(base, guidance=0.5, save_dir="c")]
    assert compare.run_labels(configs, ["a", "b", "c"]) == ["baseline", "key_activation=relu", "guidance=0.5"]
    assert compare.run_labels([base, dict(base)], ["x", "y"]) == ["baseline [x]", "baseline [y]"]
    assert compare.run_labels([base, dict(base, guidance=0.5)], ["x", "y"]) == ["guidance=0.1", "guidance=0.5"]
    # a field a run predates reads as its default: no difference
    assert compare.differing_fields([{"guidance": 0.1}, {}]) == []
    with pytest.raises(EvalError, match="--grid"):
        options.EvalOptions(grid=1).validate()
