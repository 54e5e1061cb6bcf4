"""Find model weights (local folder or Hugging Face hub id), offline-aware, safetensors only.

Every failure here is one error that tells the user what to run: the model, the folder that was
searched and the ``hf download`` command; or, for memory, the figure needed and the options
(downloading itself and its errors: ``flywheel.models.download``). Downloads fetch only what the
loaders read (``allow_patterns``): for a diffusers repo, model_index.json and the component folders it
names, never the single-file checkpoints some repos keep at their root (FLUX.1-dev's
``flux1-dev.safetensors`` and ``ae.safetensors``: ~24 GB nobody here loads).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import InsufficientMemoryError, ModelLoadError, ModelNotFoundError, NoGPUError

log = logging.getLogger(__name__)

# A transformers repo (config.json at the root): configs, tokenizers and safetensors weights, never pickles.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# In each component folder of a diffusers repo: configs and tokenizer files, and the weight files
# diffusers' loader reads without a variant (its non-variant names in ``variant_compatible_siblings``):
# ``diffusion_pytorch_model`` for diffusers models, ``model`` for transformers ones, whole or sharded.
_COMPONENT_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken",
                    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-?????-of-?????.safetensors",
                    "model.safetensors", "model-?????-of-?????.safetensors"]
LAYOUT_FILES = ["model_index.json", "config.json"]  # which of the two a repo has tells its loader
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub computes it, read from the environment *now* (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def looks_like_path(spec: str) -> bool:
    """``/x``, ``./x``, ``~/x``, ``C:\\x`` or an existing folder; ``org/name`` is a hub id."""
    return spec.startswith(("/", ".", "~", "\\")) or (len(spec) > 1 and spec[1] == ":") or Path(spec).exists()


def diffusers_components(model_index: dict[str, Any]) -> list[str]:
    """The component folders a model_index.json names (``"image_encoder": [null, null]`` is not one)."""
    return sorted(k for k, v in model_index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and all(v))


def allow_patterns(model_index: dict[str, Any] | None, *, trust_remote_code: bool = False) -> list[str]:
    """The files a loader reads: a transformers repo's root files (``model_index=None``), or a diffusers
    repo's model_index.json plus its components' files. Model code (``*.py``) only when trusted."""
    if model_index is None:
        return ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
    patterns = ["model_index.json"]
    for component in diffusers_components(model_index):
        patterns += [f"{component}/{p}" for p in _COMPONENT_FILES + (["*.py"] if trust_remote_code else [])]
    return patterns


def select_files(paths: Iterable[str], patterns: list[str]) -> list[str]:
    """The repo paths ``snapshot_download(allow_patterns=patterns)`` fetches (huggingface_hub's own matcher)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(list(paths), allow_patterns=patterns))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the loader of ``folder`` reads: what is downloaded, counted and checked. A
    component folder of a diffusers pipeline (``transformer/``) counts as its pipeline's loader reads it."""
    index, parent = folder / "model_index.json", folder.parent / "model_index.json"
    if index.is_file():
        patterns = allow_patterns(read_json(index))
    elif parent.is_file() and folder.name in diffusers_components(read_json(parent)):
        patterns = _COMPONENT_FILES
    else:
        patterns = allow_patterns(None)
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    return [folder / p for p in select_files(found, patterns)]


def resolve_model(spec: str, *, name: str | None = None, trust_remote_code: bool = False) -> Path:
    """Return a local folder holding ``spec``'s weights; download a hub id unless HF_HUB_OFFLINE is set."""
    label = name or spec
    if looks_like_path(spec):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"model '{label}': folder {folder} does not exist",
                hint="point [models] in flywheel.toml at a folder made by `hf download <id> --local-dir DIR`, "
                "or use a preset name (`flywheel models list`)",
            )
        check_weights(folder, label)
        return folder
    from flywheel.models.download import snapshot

    return snapshot(spec, label, trust_remote_code)


def check_cpu_can_run(label: str, requested_device: str, *, full_size: bool | None = None,
                      folder: Path | None = None) -> None:
    """``device = "auto"`` on a machine without CUDA and a full-size model: say so before any download.

    ``full_size`` is known for presets (not tiny); for a folder it is read from its safetensors headers
    (``FULL_SIZE_PARAMS``). An explicit ``device = "cpu"`` is what the user asked for, and loads.
    """
    if requested_device != "auto":
        return
    if full_size is None:
        full_size = folder is not None and count_parameters(folder)[0] >= FULL_SIZE_PARAMS
    if not full_size:
        return
    import torch

    if torch.cuda.is_available():
        return
    raise NoGPUError(
        f"model '{label}' is a full-size model and this machine has no CUDA GPU (device = \"auto\")",
        hint="start from configs/examples/cpu-only.toml: on a CPU Flywheel runs ingest, the composite editor, "
        "template captions, the pixel-signal judge, review, export and the tiny-* presets; "
        'set device = "cpu" in [models] to load this model on the CPU anyway (very slow)',
    )


