"""--cuda_graphs on a CPU: the captured step's code (static key buffers, the whole step in one function,
the on-device roll-back of a refused step, the first replay's check) run through EagerRecorder, which
replays by calling the function. The numbers equal the eager loop's bit for bit; what cannot be
captured is refused in one line. tests/test_cuda.py captures real graphs on a GPU."""
from __future__ import annotations

import argparse
import copy
import dataclasses

import pytest
import torch

import train_guidance
from benchmarks import bench_train_step as bench
from docmem import cuda_graphs
from docmem.config import TrainConfig
from docmem.cuda_graphs import EAGER_STEPS, CudaGraphError, EagerRecorder, GraphedSteps, StepFunctions, Trainables
from docmem.errors import ConfigError, NonFiniteLoss
from docmem.training.run_state import Progress
from docmem.training.step_loss import refuse_non_finite_loss
from fixtures_memory import exit_code
from fixtures_tiny import tiny_argv, tiny_lm_dir  # noqa: F401


def small_args(*extra: str) -> argparse.Namespace:
    return bench.parse_args(["--shape", "tiny", "--device", "cpu", "--precision", "fp32", "--batch", "3", "--seq", "16",
                             "--num_batches", "3", *extra])


def eager_and_graphed(*extra: str):
    eager = bench.fast_run_state(small_args(*extra))
    graphed = copy.copy(eager)
    graphed.memory = copy.deepcopy(eager.memory)
    graphed.engine = copy.copy(eager.engine)
    graphed.engine.memory = graphed.memory
    graphed.engine.cache, graphed.engine.scored = {}, {}
    graphed.optimizer = torch.optim.AdamW(graphed.memory.trainable_parameters(), lr=eager.config.lr, foreach=True)
    graphed.scheduler = torch.optim.lr_scheduler.LambdaLR(graphed.optimizer, eager.scheduler.lr_lambdas[0])
    graphed.generator = torch.Generator().manual_seed(eager.generator.initial_seed())
    graphed.progress = Progress()
    graphed.graphs = train_guidance.graphed_steps(graphed)
    return eager, graphed


@pytest.mark.parametrize("extra", [(), ("--layer", "0")])
def test_the_graphed_steps_equal_the_eager_loop_bit_for_bit(extra):
    eager, graphed = eager_and_graphed(*extra)
    assert isinstance(graphed.graphs.recorder, EagerRecorder)
    for _ in range(4):  # 12 steps: 3 eager, then each batch captured once and replayed
        for state in (eager, graphed):
            state.progress.batch = 0
            train_guidance.train_epoch(state)
        assert graphed.progress.sums == eager.progress.sums
    for (name, a), b in zip(eager.memory.state_dict().items(), graphed.memory.state_dict().values()):
        assert torch.equal(a, b), name
    steps = graphed.graphs
    assert steps.captured == 3 and steps.replays == 12 - EAGER_STEPS and steps.disabled is None
    assert all(g.checked for g in steps.graphs.values())


