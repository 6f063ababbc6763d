"""Every setting of a training run: one typed, self-validating dataclass, and its command line.

`parse_args(argv)` builds the config from flags (every field is a flag with its default and a
one-line meaning); `TrainConfig.validate()` checks it before any model or data loads and
raises `ConfigError` naming the flag, the value and what is allowed.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from document_memories import BUILTIN_KEY_ACTIVATIONS, MODULE_TYPES, activation_names

LM_NAMES = ("pythia", "llama2_hf", "llama2_chat_hf", "smollm2")
LM_SIZES = {
    "pythia": ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"),
    "llama2_hf": ("7b", "13b"),
    "llama2_chat_hf": ("7b", "13b"),
    "smollm2": ("135m",),
}
DATASETS = ("wikitext-103-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-2-raw-v1", "synthetic")
NEGATIVE_KEY_TYPES = ("other", "random", "zero", "perturb")
GUIDANCE_LOSSES = ("clamped_mse", "abs")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "cosine", "linear")
DOCUMENT_MEMORIES = ("keyed", "shared")
MEMORY_MODULES = ("linear",)


class ConfigError(ValueError):
    """A bad setting: the message is one line naming the flag, the value and what is allowed."""

    def __init__(self, flag: str, value: Any, allowed: str) -> None:
        super().__init__(f"--{flag} {value!r}: {allowed}")
        self.flag = flag


def _none_if_none(value: str | None) -> str | None:
    # run.sh passes the released defaults literally, e.g. lm_cache_dir=none.
    return None if value is None or value.lower() in ("none", "") else value


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    # --- the language model ---
    lm_name: str = _help("model family: " + ", ".join(LM_NAMES), default="pythia")
    lm_size: str = _help("model size within the family (pythia: 70m..12b, llama2: 7b 13b, smollm2: 135m)", default="1b")
    lm_path: str | None = _help("local folder or Hub id of any GPT-NeoX/Llama-like causal LM; overrides --lm_name/--lm_size", default=None)
    lm_cache_dir: str | None = _help("Hugging Face cache folder for model weights ('none' = library default)", default=None)
    num_gpus: int = _help("GPUs to split the LM's blocks over; 0 = CPU", default=1)
    device: str = _help("device for a single-device run: auto (cuda:0 if available, else cpu), cpu, cuda, cuda:N", default="auto")
    precision: str = _help("LM weight dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16; the memory stays fp32", default="auto")
    # --- data ---
    dataset: str = _help("WikiText config of EleutherAI/wikitext_document_level, or 'synthetic' (fictional articles, offline)", default="wikitext-103-v1")
    data_split: str = _help("dataset split to draw articles from", default="train")
    data_path: str | None = _help("local copy: a folder in the wikitext_document_level layout, a parquet file, or a WikiText text file", default=None)
    data_cache_dir: str | None = _help("Hugging Face cache folder for datasets ('none' = library default)", default=None)
    synthetic_articles: int = _help("how many fictional articles --dataset synthetic generates to draw from", default=100)
    max_labels: int = _help("number of documents (articles) to memorise, drawn at random with --seed", default=10)
    max_segments: int = _help("at most this many segments per document (also accepted as --max_segements, the released spelling)", default=10)
    segment_length: int = _help("words per segment; segments overlap by half", default=128)
    max_length: int = _help("at most this many tokens per segment (longer ones are truncated)", default=256)
    # --- the document memory ---
    document_memory: str = _help("keyed: one key per document (the method); shared: one memory, no keys, no guidance (baseline)", default="keyed")
    memory_module: str = _help("memory architecture (the released code has one: linear)", default="linear")
    key_dim: int = _help("numbers per document key (DocRep)", default=2)
    key_activation: str = _help("activation of the memory selection: tanh, relu, sigmoid, swiglu, or any transformers activation", default="tanh")
    hook_memory_dim: int = _help("number of memory entries m", default=32)
    hook_memory_layer: int = _help("0-based block whose output the memory rewrites", default=15)
    lm_act: str = _help("activation inside the memory", default="gelu")
    document_key_module_type: str = _help("key to selection map: linear, or nonlinear (an MLP)", default="linear")
    key_internal_dim: int = _help("width of the nonlinear key MLP", default=64)
    key_internal_activation: str = _help("activation of the nonlinear key MLP", default="relu")
    key_internal_layers: int = _help("linear layers in the nonlinear key MLP (>= 2)", default=2)
    learn_doc_keys: bool = _help("train the document keys too (fixed by default, as released)", default=False)
    # --- guidance ---
    negative_key_type: str = _help("negative key: other (another document's), random (normal), zero, perturb (own key + noise)", default="other")
    delta: float = _help("noise scale of --negative_key_type perturb, times max(k_i)", default=0.1)
    target_negative_ce: float = _help("tau: the cross-entropy the LM should keep under a negative key", default=4.5)
    guidance: float = _help("alpha: weight of the guidance term; 0 disables negatives", default=0.1)
    guidance_loss: str = _help("clamped_mse: min((CE_neg - tau)^2, CE_pos) (released); abs: |tau - CE_neg| (paper text)", default="clamped_mse")
    # --- optimisation ---
    batch_size: int = _help("segments per batch (a batch holds one document's segments)", default=16)
    lr: float = _help("AdamW learning rate", default=1e-3)
    num_accumulation_steps: int = _help("batches per optimizer step", default=1)
    grad_clip_coeff: float = _help("gradient-norm clipping (0 = off)", default=5.0)
    num_epochs: int = _help("passes over all documents", default=500)
    num_warmup_steps: int = _help("linear learning-rate warm-up steps", default=0)
    lr_scheduler: str = _help("learning-rate schedule after warm-up: constant, cosine, linear", default="constant")
    seed: int = _help("seed for article choice, keys, memory init and negatives", default=1)
    # --- speed ---
    reference_loop: bool = _help("compute the loss the literal way (two full hooked passes per step) instead of the prefix cache", default=False)
    cache_budget_gb: float = _help("memory allowed for the prefix cache on the LM's device (GiB); above it: pinned CPU, then recompute", default=8.0)
    # --- outputs ---
    save_dir: str = _help("runs are written to save_dir/run_N (N = first free number)", default="outputs/pythia/1b")
    save_freq: int = _help("write a summary (pictures, logit lens) every this many epochs", default=10)
    top_k_tokens: int = _help("tokens listed per document in the logit lens", default=20)

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_yaml(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        data = self.to_dict()
        if extra:
            data.update(extra)
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    @property
    def uses_keys(self) -> bool:
        return self.document_memory == "keyed"

    @property
    def guidance_active(self) -> bool:
        return self.uses_keys and self.guidance > 0

    def validate(self) -> "TrainConfig":
        """Checks that need no model or data; raises ConfigError on the first bad flag."""
        def choice(flag: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, flag) not in allowed:
                raise ConfigError(flag, getattr(self, flag), "allowed: " + ", ".join(allowed))

        def at_least(flag: str, low: float, strict: bool = False) -> None:
            value = getattr(self, flag)
            if value != value or (value <= low if strict else value < low):  # value != value: NaN
                raise ConfigError(flag, value, f"must be {'>' if strict else '>='} {low}")

        if self.lm_path is None:
            choice("lm_name", LM_NAMES)
            choice("lm_size", LM_SIZES[self.lm_name])
        choice("dataset", DATASETS)
        choice("precision", PRECISIONS)
        choice("document_memory", DOCUMENT_MEMORIES)
        choice("memory_module", MEMORY_MODULES)
        choice("document_key_module_type", MODULE_TYPES)
        choice("negative_key_type", NEGATIVE_KEY_TYPES)
        choice("guidance_loss", GUIDANCE_LOSSES)
        choice("lr_scheduler", LR_SCHEDULERS)
        key_acts = BUILTIN_KEY_ACTIVATIONS + activation_names()
        if self.key_activation not in key_acts:
            raise ConfigError("key_activation", self.key_activation, "allowed: " + ", ".join(sorted(set(key_acts))))
        for flag in ("lm_act", "key_internal_activation"):
            choice(flag, activation_names())
        for flag in ("max_labels", "max_segments", "segment_length", "max_length", "key_dim", "hook_memory_dim",
                     "key_internal_dim", "batch_size", "num_accumulation_steps", "num_epochs", "save_freq",
                     "top_k_tokens", "synthetic_articles"):
            at_least(flag, 1)
        at_least("key_internal_layers", 2)
        for flag in ("num_gpus", "num_warmup_steps", "hook_memory_layer"):
            at_least(flag, 0)
        at_least("lr", 0, strict=True)
        for flag in ("guidance", "grad_clip_coeff", "delta", "target_negative_ce", "cache_budget_gb"):
            at_least(flag, 0)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("device", self.device, "allowed: auto, cpu, cuda, cuda:N")
        if self.negative_key_type == "other" and self.guidance_active and self.max_labels < 2:
            raise ConfigError("max_labels", self.max_labels, "--negative_key_type other needs at least 2 documents")
        if self.data_path is not None and not Path(self.data_path).exists():
            raise ConfigError("data_path", self.data_path, "no such file or folder")
        if self.dataset == "synthetic" and self.max_labels > self.synthetic_articles:
            raise ConfigError("max_labels", self.max_labels, f"at most --synthetic_articles ({self.synthetic_articles})")
        return self


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_guidance.py",
        description="Train a document-wise memory with guidance on a frozen causal LM (Park & Choi, IJCAI 2024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    for f in fields(TrainConfig):
        flags = [f"--{f.name}"]
        if f.name == "max_segments":
            flags.append("--max_segements")  # the released (misspelt) flag
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": f.default, "dest": f.name}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type in ("int", int):
            kwargs["type"] = int
        elif f.type in ("float", float):
            kwargs["type"] = float
        elif f.name in ("lm_path", "lm_cache_dir", "data_path", "data_cache_dir"):
            kwargs["type"] = _none_if_none
        else:
            kwargs["type"] = str
        parser.add_argument(*flags, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> validated TrainConfig. argparse itself exits 2 on unknown flags and bad types."""
    namespace = build_parser().parse_args(argv)
    return TrainConfig(**vars(namespace)).validate()


def resolve_device(config: TrainConfig) -> str:
    import torch

    if config.num_gpus == 0:
        return "cpu"
    if config.device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return config.device


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback."""
    sys.stderr.write(f"train_guidance.py: error: {message}\n")
    raise SystemExit(code)

