"""Every setting of a training run: one typed, self-validating dataclass, and its command line.

`parse_args(argv)` builds the config from flags (every field is a flag with its default and a
one-line meaning, except the few the program sets itself, such as shard_index); `TrainConfig.validate()` checks it before any model or data loads and
raises `ConfigError` naming the flag, the value and what is allowed. With `--resume RUN_DIR`
the run's own saved config.yaml is used, and a flag given on the command line that differs
from it is an error (only the flags in RESUME_MAY_CHANGE may change).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from docmem.atomic import write_atomic
from docmem.cli import OneLineParser
from docmem.errors import ConfigError
from document_memories import BUILTIN_KEY_ACTIVATIONS, MEMORY_INITS, MODULE_TYPES, activation_names
from foundations.gguf_file import gguf_block_count, is_gguf_file
from foundations.registry import MODEL_SIZES, NUM_LAYERS
from wikitext import DATASETS

PROG = "train_guidance.py"

NEGATIVE_KEY_TYPES = ("other", "random", "zero", "perturb")
GUIDANCE_LOSSES = ("clamped_mse", "abs")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16_head")
LR_SCHEDULERS = ("constant", "cosine", "linear")
DOCUMENT_MEMORIES = ("keyed", "shared", "lora", "lora_shared")
LORA_MEMORIES = ("lora", "lora_shared")  # the baselines trained by peft (docmem/baselines/lora_memory.py)
MEMORY_MODULES = ("linear",)
# Flags that may differ from the saved config on --resume: they change neither the numbers nor
# the documents of the run (num_epochs extends it; detect_anomaly and cache_budget_gb are speed
# and debugging only).
RESUME_MAY_CHANGE = ("resume", "num_epochs", "detect_anomaly", "cache_budget_gb", "eval_at_end", "report_to",
                     "summary_process", "cuda_graphs")
REPORT_TO = ("none", "tensorboard")  # --report_to: docmem/training/tensorboard_log.py
SUMMARY_PROCESSES = ("auto", "on", "off")  # --summary_process: docmem/pictures/summary_drawing.py
CUDA_GRAPH_MODES = ("auto", "on", "off")  # --cuda_graphs: docmem/cuda_graphs.py
RUN_CONFIG_NAME = "config.yaml"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _none_if_none(value: str | None) -> str | None:
    # run.sh passes the released defaults literally, e.g. lm_cache_dir=none.
    return None if value is None or value.lower() in ("none", "") else value


def _flag(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _not_a_flag(text: str, **kw: Any) -> Any:
    """A field the program sets itself: in config.yaml, not on the command line nor in the flag table."""
    return field(metadata={"help": text, "flag": False}, **kw)


def flag_fields() -> list[Field]:
    """The TrainConfig fields that are command-line flags, in order."""
    return [f for f in fields(TrainConfig) if f.metadata.get("flag", True)]


@dataclass
class TrainConfig:
    # --- the language model ---
    lm_name: str = _flag("model family: " + ", ".join(MODEL_SIZES), default="pythia")
    lm_size: str = _flag("model size within the family (pythia: 70m..12b, llama2: 7b 13b, smollm2: 135m)", default="1b")
    lm_path: str | None = _flag("local folder, .gguf file or Hub id of any GPT-NeoX/Llama-like causal LM; overrides --lm_name/--lm_size", default=None)
    lm_cache_dir: str | None = _flag("Hugging Face cache folder for model weights ('none' = library default)", default=None)
    num_gpus: int = _flag("GPUs to split the LM's blocks over; 0 = CPU", default=1)
    device: str = _flag("device for a single-device run: auto (cuda:0 if available, else cpu), cpu, cuda, cuda:N", default="auto")
    precision: str = _flag("LM weight dtype: auto (bf16 on CUDA; on a CPU bf16_head when it has native bf16 (AMX or "
                           "AVX512-BF16, detected at run time), else fp32), fp32, bf16, fp16, or bf16_head (the LM in fp32, "
                           "only the vocabulary head's products in bf16); the memory stays fp32. config.yaml records the "
                           "choice and why. The released code trains in fp32: --precision fp32 gives its numerics", default="auto")
    # --- data ---
    dataset: str = _flag("WikiText config of EleutherAI/wikitext_document_level, or 'synthetic' (fictional articles, offline)", default="wikitext-103-v1")
    data_split: str = _flag("dataset split to draw articles from", default="train")
    data_path: str | None = _flag("local copy: a folder in the wikitext_document_level layout, a parquet file, or a WikiText text file", default=None)
    data_cache_dir: str | None = _flag("Hugging Face cache folder for datasets ('none' = library default)", default=None)
    synthetic_articles: int = _flag("how many fictional articles --dataset synthetic generates to draw from", default=100)
    max_labels: int = _flag("number of articles to draw with --seed, as released: NumPy RandomState(seed).choice over "
                            "all articles, trained in draw order; drawn articles without a segment are dropped", default=10)
    max_segments: int = _flag("at most this many segments per document (also accepted as --max_segements, the released spelling)", default=10)
    segment_length: int = _flag("words per segment; segments overlap by half; a shorter article is one segment", default=128)
    max_length: int = _flag("at most this many tokens per segment (longer ones are truncated)", default=256)
    # --- the document memory ---
    document_memory: str = _flag("keyed: one key per document (the method); shared: one memory, no keys, no guidance (baseline); "
                                 "lora: one LoRA adapter per document (peft; the adapter is the key), LM loss only; "
                                 "lora_shared: one LoRA adapter for all documents", default="keyed")
    memory_module: str = _flag("memory architecture (the released code has one: linear)", default="linear")
    key_dim: int = _flag("numbers per document key (DocRep)", default=2)
    key_activation: str = _flag("activation of the memory selection: tanh, relu, sigmoid, swiglu, or any transformers activation", default="tanh")
    hook_memory_dim: int = _flag("number of memory entries m", default=32)
    hook_memory_layer: int = _flag("0-based block whose output the memory rewrites", default=15)
    lm_act: str = _flag("activation inside the memory", default="gelu")
    document_key_module_type: str = _flag("key to selection map: linear, or nonlinear (an MLP)", default="linear")
    key_internal_dim: int = _flag("width of the nonlinear key MLP", default=64)
    key_internal_activation: str = _flag("activation of the nonlinear key MLP", default="relu")
    key_internal_layers: int = _flag("depth of the nonlinear key MLP, as the released make_mlp: 1 = one linear map; "
                                     "L >= 2 = L + 1 linear layers (input, L - 1 hidden-to-hidden, output)", default=2)
    learn_doc_keys: bool = _flag("train the document keys too (fixed by default, as released)", default=False)
    memory_init: str = _flag("released: every memory layer orthogonal, as released (a fresh memory changes the LM's "
                             "output); zero_output: W_out and b_out start at zero, so training starts from the plain LM "
                             "(with an --lm_act whose value at 0 is 0, e.g. gelu)", default="released")
    lora_rank: int = _flag("--document_memory lora/lora_shared: the adapters' rank; 0 = auto: the rank whose total "
                           "trainable parameters come closest to the keyed memory's at the same settings", default=0)
    lora_targets: str = _flag("--document_memory lora/lora_shared: the modules of block --hook_memory_layer that get "
                              "adapters: mlp (its MLP projections), attention, all, or comma-separated names within "
                              "the block (e.g. mlp.down_proj)", default="mlp")
    # --- sharding and forgetting (docmem/sharding.py) ---
    memory_shards: int = _flag("split the documents into this many isolated shards (SISA), by position in the draw: each "
                               "its own memory, keys, optimizer and random stream; 1 = one memory", default=1)
    exclude_docs: str | None = _flag("comma-separated draw positions (0-based) of documents to leave out; every other "
                                     "document keeps its shard and key (a run 'never trained on' them)", default=None)
    shard_index: int = _not_a_flag("the shard a sharded run's sub-run trains (docmem/training/shard_runs.py sets it); "
                                   "-1 = the whole run", default=-1)
    # --- guidance ---
    negative_key_type: str = _flag("negative key: other (another document's), random (normal), zero, perturb (own key + noise)", default="other")
    delta: float = _flag("noise scale of --negative_key_type perturb, times max(k_i)", default=0.1)
    target_negative_ce: float = _flag("tau: the cross-entropy the LM should keep under a negative key", default=4.5)
    guidance: float = _flag("alpha: weight of the guidance term; 0 disables negatives", default=0.1)
    guidance_loss: str = _flag("clamped_mse: min((CE_neg - tau)^2, CE_pos) (released); abs: |tau - CE_neg| (paper text)", default="clamped_mse")
    # --- optimisation ---
    batch_size: int = _flag("segments per batch (a batch holds one document's segments)", default=16)
    lr: float = _flag("AdamW learning rate", default=1e-3)
    num_accumulation_steps: int = _flag("batches per optimizer step (each batch's whole loss is divided by it; a partial "
                                        "accumulation is applied at the end of each epoch)", default=1)
    grad_clip_coeff: float = _flag("gradient-norm clipping (0 = off)", default=5.0)
    num_epochs: int = _flag("passes over all documents", default=500)
    num_warmup_steps: int = _flag("linear learning-rate warm-up steps", default=0)
    lr_scheduler: str = _flag("learning-rate schedule after warm-up: constant, cosine, linear", default="constant")
    seed: int = _flag("seed for article choice (NumPy, as released; < 2**32), keys, memory init and negatives", default=1)
    # --- speed ---
    reference_loop: bool = _flag("compute the loss the literal way (two full hooked passes per step) instead of the prefix cache", default=False)
    cache_budget_gb: float = _flag("memory allowed for the prefix cache on the LM's device (GiB); above it: pinned CPU, then recompute", default=8.0)
    docs_per_step: int = _flag("documents per optimizer step, each row with its own key and negative (1 = the released order); "
                               "under torchrun, per process", default=1)
    cuda_graphs: str = _flag("capture each batch's training step in a CUDA graph and replay it (the host launches one "
                             "graph instead of each kernel): auto (on for a CUDA run of the fast path that can be "
                             "captured, else off), on (refused in one line where it cannot be), off", default="auto")
    # --- outputs ---
    save_dir: str = _flag("runs are written to save_dir/run_N (N = first free number)", default="outputs/pythia/1b")
    save_freq: int = _flag("write a summary (pictures, logit lens) and a checkpoint every this many epochs", default=10)
    summary_process: str = _flag("draw each summary's pictures in a helper process while training goes on: auto (when the "
                                 "memory trains on a GPU), on, off (in the training process, which waits)", default="auto")
    top_k_tokens: int = _flag("tokens listed per document in the logit lens", default=20)
    l0_threshold: float = _flag("a memory entry counts as selected (L0) when |s_i| exceeds this", default=1e-2)
    eval_at_end: bool = _flag("run evaluate_memory.py's measurements (recall, CE matrix, landscape) when training ends",
                              default=False)
    report_to: str = _flag("also log losses, selection statistics and selection heatmaps to: none, tensorboard "
                           "(run_N/tensorboard/; needs the optional tensorboard package)", default="none")
    resume: str | None = _flag("continue the interrupted run in this folder (save_dir/run_N) from its checkpoint, "
                               "with its own config.yaml; only --num_epochs (to extend it), --detect_anomaly, "
                               "--cache_budget_gb, --eval_at_end, --report_to and --summary_process may be given "
                               "differently", default=None)
    # --- debugging ---
    detect_anomaly: bool = _flag("torch.autograd anomaly detection: name the operation whose backward gives NaN (slow)",
                                 default=False)

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_yaml(self, extra: dict[str, Any] | None = None) -> str:
        """config.yaml's text: every field, then `extra` sections (a run adds resolved and documents)."""
        return yaml.safe_dump({**self.to_dict(), **(extra or {})}, sort_keys=False, allow_unicode=True)

    def save_yaml(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        write_atomic(path, self.to_yaml(extra))

    @property
    def uses_keys(self) -> bool:
        return self.document_memory == "keyed"

    @property
    def uses_lora(self) -> bool:
        return self.document_memory in LORA_MEMORIES

    @property
    def guidance_active(self) -> bool:
        return self.uses_keys and self.guidance > 0

    @property
    def train_seed(self) -> int:
        """The seed of the memory's initialisation and of the negatives: --seed, or one per shard of a sharded run."""
        return self.seed if self.shard_index < 0 else self.seed + 1_000_003 * (self.shard_index + 1)

    def excluded_positions(self) -> list[int]:
        """--exclude_docs as sorted draw positions ([] when not given)."""
        if not self.exclude_docs:
            return []
        try:
            positions = sorted({int(p) for p in self.exclude_docs.split(",") if p.strip()})
        except ValueError as err:
            raise ConfigError("exclude_docs", self.exclude_docs, "must be comma-separated draw positions, e.g. 0,3") from err
        if any(p < 0 or p >= self.max_labels for p in positions):
            raise ConfigError("exclude_docs", self.exclude_docs, f"positions must lie in 0..{self.max_labels - 1}")
        return positions

    def validate(self) -> TrainConfig:
        """Checks that need no model or data; raises ConfigError on the first bad flag.

        Reads nothing bigger than a model folder's config.json, and writes nothing."""
        self._check_types()
        self._check_choices()
        self._check_ranges()
        self._check_lora()
        self._check_sharding()
        self._check_processes()
        self._check_data()
        self._check_model()
        _check_writable("save_dir", self.save_dir)
        if self.resume is not None:
            _check_run_dir(self.resume)
        return self

    def _check_choices(self) -> None:
        """The flags that name one of a fixed set: model, data, memory, guidance, schedule, outputs."""
        if self.lm_path is None:
            _choice(self, "lm_name", tuple(MODEL_SIZES))
            _choice(self, "lm_size", MODEL_SIZES[self.lm_name])
        for flag, allowed in (("dataset", DATASETS), ("precision", PRECISIONS), ("document_memory", DOCUMENT_MEMORIES),
                              ("memory_module", MEMORY_MODULES), ("memory_init", MEMORY_INITS),
                              ("document_key_module_type", MODULE_TYPES), ("negative_key_type", NEGATIVE_KEY_TYPES),
                              ("guidance_loss", GUIDANCE_LOSSES), ("lr_scheduler", LR_SCHEDULERS),
                              ("report_to", REPORT_TO), ("summary_process", SUMMARY_PROCESSES),
                              ("cuda_graphs", CUDA_GRAPH_MODES)):
            _choice(self, flag, allowed)
        if self.report_to == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("report_to", self.report_to, "the tensorboard package is not installed "
                                                               "(pip install tensorboard), or use --report_to none")
        key_acts = BUILTIN_KEY_ACTIVATIONS + activation_names()
        if self.key_activation not in key_acts:
            raise ConfigError("key_activation", self.key_activation, "allowed: " + ", ".join(sorted(set(key_acts))))
        for flag in ("lm_act", "key_internal_activation"):
            _choice(self, flag, activation_names())

    def _check_ranges(self) -> None:
        """The numbers: counts, sizes, rates and weights within their bounds."""
        for flag in ("max_labels", "max_segments", "segment_length", "max_length", "key_dim", "hook_memory_dim",
                     "key_internal_dim", "batch_size", "num_accumulation_steps", "num_epochs", "save_freq",
                     "top_k_tokens", "synthetic_articles", "docs_per_step"):
            _at_least(self, flag, 1)
        _at_least(self, "key_internal_layers", 1)
        for flag in ("num_gpus", "num_warmup_steps", "hook_memory_layer", "seed"):
            _at_least(self, flag, 0)
        if self.seed >= 2**32:  # the documents are drawn with NumPy's generator, as released
            raise ConfigError("seed", self.seed, "must be < 2**32 (NumPy's seed range)")
        _at_least(self, "lr", 0, strict=True)
        for flag in ("guidance", "grad_clip_coeff", "delta", "target_negative_ce", "cache_budget_gb", "l0_threshold"):
            _at_least(self, flag, 0)
        if self.docs_per_step > self.max_labels:
            raise ConfigError("docs_per_step", self.docs_per_step, f"at most --max_labels ({self.max_labels})")

    def _check_lora(self) -> None:
        """The LoRA baselines: their rank, and what they cannot do (resume, torchrun, the reference loop)."""
        if self.lora_rank < 0:
            raise ConfigError("lora_rank", self.lora_rank, "must be >= 1 (or 0: auto, matched to the keyed memory)")
        if self.uses_lora:
            if self.resume is not None:
                raise ConfigError("resume", self.resume, "a LoRA baseline run cannot be resumed: start it again")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("document_memory", self.document_memory, "LoRA baselines run in one process "
                                                                           "(not under torchrun)")
            if self.reference_loop:
                raise ConfigError("reference_loop", True, "not used by LoRA baselines (they run the fast path)")

    def _check_sharding(self) -> None:
        """--memory_shards, the shard a sub-run trains, and --exclude_docs."""
        if self.memory_shards < 1 or self.memory_shards > self.max_labels:
            raise ConfigError("memory_shards", self.memory_shards, f"must lie in 1..--max_labels ({self.max_labels})")
        if self.memory_shards > 1 and not self.uses_keys:
            raise ConfigError("memory_shards", self.memory_shards, "a shared memory (no keys) cannot be sharded: "
                                                                   "use --document_memory keyed")
        if not -1 <= self.shard_index < self.memory_shards:
            raise ConfigError("shard_index", self.shard_index, f"allowed: -1..{self.memory_shards - 1}")
        if len(self.excluded_positions()) >= self.max_labels:
            raise ConfigError("exclude_docs", self.exclude_docs, "leaves no document to train on")

    def _check_processes(self) -> None:
        """What torchrun allows, and the device."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
            if self.reference_loop:
                raise ConfigError("reference_loop", True, "not available under torchrun (it runs the memory twice "
                                                          "per step); use the default fast path")
            if self.resume is not None:
                raise ConfigError("resume", self.resume, "resuming under torchrun is not supported yet")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError("device", self.device, "allowed: auto, cpu, cuda, cuda:N")
        if self.device.startswith("cuda") and self.num_gpus > 0:
            if not torch.cuda.is_available():
                raise ConfigError("device", self.device, "CUDA is not available here: use --device auto or cpu, "
                                                         "or --num_gpus 0")

    def _check_data(self) -> None:
        """The split, enough documents for the negatives, and where the articles come from."""
        if not self.data_split.strip():
            raise ConfigError("data_split", self.data_split, "must name a split, e.g. train")
        if self.negative_key_type == "other" and self.guidance_active and self.max_labels < 2:
            raise ConfigError("max_labels", self.max_labels, "--negative_key_type other needs at least 2 documents")
        if self.dataset == "synthetic":
            if self.data_path is not None:
                raise ConfigError("data_path", self.data_path, "not used with --dataset synthetic (its articles are "
                                                               "generated); leave it out")
            if self.max_labels > self.synthetic_articles:
                raise ConfigError("max_labels", self.max_labels,
                                  f"at most --synthetic_articles ({self.synthetic_articles})")
        if self.data_path is not None and not Path(self.data_path).expanduser().exists():
            raise ConfigError("data_path", self.data_path, "no such file or folder")

    def _check_model(self) -> None:
        """--hook_memory_layer within the model's blocks (a named model's, or --lm_path's)."""
        if self.lm_path is None:
            blocks = NUM_LAYERS[self.lm_name][self.lm_size]
            if self.hook_memory_layer >= blocks:
                raise ConfigError("hook_memory_layer", self.hook_memory_layer,
                                  f"{self.lm_name}-{self.lm_size} has blocks 0..{blocks - 1}")
        else:
            self._check_lm_path()

    def _check_types(self) -> None:
        """Every field has its declared type (flags are typed by argparse; a config.yaml may not be)."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, str) and (value != "" or "None" in kind)
            if not ok:
                raise ConfigError(f.name, value, f"must be {'a non-empty string' if kind.startswith('str') else kind}")

    def _check_lm_path(self) -> None:
        """A local model folder needs a config.json; its block count bounds --hook_memory_layer.
        Anything else must look like a Hub id (owner/name), checked when it downloads."""
        path = Path(self.lm_path).expanduser()
        if path.is_file() and is_gguf_file(path):
            try:
                blocks = gguf_block_count(path)
            except ValueError as err:
                raise ConfigError("lm_path", self.lm_path, str(err)) from err
            if blocks is not None and self.hook_memory_layer >= blocks:
                raise ConfigError("hook_memory_layer", self.hook_memory_layer,
                                  f"the model in {self.lm_path} has blocks 0..{blocks - 1}")
        elif path.is_dir():
            config_file = path / "config.json"
            if not config_file.is_file():
                raise ConfigError("lm_path", self.lm_path, "the folder holds no config.json: save a causal LM there "
                                                           "with save_pretrained()")
            try:
                model_config = json.loads(config_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ConfigError("lm_path", self.lm_path, f"unreadable {config_file} ({err})") from err
            blocks = _num_blocks(model_config)
            if blocks is not None and self.hook_memory_layer >= blocks:
                raise ConfigError("hook_memory_layer", self.hook_memory_layer,
                                  f"the model in {self.lm_path} has blocks 0..{blocks - 1}")
        elif path.exists() or self.lm_path.startswith(("/", ".", "~")) or self.lm_path.count("/") > 1:
            raise ConfigError("lm_path", self.lm_path, "no such folder or .gguf file (nor a Hub id like owner/name)")


def _choice(config: TrainConfig, flag: str, allowed: tuple[str, ...]) -> None:
    if getattr(config, flag) not in allowed:
        raise ConfigError(flag, getattr(config, flag), "allowed: " + ", ".join(allowed))


def _at_least(config: TrainConfig, flag: str, low: float, strict: bool = False) -> None:
    value = getattr(config, flag)
    finite = isinstance(value, int) or math.isfinite(value)  # (a huge int overflows isfinite)
    if not finite or (value <= low if strict else value < low):
        raise ConfigError(flag, value, f"must be a finite number {'>' if strict else '>='} {low}")


def _num_blocks(model_config: object) -> int | None:
    """The block count a transformers config.json declares, if it declares one."""
    if not isinstance(model_config, dict):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    text_config = model_config.get("text_config")
    return _num_blocks(text_config) if text_config is not None else None


def _check_writable(flag: str, folder: str) -> None:
    """The folder, or the nearest existing folder above it, can take new files (nothing is written)."""
    path = Path(folder).expanduser()
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(flag, folder, f"{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(flag, folder, f"{probe} is not writable")


def _check_run_dir(run_dir: str) -> None:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise ConfigError("resume", run_dir, "no such run folder (give save_dir/run_N of an earlier run)")
    if not (path / RUN_CONFIG_NAME).is_file():
        raise ConfigError("resume", run_dir, f"not a run folder: it has no {RUN_CONFIG_NAME}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("resume", run_dir, "the run folder is not writable")


def load_run_config(run_dir: str | Path, flag: str = "resume") -> tuple[TrainConfig, dict[str, Any]]:
    """The TrainConfig saved in run_dir/config.yaml (checked), and the whole file as a dict.
    A missing or bad file is a ConfigError naming `flag` (the option that gave run_dir)."""
    path = Path(run_dir).expanduser() / RUN_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(flag, str(run_dir), f"no {RUN_CONFIG_NAME} (not a run folder written by train_guidance.py)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        message = " ".join(str(err).split())
        raise ConfigError(flag, str(run_dir), f"unreadable {path} ({message})") from err
    if not isinstance(data, dict):
        raise ConfigError(flag, str(run_dir), f"{path} does not hold a run config")
    try:
        saved = TrainConfig.from_dict(data)
        saved._check_types()
    except (TypeError, ConfigError) as err:
        raise ConfigError(flag, str(run_dir), f"{path} holds an invalid config ({err})") from err
    return saved, data


def resume_config(given: TrainConfig, explicit: set[str] | None = None) -> TrainConfig:
    """The config of a resumed run: its saved config.yaml, with the changes RESUME_MAY_CHANGE allows.

    `explicit` holds the flags given on the command line: each of them must equal the saved value
    (or be one that may change). None (a config built in Python) compares every field."""
    if given.resume is None:
        raise ValueError("resume_config needs a config with resume set")
    _check_run_dir(given.resume)
    saved, _ = load_run_config(given.resume)
    names = {f.name for f in fields(TrainConfig)} if explicit is None else set(explicit)
    for name in sorted(names - set(RESUME_MAY_CHANGE)):
        if getattr(given, name) != getattr(saved, name):
            raise ConfigError(name, getattr(given, name),
                              f"the run in {given.resume} was started with {getattr(saved, name)!r}, and a resumed "
                              f"run keeps its config (only --{', --'.join(RESUME_MAY_CHANGE[1:])} may change)")
    changes = {name: getattr(given, name) for name in RESUME_MAY_CHANGE if name in names}
    changes["resume"] = given.resume
    return replace(saved, **changes).validate()


def build_parser(explicit_only: bool = False) -> argparse.ArgumentParser:
    """The command line. explicit_only: no defaults, so parsing gives only the flags actually given."""
    parser = OneLineParser(
        prog=PROG,
        description="Train a document-wise memory with guidance on a frozen causal LM (Park & Choi, IJCAI 2024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    for f in flag_fields():
        flags = [f"--{f.name}"]
        if f.name == "max_segments":
            flags.append("--max_segements")  # the released (misspelt) flag
        default = argparse.SUPPRESS if explicit_only else f.default
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": default, "dest": f.name}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type in ("int", int):
            kwargs["type"] = int
        elif f.type in ("float", float):
            kwargs["type"] = float
        elif f.name in ("lm_path", "lm_cache_dir", "data_path", "data_cache_dir", "resume"):
            kwargs["type"] = _none_if_none
        else:
            kwargs["type"] = str
        parser.add_argument(*flags, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> validated TrainConfig. Unknown flags and bad types exit 2 with one stderr line.

    With --resume: the run's saved config, checked against the flags given (resume_config)."""
    namespace = build_parser().parse_args(argv)
    config = TrainConfig(**vars(namespace))
    if config.resume is None:
        return config.validate()
    explicit = set(vars(build_parser(explicit_only=True).parse_args(argv)))
    return resume_config(config, explicit)


def flags_markdown() -> str:
    """docs/usage.md's table of flags, made from the config itself (a test keeps them in step)."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in flag_fields():
        name = f"`--{f.name}`" + (" (`--max_segements`)" if f.name == "max_segments" else "")
        meaning = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| {name} | `{f.default}` | {meaning} |")
    return "\n".join(rows) + "\n"
