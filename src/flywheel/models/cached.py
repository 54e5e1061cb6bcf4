"""Is a preset already on this machine? Read from the Hugging Face cache alone, never the network.

A hub preset is downloaded when the ``main`` snapshot in the HF cache (``hub.hub_cache_dir()``, where
``download.snapshot`` puts it) holds every file its loader reads: the layout file, then for a diffusers repo
each component folder ``model_index.json`` names, with its config and, for a model component, its weight
files (every shard its ``*.index.json`` lists); for a transformers repo the root safetensors. A preset's hub
LoRAs must be cached too. A tiny preset is "built" once its folder in ``$FLYWHEEL_CACHE`` is complete.
"""

from __future__ import annotations

import os
from pathlib import Path

from flywheel.models.hub import diffusers_components, hub_cache_dir, read_json, weight_files
from flywheel.models.presets import TINY_VERSION, Preset

YES, PARTLY, NO, BUILT = "yes", "partly", "no", "built"


def download_state(preset: Preset) -> str:
    """``yes`` / ``partly`` / ``no`` for a hub preset, ``built`` / ``no`` for a tiny one."""
    if preset.tiny is not None:
        root = Path(os.environ.get("FLYWHEEL_CACHE") or "~/.cache/flywheel").expanduser() / "tiny"
        return BUILT if (root / f"{preset.name}-{TINY_VERSION}" / ".complete").exists() else NO
    assert preset.hub_id is not None
    folder = snapshot_folder(preset.hub_id)
    loras = [_cached_file(lo["hub"], lo["weight"]) for lo in preset.settings.get("loras", []) if lo.get("hub")]
    if folder is None:
        return PARTLY if any(loras) else NO
    return YES if _complete(folder) and all(loras) else PARTLY


def snapshot_folder(repo_id: str) -> Path | None:
    """The cached ``main`` snapshot of ``repo_id``, if the cache has one (huggingface_hub's cache layout)."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def _cached_file(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub_cache_dir()))
    return isinstance(found, str)  # a path; None or _CACHED_NO_EXIST otherwise


def _complete(folder: Path) -> bool:
    index = folder / "model_index.json"
    if index.is_file():
        return all(_component_complete(folder / name) for name in diffusers_components(read_json(index)))
    return (folder / "config.json").is_file() and _shards_complete(folder)


def _component_complete(folder: Path) -> bool:
    """A scheduler or tokenizer needs its files; a model component (it has config.json) its weights too."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return False
    return not (folder / "config.json").is_file() or _shards_complete(folder)


def _shards_complete(folder: Path) -> bool:
    """The folder has the weights its loader reads, and every shard its safetensors index lists."""
    if not weight_files(folder):
        return False
    for index in folder.glob("*.safetensors.index.json"):
        shards = set(read_json(index).get("weight_map", {}).values())
        if not all((folder / shard).is_file() for shard in shards):
            return False
    return True
