"""--cuda_graphs: the fast path's training step, captured once per batch in a CUDA graph and replayed.

On a GPU a small step is mostly the host launching its ~235 kernels one by one; a graph launches
them all at once. What one replay runs (`GraphedSteps._body`): the memory, the blocks above it, the
head's chunked CE under the positive and negative keys, the guidance loss, backward, clipping and
AdamW, then a roll-back of the weights and the optimizer's state when a loss part or the gradient
norm is not finite, so a bad step is still refused before the weights keep it (the host reads the
step's numbers after the replay, once, and raises as the eager step does).

Everything a replay reads stays where the capture found it: the batch's prefix in the engine's
device cache, its scored tokens (engines.ScoredTokens), the weights and AdamW's state (created by
the eager steps before the first capture; AdamW(capturable=True)), and two key buffers. The keys
are drawn on the host as the eager step draws them (the same generator, the same numbers) and
copied into those buffers before each replay; the graph never sees the CPU.

What cannot be captured is refused in one line (`--cuda_graphs on`) or left eager (`auto`):
`refusal` names it. The first replay of each graph is checked against an eager forward of the same
batch and keys; a mismatch restores the weights and ends `on`, or turns `auto` back to eager.

On a CPU the same code runs with `EagerRecorder` (a "replay" calls the step's function), which is
how the tests and the GPU kit's smoke run check it without a GPU.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from docmem.batching import Batch
from docmem.config import CUDA_GRAPH_MODES, TrainConfig
from docmem.errors import ConfigError, DocmemError, NonFiniteLoss
from docmem.optimizer_step import group_norm
from docmem.step_values import read_on_host

log = logging.getLogger(__name__)

EAGER_STEPS = 3  # eager steps before the first capture: cuBLAS, autograd and AdamW's state set up
CHECK_RTOL = 2e-2  # the first replay's loss parts against an eager forward (bf16 rounding and more)

Keys = torch.Tensor | None
KeysFn = Callable[[Batch], tuple[Keys, Keys]]  # the step's positive and negative keys, drawn on the host
LossFn = Callable[[Batch, Keys, Keys], tuple[torch.Tensor, list[torch.Tensor | None]]]  # loss and its parts


class CudaGraphError(DocmemError, RuntimeError):
    """--cuda_graphs on, and a captured step that did not replay as it ran eagerly (exit 2)."""


def refusal(config: TrainConfig, device: str, world_size: int) -> str | None:
    """Why this run's step cannot be captured, in words for a one-line message (None: it can)."""
    if not str(device).startswith("cuda"):
        return f"CUDA graphs need a CUDA device (this run trains on {device})"
    reasons = [(config.reference_loop, "the reference loop (--reference_loop) runs the whole LM twice a step"),
               (config.uses_lora, "the LoRA baselines train through peft's adapters"),
               (world_size > 1, "under torchrun the step all-reduces across processes"),
               (config.num_accumulation_steps > 1, "--num_accumulation_steps > 1 splits a step over batches"),
               (config.learn_doc_keys, "--learn_doc_keys trains the keys the host draws"),
               (config.lr_scheduler != "constant" or config.num_warmup_steps > 0,
                "the learning rate changes from step to step (--lr_scheduler / --num_warmup_steps); a captured "
                "step keeps one"),
               (config.detect_anomaly, "--detect_anomaly checks every operation on the host")]
    return next((why for bad, why in reasons if bad), None)


def resolve(mode: str, why_not: str | None) -> bool:
    """--cuda_graphs auto|on|off and the run's refusal -> whether the steps are captured."""
    if mode not in CUDA_GRAPH_MODES:
        raise ConfigError("cuda_graphs", mode, f"allowed: {', '.join(CUDA_GRAPH_MODES)}")
    if mode == "on" and why_not:
        raise ConfigError("cuda_graphs", mode, f"{why_not}; use --cuda_graphs off (or auto)")
    return mode != "off" and why_not is None