def toy_steps(losses_fn, recorder=None, mode="on") -> tuple[GraphedSteps, torch.nn.Linear, list]:
    """GraphedSteps over a 3x2 linear layer: the loss is losses_fn(layer, step number)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    calls: list[int] = []
    x = torch.randn(4, 3)

    def losses(batch, pos, neg):
        loss = losses_fn(layer(x), len(calls))
        return loss, [loss.detach(), None]

    def eager_step(batch, pos, neg, where):
        calls.append(0)
        loss, parts = losses(batch, pos, neg)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return [float(parts[0]), None]

    def counted(batch, pos, neg):
        calls.append(1)
        return losses(batch, pos, neg)

    steps = GraphedSteps(Trainables(optimizer, scheduler, list(layer.parameters()), 1.0),
                         StepFunctions(keys=lambda batch: (None, None), losses=counted, prepare=lambda batch: True,
                                       eager_step=eager_step,
                                       check=lambda parts, where: refuse_non_finite_loss({"loss": parts[0]}, where)),
                         recorder or EagerRecorder(), mode)
    return steps, layer, calls


class Batch1:
    index = 0


def test_a_non_finite_step_is_rolled_back_on_the_device_and_refused():
    poisoned = {"on": False}
    steps, layer, calls = toy_steps(lambda y, n: y.pow(2).mean() * (float("nan") if poisoned["on"] else 1.0))
    for i in range(5):
        steps.step(Batch1(), f"at step {i + 1}")
    assert steps.replays == 5 - EAGER_STEPS
    poisoned["on"] = True
    before = [t.detach().clone() for t in steps.live]  # weights, exp_avg, exp_avg_sq, step counts
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(loss = nan\) at step 6$"):
        steps.step(Batch1(), "at step 6")
    assert all(torch.equal(a, b) for a, b in zip(steps.live, before))  # the optimizer's step was undone


class TwiceRecorder(EagerRecorder):
    """A broken capture: its replay runs the step twice (as a graph reading stale buffers would differ)."""

    def capture(self, fn):
        def replay():
            fn()
            fn()
        return replay


def test_a_first_replay_that_differs_is_undone_and_auto_goes_back_to_eager():
    reference, ref_layer, _ = toy_steps(lambda y, n: y.pow(2).mean(), mode="off")
    reference.disabled = "compare"
    steps, layer, _ = toy_steps(lambda y, n: y.pow(2).mean(), recorder=TwiceRecorder(), mode="auto")
    for i in range(EAGER_STEPS + 3):
        assert steps.step(Batch1(), "here") == reference.step(Batch1(), "here")
    assert steps.disabled and "first replay of batch 1" in steps.disabled
    assert torch.equal(layer.weight, ref_layer.weight)  # the double step was rolled back, the step ran eagerly


def test_with_on_a_replay_that_differs_ends_the_run_in_one_line():
    steps, layer, _ = toy_steps(lambda y, n: y.pow(2).mean(), recorder=TwiceRecorder(), mode="on")
    for _ in range(EAGER_STEPS):
        steps.step(Batch1(), "here")
    before = layer.weight.detach().clone()
    with pytest.raises(CudaGraphError, match=r"^--cuda_graphs on: the first replay of batch 1 gave loss parts "):
        steps.step(Batch1(), "here")
    assert torch.equal(layer.weight, before)


class FailingRecorder(EagerRecorder):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_step_that_cannot_be_captured_runs_eagerly_with_auto_and_ends_on(mode):
    reference, ref_layer, _ = toy_steps(lambda y, n: y.pow(2).mean(), mode="off")
    reference.disabled = "compare"
    steps, layer, _ = toy_steps(lambda y, n: y.pow(2).mean(), recorder=FailingRecorder(), mode=mode)
    for _ in range(EAGER_STEPS):
        assert steps.step(Batch1(), "here") == reference.step(Batch1(), "here")
    if mode == "on":
        with pytest.raises(CudaGraphError, match=r"^--cuda_graphs on: batch 1's step could not be captured "
                                                 r"\(operation not permitted when stream is capturing\); use"):
            steps.step(Batch1(), "here")
        return
    assert steps.step(Batch1(), "here") == reference.step(Batch1(), "here")
    assert "could not be captured" in steps.disabled and torch.equal(layer.weight, ref_layer.weight)


@pytest.mark.parametrize("change, words", [({"reference_loop": True}, "--reference_loop"),
                                           ({"num_accumulation_steps": 2}, "--num_accumulation_steps"),
                                           ({"learn_doc_keys": True}, "--learn_doc_keys"),
                                           ({"lr_scheduler": "cosine"}, "--lr_scheduler"),
                                           ({"num_warmup_steps": 5}, "--num_warmup_steps"),
                                           ({"detect_anomaly": True}, "--detect_anomaly")])
def test_what_cannot_be_captured_is_named(change, words):
    config = TrainConfig()
    assert cuda_graphs.refusal(config, "cuda:0", 1) is None
    assert "need a CUDA device" in cuda_graphs.refusal(config, "cpu", 1)
    assert "torchrun" in cuda_graphs.refusal(config, "cuda:0", 2)
    why = cuda_graphs.refusal(dataclasses.replace(config, **change), "cuda:0", 1)
    assert words in why
    assert cuda_graphs.resolve("auto", why) is False and cuda_graphs.resolve("off", None) is False
    assert cuda_graphs.resolve("auto", None) is True and cuda_graphs.resolve("on", None) is True
    with pytest.raises(ConfigError, match=r"^--cuda_graphs 'on': .*use --cuda_graphs off"):
        cuda_graphs.resolve("on", why)


def test_on_a_cpu_on_is_refused_and_auto_is_recorded_off(tiny_lm_dir, tmp_path, capsys):  # noqa: F811
    code = exit_code(train_guidance.main, tiny_argv(tiny_lm_dir, tmp_path / "on", "--cuda_graphs", "on",
                                                    num_epochs=1, save_freq=1))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cuda_graphs" in err[0] and "CUDA device" in err[0]
    assert exit_code(train_guidance.main, tiny_argv(tiny_lm_dir, tmp_path / "bad", "--cuda_graphs", "maybe",
                                                    num_epochs=1, save_freq=1)) == 2
    assert "auto, on, off" in capsys.readouterr().err
    assert train_guidance.main(tiny_argv(tiny_lm_dir, tmp_path / "auto", num_epochs=1, save_freq=1)) == 0
    import yaml
    config = yaml.safe_load((tmp_path / "auto" / "run_0" / "config.yaml").read_text())
    assert config["cuda_graphs"] == "auto" and config["resolved"]["cuda_graphs_used"].startswith("off: CUDA graphs need")
