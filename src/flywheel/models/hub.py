"""Find model weights (local folder or Hugging Face hub id), offline-aware, safetensors only.

Every failure here is one error that tells the user what to run: the model, the folder that was
searched and the ``hf download`` command; or, for memory, the figure needed and the options.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import InsufficientMemoryError, ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

# What we fetch from the hub: configs, tokenizers and safetensors weights, never pickles.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
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
    return _snapshot(spec, label, trust_remote_code)


def _snapshot(repo_id: str, label: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    looked_in = cache / ("models--" + repo_id.replace("/", "--"))
    fetch = f"hf download {repo_id}"
    patterns = ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])  # model code only when trusted
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=patterns,
                                        local_files_only=is_offline()))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"model '{label}' ({repo_id}) is not downloaded: looked in {looked_in} (HF_HUB_OFFLINE is set)",
            hint=f"run `{fetch}` on a machine with internet (same HF_HOME), or set the model to a local folder",
        ) from None
    except Exception as err:  # network, auth (gated repos), missing repo: all end in the same advice
        raise ModelNotFoundError(
            f"model '{label}' ({repo_id}) could not be fetched into {looked_in}: {type(err).__name__}: {err}",
            hint=f"run `{fetch}` (gated models need `hf auth login` and accepting the licence on the hub page)",
        ) from None
    check_weights(folder, label, fetch=fetch)
    return folder


def check_weights(folder: Path, label: str, *, fetch: str | None = None) -> None:
    """Refuse folders without config or with pickle-only weights (safetensors only, for safety)."""
    if not ((folder / "config.json").exists() or (folder / "model_index.json").exists()):
        raise ModelLoadError(
            f"model '{label}': {folder} has no config.json or model_index.json, so it is not a Hugging Face model folder",
            hint=fetch and f"run `{fetch}`" or "point at the folder that holds config.json (or model_index.json)",
        )
    if any(folder.rglob("*.safetensors")):
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
    """(parameters, bytes on disk) from the safetensors headers alone: no tensor is read."""
    n_params = n_bytes = 0
    for file in folder.rglob("*.safetensors"):
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
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.1, "nf4": 0.6}
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
