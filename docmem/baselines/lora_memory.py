"""LoRA adapters as a document memory (the baselines of `--document_memory lora / lora_shared`): which
modules of the hooked block get adapters, their rank (matched to the keyed memory's parameters), adding
them with peft, the loss engine that selects an adapter per key set, and memory/ on disk.

    plan = plan_lora(config, foundation, documents)      # targets, rank, parameter counts
    adapters = attach_lora(foundation, plan, seed)       # peft: one adapter per document (or one shared)
    engine = LoraEngine(adapters, dtype, cache_budget)   # losses(batch, ["doc_03", NO_MEMORY])
    save_adapters(adapters, run_dir / "memory", provenance)

An adapter's name is its document's key: `doc_NN` (per document) or `shared`. Adapters sit only on
block --hook_memory_layer, so everything below it is the same for every adapter and every epoch: the
engine caches the hidden state entering that block (engines.FastEngine with a pass-through at block
L - 1) and runs the adapted block and those above it per adapter. memory/ holds lora_config.json and
one safetensors file per adapter under adapters/: forgetting a document is deleting its file.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import wikitext
from docmem.atomic import whole_folder
from docmem.batching import Batch
from docmem.config import TrainConfig
from docmem.engines import NO_MEMORY, FastEngine, KeySet
from docmem.errors import ConfigError, MemoryFileError
from docmem.run_folder import LORA_CONFIG_NAME, memory_config_for
from document_memories import DocumentMemory, file_sha256
from foundations import Foundation

if TYPE_CHECKING:  # peft itself is imported where an adapter is made, saved or loaded: importing it
    from peft import LoraConfig, PeftModel  # takes 0.32 s, which a run without LoRA never needs

ADAPTERS_DIR = "adapters"
SHARED_ADAPTER = "shared"
TARGET_GROUPS = ("mlp", "attention", "all")


def adapter_names(kind: str, num_docs: int) -> list[str]:
    """The adapters of a run: doc_00, doc_01, ... (one per document, in key order) or one shared."""
    if kind == "lora_shared":
        return [SHARED_ADAPTER]
    width = max(2, len(str(num_docs - 1)))
    return [f"doc_{d:0{width}d}" for d in range(num_docs)]


@dataclass(frozen=True)
class LoraPlan:
    """What gets adapters and how big they are; config.yaml, summary.json and lora_config.json record it."""
    kind: str  # lora or lora_shared
    layer: int  # the hooked block
    targets: tuple[str, ...]  # full module names in the LM
    shapes: tuple[tuple[int, int], ...]  # (in_features, out_features) of each target
    rank: int
    adapters: tuple[str, ...]
    keyed_parameters: int  # the keyed memory's trainable parameters at the same settings
    rank_rule: str  # how the rank was chosen

    @property
    def parameters_per_adapter(self) -> int:
        return self.rank * sum(i + o for i, o in self.shapes)

    @property
    def parameters(self) -> int:
        return self.parameters_per_adapter * len(self.adapters)

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "shapes": [list(s) for s in self.shapes], "parameters": self.parameters,
                "parameters_per_adapter": self.parameters_per_adapter}


def block_linears(foundation: Foundation, layer: int) -> dict[str, nn.Linear]:
    """The block's linear modules by their name within the block (e.g. mlp.down_proj)."""
    return {name: m for name, m in foundation.block(layer).named_modules() if isinstance(m, nn.Linear)}


def resolve_targets(foundation: Foundation, layer: int, spec: str) -> list[str]:
    """--lora_targets -> names within block `layer`: a group (mlp, attention, all) or listed names."""
    linears = block_linears(foundation, layer)
    if spec in TARGET_GROUPS:
        words = {"mlp": ("mlp",), "attention": ("attn", "attention"), "all": ("",)}[spec]
        chosen = [n for n in linears if any(w in n for w in words)]
    else:
        chosen = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in linears]
        if unknown or not chosen:
            raise ConfigError("lora_targets", spec, f"block {layer} of {foundation.name} has no linear module "
                                                    f"{', '.join(unknown) or '(none named)'}; allowed: "
                                                    f"{', '.join(TARGET_GROUPS)}, or names among {', '.join(linears)}")
    if not chosen:
        raise ConfigError("lora_targets", spec, f"block {layer} of {foundation.name} has no {spec} linear modules; "
                                                f"its linear modules: {', '.join(linears)}")
    return chosen


def keyed_parameter_count(config: TrainConfig, hidden_size: int, num_docs: int) -> int:
    """Trainable parameters of the keyed memory these settings would train (built on the meta device)."""
    memory_config = replace(memory_config_for(config, hidden_size, num_docs), use_keys=True)
    with torch.device("meta"):  # shapes only: nothing is allocated
        memory = DocumentMemory(memory_config)
    return sum(p.numel() for p in memory.parameters() if p.requires_grad)


