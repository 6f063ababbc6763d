"""The document memory: a small trainable module on the output of one frozen LM block.

For a hidden state x (batch x tokens x d) and a document key k (key_dim numbers):

    a = act(W_up x + b_up)              token side: which of the m entries the token wants
    s = key_act(W_gate k + b_gate)      document side: the document's memory selection
    y = x + act(W_out (W_down (a * s) + b_down) + b_out)

With no key the `* s` factor is left out and the module is one shared memory.
The non-linear variant replaces W_gate by an MLP (the released make_mlp). Keys are the rows of an orthogonally
initialised (num_docs x key_dim) matrix, fixed by default (the released code) or trainable.

Saved as `memory.safetensors` + `memory_config.json` (never pickle). The JSON also holds, when
the trainer gives it, a `provenance` block (base model, hooked block, documents, precision, project
version) and the SHA-256 of the weights file, checked on load; older files without them still load.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.activations import ACT2FN

from docmem.atomic import whole_folder
from docmem.errors import MemoryFileError

MODULE_TYPES = ("linear", "nonlinear")
# released: every linear layer orthogonal (gain sqrt 2), as released; zero_output: W_out and b_out start at
# zero, so with act(0) = 0 (gelu, relu, tanh, silu) the hooked LM starts as the plain LM (LoRA's B = 0)
MEMORY_INITS = ("released", "zero_output")
BUILTIN_KEY_ACTIVATIONS = ("tanh", "relu", "sigmoid", "swiglu")
WEIGHTS_NAME = "memory.safetensors"
CONFIG_NAME = "memory_config.json"
PROVENANCE_FIELD, CHECKSUM_FIELD = "provenance", "weights_sha256"  # beside MemoryConfig's fields in the JSON


def activation_names() -> tuple[str, ...]:
    """Every activation name accepted for --lm_act / --key_activation (swiglu only for keys)."""
    return tuple(sorted(set(ACT2FN.keys()) | {"tanh", "relu", "sigmoid"}))


def get_activation(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "relu":
        return nn.ReLU()
    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(activation_names())}")
    return ACT2FN[name]


class SwiGLU(nn.Module):
    """first half * silu(second half), the released split: the gate emits 2m numbers for m entries,
    and its weights are interchangeable with the released module's."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        value, gate = z.chunk(2, dim=-1)
        return value * nn.functional.silu(gate)


