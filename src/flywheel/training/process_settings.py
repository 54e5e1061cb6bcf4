"""The parent's process-wide torch settings, given to the spawned ranks of ``flywheel train --gpus N``.

A spawned worker inherits the environment but none of the parent's in-memory state: torch flags set in the
parent (thread count, float32 matmul precision, cuBLAS / cuDNN flags, SDPA kernels, deterministic mode) would
silently be torch's defaults in the worker, and ``--gpus 1`` would then compute with other kernels than the
plain path in the parent. ``capture`` reads them in the parent (``training/launch.py`` sends them with the
worker's spec), ``apply`` sets them in each worker before it loads anything. The compile settings the trainer
uses (``training/speed.py``) are set inside the training function itself, so they are the same in both.
"""

from __future__ import annotations

# The float32 precision of matmuls and convolutions, read and set through the API the parent's state allows:
# torch >= 2.9 has a new per-backend API (``fp32_precision``) beside the legacy one (``allow_tf32``,
# ``set_float32_matmul_precision``), and reading the legacy flags raises once the two were mixed.
_LEGACY_TF32 = ("backends.cuda.matmul.allow_tf32", "backends.cudnn.allow_tf32")
_FP32_PRECISION = ("backends.fp32_precision", "backends.cuda.matmul.fp32_precision", "backends.cudnn.fp32_precision",
                   "backends.cudnn.conv.fp32_precision", "backends.cudnn.rnn.fp32_precision",
                   "backends.mkldnn.fp32_precision", "backends.mkldnn.matmul.fp32_precision",
                   "backends.mkldnn.conv.fp32_precision", "backends.mkldnn.rnn.fp32_precision")
_BACKEND_FLAGS = ("backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
                  "backends.cuda.matmul.allow_bf16_reduced_precision_reduction", "backends.cudnn.benchmark",
                  "backends.cudnn.deterministic", "backends.cudnn.enabled")
_SDP_KERNELS = ("flash", "mem_efficient", "math", "cudnn")


def capture() -> dict:
    """This process's torch settings that ``apply`` gives a worker: intra-op threads, float32 matmul and
    convolution precision, deterministic algorithms, the cuBLAS / cuDNN flags and the SDPA kernels allowed."""
    import torch

    try:  # the legacy view, when the state is one it can express (always, unless the new API was used)
        legacy = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                  **{name: _get(torch, name) for name in _LEGACY_TF32}}
    except RuntimeError:
        legacy = None
    return {"threads": torch.get_num_threads(), "legacy_precision": legacy,
            "fp32_precision": {name: _get(torch, name) for name in _FP32_PRECISION if _has(torch, name)},
            "deterministic": [torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled()],
            "flags": {name: _get(torch, name) for name in _BACKEND_FLAGS},
            "sdp": {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in _SDP_KERNELS}}


def apply(settings: dict, world: int) -> None:
    """Set ``settings`` (``capture`` in the parent) in this worker; only what differs is touched, so a parent
    that changed nothing changes nothing here. The ranks share the parent's cores: each takes its share of the
    threads (``world`` ranks on one machine)."""
    import torch

    if not settings:
        return
    threads = max(1, settings["threads"] // world)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    legacy = settings["legacy_precision"]
    if legacy is not None:  # through the legacy API, as the parent's state was set (the new API follows it)
        if torch.get_float32_matmul_precision() != legacy["float32_matmul_precision"]:
            torch.set_float32_matmul_precision(legacy["float32_matmul_precision"])
        _set_all(torch, {name: legacy[name] for name in _LEGACY_TF32})
    else:
        _set_all(torch, settings["fp32_precision"])
    on, warn_only = settings["deterministic"]
    if [torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()] != [
            on, warn_only]:
        torch.use_deterministic_algorithms(on, warn_only=warn_only)
    _set_all(torch, settings["flags"])
    for kernel, value in settings["sdp"].items():
        if getattr(torch.backends.cuda, f"{kernel}_sdp_enabled")() != value:
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(value)


def _get(torch, name: str):
    import functools

    return functools.reduce(getattr, name.split("."), torch)


def _has(torch, name: str) -> bool:
    try:
        _get(torch, name)
    except AttributeError:
        return False
    return True


def _set_all(torch, values: dict) -> None:
    for name, value in values.items():
        owner_path, _, attr = name.rpartition(".")
        owner = _get(torch, owner_path)
        if getattr(owner, attr) != value:
            setattr(owner, attr, value)
