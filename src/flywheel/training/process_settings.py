"""The parent's process-wide torch settings, given to the spawned ranks of ``flywheel train --gpus N``.

A spawned worker inherits the environment but none of the parent's in-memory state: torch flags set in the
parent (thread count, float32 matmul precision, cuBLAS / cuDNN flags, SDPA kernels, deterministic mode) would
silently be torch's defaults in the worker, and ``--gpus 1`` would then compute with other kernels than the
plain path in the parent. ``capture`` reads them in the parent (``training/launch.py`` sends them with the
worker's spec), ``apply`` sets them in each worker before it loads anything. The compile settings the trainer
uses (``training/speed.py``) are set inside the training function itself, so they are the same in both.
"""

from __future__ import annotations

_BACKEND_FLAGS = ("backends.cuda.matmul.allow_tf32", "backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
                  "backends.cuda.matmul.allow_bf16_reduced_precision_reduction", "backends.cudnn.allow_tf32",
                  "backends.cudnn.benchmark", "backends.cudnn.deterministic", "backends.cudnn.enabled")
_SDP_KERNELS = ("flash", "mem_efficient", "math", "cudnn")


def capture() -> dict:
    """This process's torch settings that ``apply`` gives a worker: intra-op threads, float32
    matmul precision, deterministic algorithms, the cuBLAS / cuDNN flags and the SDPA kernels allowed."""
    import functools

    import torch

    flags = {name: functools.reduce(getattr, name.split("."), torch) for name in _BACKEND_FLAGS}
    sdp = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in _SDP_KERNELS}
    return {"threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic": [torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled()],
            "flags": flags, "sdp": sdp}


def apply(settings: dict, world: int) -> None:
    """Set ``settings`` (``capture`` in the parent) in this worker; only what differs is touched. The
    ranks share the parent's cores: each takes its share of the threads (``world`` ranks on one machine)."""
    import functools

    import torch

    if not settings:
        return
    threads = max(1, settings["threads"] // world)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_float32_matmul_precision() != settings["float32_matmul_precision"]:
        torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    on, warn_only = settings["deterministic"]
    if [torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()] != [on, warn_only]:
        torch.use_deterministic_algorithms(on, warn_only=warn_only)
    for name, value in settings["flags"].items():
        owner_path, _, attr = name.rpartition(".")
        owner = functools.reduce(getattr, owner_path.split("."), torch)
        if getattr(owner, attr) != value:
            setattr(owner, attr, value)
    for kernel, value in settings["sdp"].items():
        if getattr(torch.backends.cuda, f"{kernel}_sdp_enabled")() != value:
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(value)