class Recorder(Protocol):
    """How a step's function becomes something to replay."""

    def warm(self, fn: Callable[[], None]) -> None:
        """Run fn once, eagerly, as a warm-up before captures."""
        ...

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record fn; return what replays it."""
        ...


class CudaRecorder:
    """torch.cuda graphs, all sharing one memory pool (the graphs replay one after another, and every
    replay rewrites what it leaves behind before the host reads it)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)

    def warm(self, fn: Callable[[], None]) -> None:
        # eager work before a capture runs on a side stream, as torch.cuda.graph asks
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            fn()
        return graph.replay


class EagerRecorder:
    """The CPU's stand-in: a replay calls the function (the tests and the kit's smoke run use it)."""

    def warm(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn


@dataclass
class _Graph:
    replay: Callable[[], None]
    pos: torch.Tensor | None  # the key buffers the replay reads (None: no such keys in this run)
    neg: torch.Tensor | None
    holder: dict  # "outputs": (present parts + 1,) the loss parts present, then the gradient norm; "present"
    checked: bool = False


@dataclass
class Trainables:
    """What a step changes: the optimizer (AdamW, capturable on CUDA), its schedule (constant: a
    captured step keeps its learning rate), the parameters, and the gradient clipping."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    clip: float


@dataclass
class StepFunctions:
    """The run's own parts of a step (train_guidance.py's)."""
    keys: KeysFn  # the step's keys, drawn on the host
    losses: LossFn  # the loss and its parts under given keys (no backward)
    prepare: Callable[[Batch], bool]  # fill the engine's caches; True when the batch's prefix stays on the device
    eager_step: Callable[[Batch, Keys, Keys, str], list[float | None]]  # loss, backward, optimizer step, eagerly
    check: Callable[[list[float | None], str], None]  # the eager step's refusal of non-finite loss parts


class GraphedSteps:
    """The training steps of one run, each batch's captured at its first visit after EAGER_STEPS eager
    steps. step() does what the eager loss, backward and optimizer step do, and returns the loss parts."""

    def __init__(self, trainables: Trainables, functions: StepFunctions, recorder: Recorder, mode: str) -> None:
        """mode: --cuda_graphs (on: a step that cannot be captured or replays otherwise ends the run; auto:
        the run goes on eagerly)."""
        self.optimizer, self.scheduler = trainables.optimizer, trainables.scheduler
        self.params, self.clip = list(trainables.params), trainables.clip
        self.keys, self.losses, self.prepare = functions.keys, functions.losses, functions.prepare
        self.eager_step, self.check = functions.eager_step, functions.check
        self.recorder, self.mode = recorder, mode
        self.graphs: dict[int, _Graph] = {}
        self.eager_left = EAGER_STEPS
        self.disabled: str | None = None  # why `auto` went back to eager
        self.live: list[torch.Tensor] = []  # weights and optimizer state, rolled back on a refused step
        self.saved: list[torch.Tensor] = []
        self.captured = 0  # graphs captured, and replays run (the logs and the tests read them)
        self.replays = 0

    def step(self, batch: Batch, where: str) -> list[float | None]:
        """One training step on `batch`: the loss parts as floats (None: not part of this run's loss)."""
        pos, neg = self.keys(batch)
        if self.disabled or not self.prepare(batch):
            return self.eager_step(batch, pos, neg, where)
        if self.eager_left > 0:
            self.eager_left -= 1
            out: list[list[float | None]] = []
            self.recorder.warm(lambda: out.append(self.eager_step(batch, pos, neg, where)))
            return out[0]
        graph = self.graphs.get(batch.index)
        if graph is None:
            try:
                graph = self._capture(batch, pos, neg)
            except RuntimeError as err:  # an operation that cannot be captured (one that waits for the host)
                for p in self.params:
                    p.grad = None
                return self._fall_back(f"batch {batch.index + 1}'s step could not be captured "
                                       f"({str(err).splitlines()[0][:160]})", batch, pos, neg, where)
        _fill(graph.pos, pos)
        _fill(graph.neg, neg)
        backup, expected = None, None
        if not graph.checked:  # the first replay: checked against an eager forward, undone if it differs
            backup = [t.detach().clone() for t in self.live]
            expected = self._eager_parts(batch, pos, neg)
        graph.replay()
        for p in self.params:
            p.grad = None
        self.replays += 1
        values = read_on_host(list(graph.holder["outputs"].unbind()))  # the step's one read
        if expected is not None:
            graph.checked = True
            differs = _mismatch(values[:-1], expected)
            if differs:
                with torch.no_grad():
                    for t, b in zip(self.live, backup):
                        t.copy_(b)
                return self._fall_back(f"the first replay of batch {batch.index + 1} gave loss parts {differs}",
                                       batch, pos, neg, where)
        present = iter(values[:-1])
        parts = [next(present) if here else None for here in graph.holder["present"]]
        self.check(parts, where)  # the weights were rolled back on the device; the message is the eager step's
        if not math.isfinite(values[-1]):
            raise NonFiniteLoss(f"non-finite gradient norm ({values[-1]}) {where}")
        self.scheduler.step()
        return parts

    def _fall_back(self, why: str, batch: Batch, pos: Keys, neg: Keys, where: str) -> list[float | None]:
        if self.mode == "on":
            raise CudaGraphError(f"--cuda_graphs on: {why}; use --cuda_graphs off")
        self.disabled = why
        log.warning(f"--cuda_graphs auto: {why}: the run goes on without CUDA graphs")
        return self.eager_step(batch, pos, neg, where)

    def _capture(self, batch: Batch, pos: Keys, neg: Keys) -> _Graph:
        if not self.live:  # AdamW's state exists after the eager steps: what a refused step restores
            self.live = [p.data for p in self.params] + [v for p in self.params
                                                         for v in self.optimizer.state.get(p, {}).values()
                                                         if isinstance(v, torch.Tensor)]
            self.saved = [torch.empty_like(t) for t in self.live]
        graph = _Graph(lambda: None, None if pos is None else pos.detach().clone(),
                       None if neg is None else neg.detach().clone(), {})

        def body() -> None:
            graph.holder["outputs"], graph.holder["present"] = self._body(batch, graph.pos, graph.neg)

        for p in self.params:
            p.grad = None  # the graph's backward makes its own gradients
        graph.replay = self.recorder.capture(body)
        for p in self.params:
            p.grad = None
        self.captured += 1
        self.graphs[batch.index] = graph
        return graph

    def _body(self, batch: Batch, pos: Keys, neg: Keys) -> tuple[torch.Tensor, list[bool]]:
        """One whole step on the device: loss, backward, clipping, AdamW, the roll-back of a bad step."""
        loss, parts = self.losses(batch, pos, neg)
        loss.backward()
        norm = group_norm(self.params, self.clip)
        outputs = torch.stack([*(p.detach().float() for p in parts if p is not None), norm.detach().float()])
        ok = torch.isfinite(outputs).all()
        with torch.no_grad():
            for s, t in zip(self.saved, self.live):
                s.copy_(t)
            self.optimizer.step()
            for s, t in zip(self.saved, self.live):
                t.copy_(torch.where(ok, t, s))
        return outputs, [p is not None for p in parts]

    def _eager_parts(self, batch: Batch, pos: Keys, neg: Keys) -> list[float]:
        with torch.no_grad():
            _, parts = self.losses(batch, pos, neg)
        return read_on_host([p for p in parts if p is not None])


def _fill(buffer: torch.Tensor | None, keys: Keys) -> None:
    if buffer is not None and keys is not None:
        buffer.copy_(keys, non_blocking=True)


def _mismatch(got: Sequence[float | None], expected: Sequence[float]) -> str | None:
    """None when every part matches within CHECK_RTOL (both non-finite also match), else what differs."""
    for g, e in zip(got, expected):
        if not (math.isfinite(e) or math.isfinite(g)):
            continue
        if not abs(g - e) <= CHECK_RTOL * max(abs(e), 1e-3):
            return f"{g:.6g} where the eager forward gives {e:.6g}"
    return None