def key_mlp(key_dim: int, num_layers: int, width: int, activation: str, out_features: int) -> nn.Module:
    """The released make_mlp: num_layers 1 is one linear map key_dim -> out_features; num_layers L >= 2
    is L + 1 linear layers (key_dim -> width, L - 1 of width -> width, width -> out_features) with
    the activation after every one but the last."""
    if num_layers < 1:
        raise ValueError(f"--key_internal_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        return nn.Linear(key_dim, out_features)
    layers: list[nn.Module] = [nn.Linear(key_dim, width), get_activation(activation)]
    for _ in range(num_layers - 1):
        layers += [nn.Linear(width, width), get_activation(activation)]
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


@dataclass
class MemoryConfig:
    hidden_size: int
    num_docs: int
    memory_dim: int = 32
    key_dim: int = 2
    key_activation: str = "tanh"
    lm_act: str = "gelu"
    module_type: str = "linear"
    key_internal_dim: int = 64
    key_internal_layers: int = 2
    key_internal_activation: str = "relu"
    learn_doc_keys: bool = False
    use_keys: bool = True  # False: a shared memory, trained without keys (the paper's baseline)
    forgotten_directions: int = 0  # rows of `forget_basis`: selection directions projected out (forgetting)
    init: str = "released"  # MEMORY_INITS: how a new memory's weights start (a loaded one takes its file's)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_docs", "memory_dim", "key_dim", "key_internal_dim", "key_internal_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.forgotten_directions, int) or self.forgotten_directions < 0:
            raise ValueError(f"MemoryConfig.forgotten_directions must be >= 0, got {self.forgotten_directions!r}")
        if self.init not in MEMORY_INITS:
            raise ValueError(f"init must be one of {MEMORY_INITS}, got {self.init!r}")
        if self.module_type not in MODULE_TYPES:
            raise ValueError(f"module_type must be one of {MODULE_TYPES}, got {self.module_type!r}")
        if self.key_activation != "swiglu":
            get_activation(self.key_activation)
        get_activation(self.lm_act)
        get_activation(self.key_internal_activation)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown memory config fields: {sorted(unknown)}")
        return cls(**data)


def _orthogonal_(layer: nn.Linear) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
    nn.init.zeros_(layer.bias)
    return layer


def one_per_row(keys: torch.Tensor, rows: int) -> torch.Tensor:
    """Keys (or their selections) for a batch of `rows` rows: one (k,) for every row, or (n, k) with n
    dividing rows, each repeated for rows // n consecutive rows (generate() may expand the batch:
    several sequences per prompt). Any other count is a ValueError."""
    if keys.dim() == 1:
        keys = keys.unsqueeze(0)
    if keys.shape[0] == rows:
        return keys
    if keys.shape[0] == 0 or rows % keys.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys for a batch of {rows} rows")
    return keys.repeat_interleave(rows // keys.shape[0], dim=0)


class DocumentMemory(nn.Module):
    def __init__(self, config: MemoryConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        # Building the layers draws on the global RNG (default init); fork it, since
        # reset_parameters sets every value anyway.
        with torch.random.fork_rng(devices=[]):
            self.config = config
            d, m = config.hidden_size, config.memory_dim
            self.act = get_activation(config.lm_act)
            self.up = nn.Linear(d, m)
            self.down = nn.Linear(m, d)
            self.out = nn.Linear(d, d)
            gate_out = 2 * m if config.key_activation == "swiglu" else m
            if config.module_type == "linear":
                self.gate: nn.Module = nn.Linear(config.key_dim, gate_out)
            else:
                self.gate = key_mlp(config.key_dim, config.key_internal_layers, config.key_internal_dim,
                                    config.key_internal_activation, gate_out)
            self.key_act = SwiGLU() if config.key_activation == "swiglu" else get_activation(config.key_activation)
            # The documents' keys (DocReps); fixed unless learn_doc_keys.
            self.doc_keys = nn.Parameter(torch.empty(config.num_docs, config.key_dim), requires_grad=config.learn_doc_keys)
            if config.forgotten_directions:  # orthonormal rows; only a memory edited by forgetting has them
                self.register_buffer("forget_basis", torch.zeros(config.forgotten_directions, m))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # nn.init draws from the global RNG: with a generator, fork it so the result is fixed by
        # the generator and the caller's random stream is left alone.
        if generator is None:
            self._init_weights()
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _orthogonal_(module)
        nn.init.orthogonal_(self.doc_keys, gain=math.sqrt(2))
        if self.config.init == "zero_output":  # drawn above all the same: the other weights match the released init
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def selection(self, keys: torch.Tensor) -> torch.Tensor:
        """s = key_act(gate(k)): (..., key_dim) -> (..., m), minus its part along forgotten directions."""
        s = self.key_act(self.gate(keys.to(self.doc_keys.dtype)))
        if self.config.forgotten_directions:
            s = s - (s @ self.forget_basis.T) @ self.forget_basis
        return s

    def keys_for(self, doc_ids: torch.Tensor | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(doc_ids, dtype=torch.long, device=self.doc_keys.device)
        return self.doc_keys[ids]

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, d). keys: None, (key_dim,) for every row, or (B, key_dim), one per row."""
        dtype = x.dtype
        h = x.to(self.up.weight.dtype)
        a = self.act(self.up(h))
        if keys is not None and self.config.use_keys:
            s = one_per_row(self.selection(keys.to(h.device)), a.shape[0])
            a = a * s.unsqueeze(1).to(a.dtype)
        y = h + self.act(self.out(self.down(a)))
        return y.to(dtype)

    def readout(self, keys: torch.Tensor | None = None) -> torch.Tensor:
        """What the memory adds when every entry is fully wanted (a = 1): (n, d).

        The logit lens projects this to the vocabulary (the released code fed the key itself
        into W_down, which only works when key_dim == m)."""
        if keys is None or not self.config.use_keys:
            s = torch.ones(1, self.config.memory_dim, device=self.doc_keys.device)
        else:
            s = self.selection(keys)
        return self.act(self.out(self.down(s)))

    # ---- saving and loading: safetensors + JSON, no pickle -------------------------------

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """Weights + JSON config (+ provenance and the weights' checksum)."""
        directory = Path(directory)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.state_dict().items()}
        with whole_folder(directory) as tmp:  # the folder appears complete, or stays as it was
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            data = self.config.to_dict()
            if provenance is not None:
                data[PROVENANCE_FIELD] = provenance
            data[CHECKSUM_FIELD] = file_sha256(tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return directory


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_memory_json(directory: str | Path) -> dict:
    """memory_config.json as a dict (MemoryConfig fields, and provenance/checksum when written)."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise MemoryFileError(f"{config_path}: file not found")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MemoryFileError(f"{config_path}: invalid memory config ({err})") from err
    if not isinstance(data, dict):
        raise MemoryFileError(f"{config_path}: invalid memory config (not a JSON object)")
    return data


def load_memory(directory: str | Path, device: str | torch.device = "cpu",
                expect_hidden_size: int | None = None, expect_num_docs: int | None = None) -> DocumentMemory:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MemoryFileError(f"{path}: file not found")
    data = read_memory_json(directory)
    data.pop(PROVENANCE_FIELD, None)
    checksum = data.pop(CHECKSUM_FIELD, None)
    try:
        config = MemoryConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise MemoryFileError(f"{config_path}: invalid memory config ({err})") from err
    if expect_hidden_size is not None and config.hidden_size != expect_hidden_size:
        raise MemoryFileError(f"{config_path}: hidden_size {config.hidden_size} does not match the LM's {expect_hidden_size}")
    if expect_num_docs is not None and config.num_docs != expect_num_docs:
        raise MemoryFileError(f"{config_path}: num_docs {config.num_docs} does not match {expect_num_docs} documents")
    memory = DocumentMemory(config)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise MemoryFileError(f"{weights_path}: unreadable safetensors file ({err})") from err
    expected = memory.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MemoryFileError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise MemoryFileError(f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name].shape)}")
    # last: a file that fails the checks above gets the more precise message
    if checksum is not None and file_sha256(weights_path) != checksum:
        raise MemoryFileError(f"{weights_path}: SHA-256 differs from the one in {CONFIG_NAME} (corrupt or replaced)")
    memory.load_state_dict(state)
    return memory.to(device)