def plan_lora(config: TrainConfig, foundation: Foundation, documents: Sequence[wikitext.Document]) -> LoraPlan:
    """Targets and rank for the run; a rank that does not fit the targets is refused (exit 2)."""
    layer = config.hook_memory_layer
    names = resolve_targets(foundation, layer, config.lora_targets)
    linears = block_linears(foundation, layer)
    shapes = tuple((linears[n].in_features, linears[n].out_features) for n in names)
    adapters = tuple(adapter_names(config.document_memory, len(documents)))
    keyed = keyed_parameter_count(config, foundation.hidden_size, len(documents))
    max_rank = min(min(s) for s in shapes)
    per_rank = sum(i + o for i, o in shapes) * len(adapters)
    if config.lora_rank == 0:
        rank = min(max_rank, max(1, round(keyed / per_rank)))
        rule = (f"auto: total trainable parameters closest to the keyed memory's {keyed} "
                f"(rank in 1..{max_rank}, {per_rank} parameters per unit of rank)")
    else:
        rank, rule = config.lora_rank, "given (--lora_rank)"
        if rank > max_rank:
            raise ConfigError("lora_rank", rank, f"must lie in 1..{max_rank}, the smallest dimension of the targets "
                                                 f"({', '.join(names)}) of block {layer} (0 = auto)")
    prefix = _prefix(foundation, layer)
    return LoraPlan(config.document_memory, layer, tuple(f"{prefix}.{n}" for n in names), shapes, rank, adapters,
                    keyed, rule)


def _prefix(foundation: Foundation, layer: int) -> str:
    block = foundation.block(layer)
    return next(name for name, m in foundation.model.named_modules() if m is block)


@dataclass
class LoraAdapters:
    """The LM with its adapters (peft), and the plan they follow. `model` wraps foundation.model,
    whose target modules peft replaced in place by LoRA layers."""
    model: PeftModel
    plan: LoraPlan
    foundation: Foundation

    def parameters(self, adapter: str | None = None) -> list[nn.Parameter]:
        """The adapters' weights (one adapter's with `adapter`)."""
        return [p for n, p in self.model.named_parameters() if "lora_" in n
                and (adapter is None or n.endswith(f".{adapter}.weight"))]

    def adapter_of(self, doc: int) -> str:
        return self.plan.adapters[0 if self.plan.kind == "lora_shared" else doc]


def lora_config(plan: LoraPlan) -> LoraConfig:
    """peft's config: B starts at zero (the LM unchanged), alpha = rank (scale 1), no dropout, no bias."""
    from peft import LoraConfig
    return LoraConfig(r=plan.rank, lora_alpha=plan.rank, lora_dropout=0.0, bias="none",
                      target_modules="|".join(re.escape(t) for t in plan.targets))


def adapter_seeds(seed: int, documents: Sequence[wikitext.Document], kind: str) -> list[int]:
    """Each adapter's initialisation seed, from its document's draw position (not its place in the run),
    so a document's adapter starts the same whichever other documents the run holds."""
    if kind == "lora_shared":
        return [seed]
    return [seed + 1_000_003 * (d.index + 1) for d in documents]


def attach_lora(foundation: Foundation, plan: LoraPlan, seeds: Sequence[int]) -> LoraAdapters:
    """Add the plan's adapters to the LM (in place, as peft does); adapter k's A matrices are drawn
    from seeds[k] (B starts at zero)."""
    from peft import get_peft_model
    config = lora_config(plan)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        torch.manual_seed(seeds[0])
        model = get_peft_model(foundation.model, config, adapter_name=plan.adapters[0])
        for name, seed in zip(plan.adapters[1:], seeds[1:]):
            torch.manual_seed(seed)
            model.add_adapter(name, config)
    model.eval()  # and it stays so: gradients need no train mode, and the LM's dropout stays off
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return LoraAdapters(model, plan, foundation)


class PassThrough(nn.Module):
    """Stands where engines.FastEngine expects a memory: the block's output unchanged."""

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return hidden