def check_cpu_for(spec: str, role: str | None, requested_device: str) -> None:
    """``check_cpu_can_run`` for a preset name or a local folder, before anything is downloaded (a hub id
    that is not a preset is checked once it is on disk, by the loader)."""
    from flywheel.models.presets import get_preset

    preset = get_preset(spec, role)  # type: ignore[arg-type]
    if preset is not None:
        check_cpu_can_run(preset.name, requested_device, full_size=preset.tiny is None)
    elif looks_like_path(spec) and Path(spec).expanduser().is_dir():
        check_cpu_can_run(spec, requested_device, folder=Path(spec).expanduser())


# Above this many parameters a model is "full size" (minutes per image on a CPU). The tiny presets have
# a few million; the smallest real preset (instruct-pix2pix) about a billion.
FULL_SIZE_PARAMS = 100_000_000


def check_weights(folder: Path, label: str, *, fetch: str | None = None) -> None:
    """Refuse folders without config or with pickle-only weights (safetensors only, for safety)."""
    if not ((folder / "config.json").exists() or (folder / "model_index.json").exists()):
        raise ModelLoadError(
            f"model '{label}': {folder} has no config.json or model_index.json, so it is not a Hugging Face model folder",
            hint=fetch and f"run `{fetch}`" or "point at the folder that holds config.json (or model_index.json)",
        )
    if weight_files(folder):
        return
    pickles = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(
            f"model '{label}' in {folder} has only pickle weights ({', '.join(sorted(pickles)[:3])}); "
            "Flywheel loads safetensors only, because pickles can run code when loaded",
            hint="convert them once in a trusted environment (e.g. `model.save_pretrained(dir, safe_serialization=True)`) "
            "or download a safetensors revision",
        )
    raise ModelNotFoundError(
        f"model '{label}': no weights (*.safetensors) in {folder}; the download may be incomplete",
        hint=f"run `{fetch}` again" if fetch else "re-download the model into that folder",
    )


def count_parameters(folder: Path) -> tuple[int, int]:
    """(parameters, bytes on disk) of the weights the loader reads (``weight_files``: not a diffusers repo's
    root single-file checkpoints), from the safetensors headers alone: no tensor is read."""
    n_params = n_bytes = 0
    for file in weight_files(folder):
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            n_params += count
            n_bytes += count * _DTYPE_BYTES.get(info["dtype"], 2)
    return n_params, n_bytes


# Bytes per parameter once loaded, plus ~20% for activations, buffers and the CUDA context.
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int8": 1.1, "nf4": 0.6}
OVERHEAD = 1.2


def estimate_bytes(n_params: int, precision: str) -> int:
    return int(n_params * BYTES_PER_PARAM[precision] * OVERHEAD)


def check_gpu_memory(label: str, needed: int, free: int, *, precision: str, n_params: int) -> None:
    """Raise ``InsufficientMemoryError`` with the figure needed and what would fit, before loading."""
    if needed <= free:
        return
    gib = 1024**3
    options = []
    for alt, how in (("int8", 'quantization = "int8"'), ("nf4", 'quantization = "nf4"')):
        if BYTES_PER_PARAM[alt] < BYTES_PER_PARAM[precision]:
            fits = "fits" if estimate_bytes(n_params, alt) <= free else "still too big"
            options.append(f"{how} (~{estimate_bytes(n_params, alt) / gib:.1f} GiB, {fits})")
    options.append("cpu_offload = true (slower, keeps only the active part on the GPU)")
    options.append("a smaller preset (`flywheel models list`)")
    raise InsufficientMemoryError(
        f"model '{label}' needs about {needed / gib:.1f} GiB of GPU memory in {precision} "
        f"({n_params / 1e9:.2f} B parameters), but only {free / gib:.1f} GiB is free",
        hint="set in [models] of flywheel.toml: " + "; or ".join(options),
    )


@dataclass
class MemoryReport:
    device: str
    allocated_gib: float
    peak_gib: float
    total_gib: float


def vram_report() -> MemoryReport | None:
    """GPU memory this process holds now and at its peak; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    gib = 1024**3
    return MemoryReport(
        device=torch.cuda.get_device_name(),
        allocated_gib=torch.cuda.memory_allocated() / gib,
        peak_gib=torch.cuda.max_memory_allocated() / gib,
        total_gib=torch.cuda.get_device_properties(0).total_memory / gib,
    )


def pick_device(device: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; asking for "cuda" without one is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InsufficientMemoryError(
            "device = \"cuda\" but PyTorch sees no CUDA GPU",
            hint='set device = "auto" or "cpu" in [models] (CPU runs only the tiny preset at a usable speed)',
        )
    return device


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}", hint="re-download the model folder") from None