class LoraEngine:
    """engines.LossEngine whose key sets are adapter names (or NO_MEMORY: the plain LM).

    The prefix below the adapted block is cached once per batch (index); each key set then runs the
    adapted block and those above it with that adapter active."""

    def __init__(self, adapters: LoraAdapters, dtype: torch.dtype, cache_budget_bytes: int = 8 << 30,
                 head_dtype: torch.dtype | None = None, one_batch: bool = False) -> None:
        """one_batch: keep only the last batch's prefix (batches made on the fly, whose indices repeat)."""
        self.adapters, self.one_batch = adapters, one_batch
        self._last: Batch | None = None
        # a pass-through at the output of block L - 1 (the embeddings when L = 0): block L is in the suffix
        self.inner = FastEngine(adapters.foundation, PassThrough(), adapters.plan.layer - 1, dtype,
                                cache_budget_bytes=cache_budget_bytes, head_dtype=head_dtype)

    def losses(self, batch: Batch, key_sets: Sequence[KeySet], per_document: bool = False) -> list[torch.Tensor]:
        if self.one_batch and batch is not self._last:
            self.inner.clear_cache()
            self._last = batch
        out: list[torch.Tensor] = []
        for name in key_sets:
            if isinstance(name, str) and name == NO_MEMORY:
                with self.adapters.model.disable_adapter():
                    out += self.inner.losses(batch, [None], per_document)
                continue
            if not isinstance(name, str) or name not in self.adapters.plan.adapters:
                raise ValueError(f"unknown adapter {name!r}; the run has {', '.join(self.adapters.plan.adapters)}")
            self.adapters.model.set_adapter(name)
            out += self.inner.losses(batch, [None], per_document)
        return out

    def clear_cache(self) -> None:
        self.inner.clear_cache()


# ---- memory/ on disk: lora_config.json + adapters/<name>.safetensors -------------------------------

def save_adapters(adapters: LoraAdapters, directory: Path, extra: dict[str, Any]) -> Path:
    """One safetensors file per adapter (its tensors, fp32) and lora_config.json listing them with
    their checksums; `extra` (provenance, titles) goes into the JSON."""
    from peft import get_peft_model_state_dict
    with whole_folder(directory) as tmp:  # the folder appears complete, or stays as it was
        folder = tmp / ADAPTERS_DIR
        folder.mkdir()
        entries = []
        for d, name in enumerate(adapters.plan.adapters):
            state = get_peft_model_state_dict(adapters.model, adapter_name=name, save_embedding_layers=False)
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
            path = folder / f"{name}.safetensors"
            save_file(tensors, str(path), metadata={"format": "pt"})
            entries.append({"adapter": name, "document": None if name == SHARED_ADAPTER else d,
                            "file": f"{ADAPTERS_DIR}/{path.name}", "sha256": file_sha256(path),
                            "parameters": sum(t.numel() for t in tensors.values()), "bytes": path.stat().st_size})
        data = {**adapters.plan.record(), "alpha": adapters.plan.rank, "adapter_files": entries, **extra}
        (tmp / LORA_CONFIG_NAME).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return directory


def read_plan(directory: Path) -> tuple[LoraPlan, dict[str, Any]]:
    """lora_config.json: the plan, and the whole file."""
    path = directory / LORA_CONFIG_NAME
    if not path.is_file():
        raise MemoryFileError(f"{path}: file not found (not a LoRA baseline's memory/)")
    try:
        data = json.loads(path.read_text())
        plan = LoraPlan(data["kind"], data["layer"], tuple(data["targets"]), tuple(tuple(s) for s in data["shapes"]),
                        data["rank"], tuple(data["adapters"]), data["keyed_parameters"], data["rank_rule"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MemoryFileError(f"{path}: invalid LoRA config ({err})") from err
    return plan, data


def load_adapters(foundation: Foundation, directory: Path) -> LoraAdapters:
    """The LM with the adapters of memory/ (checksums checked); an adapter whose file was deleted
    (a forgotten document) is left out."""
    from peft import set_peft_model_state_dict
    plan, data = read_plan(directory)
    present = [e for e in data["adapter_files"] if (directory / e["file"]).is_file()]
    if not present:
        raise MemoryFileError(f"{directory}: no adapter file left under {ADAPTERS_DIR}/")
    plan = LoraPlan(plan.kind, plan.layer, plan.targets, plan.shapes, plan.rank,
                    tuple(e["adapter"] for e in present), plan.keyed_parameters, plan.rank_rule)
    adapters = attach_lora(foundation, plan, [0] * len(plan.adapters))  # (the files' weights replace the init)
    for entry in present:
        path = directory / entry["file"]
        if file_sha256(path) != entry["sha256"]:
            raise MemoryFileError(f"{path}: SHA-256 differs from the one in {LORA_CONFIG_NAME} (corrupt or replaced)")
        state = load_file(str(path))
        result = set_peft_model_state_dict(adapters.model, state, adapter_name=entry["adapter"])
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise MemoryFileError(f"{path}: unexpected tensors {sorted(unexpected)[:3]}")
    adapters.model.eval()
    return adapters


def remove_document(directory: Path, doc: int) -> Path:
    """Forget a document of a per-document LoRA memory: delete its adapter file (nothing else changes,
    and no other adapter ever saw its text). Returns the deleted file's path."""
    _, data = read_plan(directory)
    entry = next((e for e in data["adapter_files"] if e["document"] == doc), None)
    if entry is None:
        raise MemoryFileError(f"{directory}: no adapter of document {doc} (a shared adapter cannot forget one)")
    path = directory / entry["file"]
    path.unlink(missing_ok=True)
    return path
