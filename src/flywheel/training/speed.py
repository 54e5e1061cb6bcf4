"""Speed options of the LoRA training step, for any model family: one call, ``apply``, on the frozen
transformer after its LoRA is added (and, for a quantized base, after ``training.quantize``), before the
loop; ``adamw_options`` for the optimizer. Every option is a ``[train]`` setting (docs/training.md has the
measurements behind the defaults):

1. ``fp8_matmul``: the frozen base's Linears inside the blocks store float8 weights (per-row scales) and
   multiply on fp8 tensor cores, forward and input gradient (``training/fp8.py``). Our own autograd
   Function over ``torch._scaled_mm`` rather than torchao's, because neither torchao path fits a frozen
   base in 24 GiB: ``convert_to_float8_training`` keeps bf16 master weights (22 GiB for FLUX.1-dev), saves
   the input and computes a weight gradient the frozen base never needs; ``quantize_`` with
   ``Float8DynamicActivationFloat8WeightConfig`` stores fp8 weights but overrides ``F.linear`` above
   autograd, so its ``_scaled_mm`` has no backward (``benchmarks/train_step.py --probe-torchao`` shows it).
2. ``attention_backend``: diffusers' attention dispatcher (``set_attention_backend``) on a PyTorch SDPA kernel.
3. Activation checkpointing on every N-th block (``gradient_checkpointing``, ``checkpoint_every_n_blocks``),
   or, compiled, selective recomputation inside each block (``activation_memory_budget``; ``checkpointing``).
4. ``compile``: ``torch.compile`` per block (regional: two block types compile once each, in about a
   minute), fullgraph; ``activation_memory_budget`` < 1 lets the compiler's partitioner recompute the
   cheapest activations in the backward instead of saving them (selective checkpointing inside a block).
   ``cuda_graphs``: the compiled blocks replay as CUDA graphs (torch.compile's "reduce-overhead", CUDA graph
   trees: forward and backward), so launching a block's ~40-70 small kernels no longer costs the CPU as much
   time as the GPU needs to run them (FLUX.1-dev's forward was launch-bound on the H200). Not with blocks
   checkpointed by ``torch.utils.checkpoint``: their recomputation runs outside the graphs.
5. ``fused_optimizer``: AdamW's fused CUDA kernel for the LoRA parameters.
6. ``lora_compute``: the LoRA's matmuls in the activations' dtype (bf16 on CUDA), its weights and optimizer
   in fp32 (``training/lora_compute.py``).

Options that need CUDA are skipped on other devices with one log line each, never an error: the same
config trains on a CPU (tests, CI) and fast on a GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

FULLGRAPH = True  # a graph break inside a block is an error, not a silent slow path
SDPA_BACKENDS = {"flash": "_native_flash", "cudnn": "_native_cudnn", "efficient": "_native_efficient",
                 "math": "_native_math", "native": "native"}


@dataclass
class Applied:
    """What ``apply`` did, for the run's log and config.json."""

    fp8_matmul: bool = False
    attention_backend: str = "native"
    checkpointed_blocks: int = 0
    compiled_blocks: int = 0
    activation_memory_budget: float = 1.0
    cuda_graphs: bool = False
    lora_compute: str = "fp32"
    skipped: list[str] = field(default_factory=list)


def blocks(transformer) -> list:
    """The repeated transformer blocks of any diffusers DiT (every ``*blocks`` ModuleList child, in order)."""
    import torch

    return [b for name, child in transformer.named_children()
            if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks") for b in child]


def fp8_capable(device: str) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or newer."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def wants_fp8(cfg, base_quantize: str, device: str) -> bool:
    """Whether ``fp8_matmul`` applies: 'on' or 'auto' on an fp8-capable GPU, with a bf16 or fp8-stored base
    (int8 / nf4 bases keep their own kernels)."""
    return cfg.fp8_matmul != "off" and base_quantize in ("none", "fp8") and fp8_capable(device)


def apply(transformer, cfg, device: str, *, base_quantize: str = "none") -> Applied:
    """Apply the ``[train]`` speed options to ``transformer`` (LoRA already added) in place; see the module
    docstring. ``base_quantize`` is how the frozen base is stored now ('none' = bf16, 'fp8', 'int8', 'nf4')."""
    done = Applied()
    cuda = str(device).startswith("cuda")

    def skip(option: str, why: str) -> None:
        done.skipped.append(option)
        log.info("[train] %s skipped: %s", option, why)

    # 1. fp8 weights and matmuls on the frozen base (a bf16 base is converted block by block on the way).
    if wants_fp8(cfg, base_quantize, device):
        from flywheel.training import quantize
        from flywheel.training.fp8 import fp8_frozen_linear_cls

        if base_quantize == "none":
            quantize.quantize_base(transformer, "fp8", device)
        cls = fp8_frozen_linear_cls()
        for m in transformer.modules():
            if isinstance(m, cls):
                m.fp8_compute, m.fp8_backward = True, True
        done.fp8_matmul = True
    elif cfg.fp8_matmul == "on":
        skip("fp8_matmul", f"needs a CUDA GPU of compute capability 8.9+ and a bf16 or fp8 base "
                           f"(device {device!r}, quantize_base {base_quantize!r})")

    # 2. Attention kernel, through diffusers' dispatcher (the same call for every family).
    backend = cfg.attention_backend
    if backend == "auto":
        backend = "flash" if cuda else "native"
    if backend not in ("native", "math") and not cuda:
        skip("attention_backend", f"{backend!r} needs CUDA; {device!r} uses PyTorch's default attention")
        backend = "native"
    if backend != "native" and hasattr(transformer, "set_attention_backend"):
        import torch

        if backend == "cudnn":  # train.py switches cuDNN attention off globally (it crashed on torch 2.11)
            torch.backends.cuda.enable_cudnn_sdp(True)
        set_attention_backend(transformer, SDPA_BACKENDS[backend])
    done.attention_backend = backend

    # 6 (first: nothing is traced yet). The LoRA's matmuls in the activations' dtype.
    if lora_compute(cfg, device) == "bf16":
        from flywheel.training.lora_compute import compute_in_input_dtype

        if compute_in_input_dtype(transformer):
            done.lora_compute = "bf16"
        else:
            skip("lora_compute", "the installed peft has no cast_input_dtype_enabled switch (peft >= 0.15 has)")

    # 3. Activation checkpointing on every N-th block (or, compiled, selective recomputation inside the
    #    blocks), and 4. regional compile, one block at a time.
    compile_ = cfg.compile and cuda
    if cfg.compile and not cuda:
        skip("compile", f"torch.compile of the blocks runs on CUDA only ({device!r})")
    every, budget = checkpointing(cfg, done.fp8_matmul, base_parameters(transformer), compiled=compile_)
    done.activation_memory_budget = budget if compile_ else 1.0
    done.cuda_graphs = cuda_graphs(cfg, compile_, every)
    if cfg.cuda_graphs == "on" and not done.cuda_graphs:
        skip("cuda_graphs", "needs compiled blocks on CUDA and no block checkpointed (checkpoint_every_n_blocks: "
                            "torch.utils.checkpoint recomputes outside the graphs)")
    done.checkpointed_blocks, done.compiled_blocks = wrap_blocks(
        transformer, every, compile=compile_, activation_memory_budget=budget, dynamic=cfg.compile_dynamic,
        cuda_graphs=done.cuda_graphs)
    log.info("training speed options: %s", done)
    return done


# 'auto' checkpointing leaves a base this small uncheckpointed under fp8 matmuls, up to one 1024² image per
# step. Measured on the H200 (benchmarks/train_step.py --family klein): klein-base-4B (3.9 B) at 1024², batch 1,
# 0.164 s/step and 13.7 GiB with no checkpointing against 0.200 s and 9.5 GiB with every 2nd block. A bigger
# base (FLUX.1-dev, 12 B) needs recomputation to stay under 24 GiB: compiled, the partitioner's selective
# recomputation inside every block (activation_memory_budget 0.5: 0.421 s/step, 20.1 GiB at 1024²) beats
# checkpointing every 2nd block (0.477 s, 23.3 GiB), which stays the choice without compile. Activation memory
# grows with the pixels of a step, so a bigger batch or resolution checkpoints the small base again.
SMALL_BASE_PARAMS = 6e9
SMALL_BASE_PIXELS = 1024 * 1024
AUTO_BUDGET = 0.5  # 0.3 and 0.7 measured the same memory (20.1 GiB) and no faster; 0.85 was 0.399 s at 29.8 GiB


def checkpointing(cfg, fp8_matmul: bool, base_params: float = 0, *, compiled: bool = False) -> tuple[int, float]:
    """(every how many blocks to checkpoint, 0 = none; the compiler's activation memory budget). With
    ``checkpoint_every_n_blocks`` 'auto' (0) and ``activation_memory_budget`` 'auto': a small base with fp8
    matmuls and at most a 1024² image per step (``SMALL_BASE_*``) keeps every activation; a bigger one
    recomputes inside the compiled blocks (``AUTO_BUDGET``), or without compile checkpoints every 2nd block;
    without fp8 matmuls (a bf16 base needs all the room it can get) every block is checkpointed."""
    budget = cfg.activation_memory_budget
    every = checkpoint_every(cfg, fp8_matmul, base_params)
    auto = cfg.gradient_checkpointing and not cfg.checkpoint_every_n_blocks and fp8_matmul and every == 2
    if budget == "auto":
        budget = AUTO_BUDGET if auto and compiled else 1.0
    if auto and compiled and budget < 1:  # recomputation inside the blocks replaces the 2nd-block checkpoints
        every = 0
    return every, float(budget)


def lora_compute(cfg, device: str) -> str:
    """``lora_compute`` resolved: 'auto' is bf16 on CUDA (the activations' dtype there), fp32 elsewhere (a CPU
    trains in fp32 anyway, and the CPU tests compare runs bit for bit)."""
    if cfg.lora_compute == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return cfg.lora_compute


def cuda_graphs(cfg, compiled: bool, every: int) -> bool:
    """``cuda_graphs`` resolved: only over compiled blocks (on CUDA) and with no block checkpointed by
    ``torch.utils.checkpoint`` (``every`` > 0), whose recomputation in the backward runs outside the graphs.
    'auto' leaves ``--gpus N`` runs without them: their gradient hooks and all_reduce with graphs are not
    measured on a GPU yet ('on' asks for them)."""
    if not compiled or every or cfg.cuda_graphs == "off":
        return False
    return cfg.cuda_graphs == "on" or not getattr(cfg, "gpus", 0)


def checkpoint_every(cfg, fp8_matmul: bool, base_params: float = 0) -> int:
    """Every how many blocks to checkpoint (0 = none) without compile. 'auto' (0): none for a small base with fp8
    matmuls and at most a 1024² image per step (``SMALL_BASE_*``), every 2nd block with fp8 matmuls (the fp8
    base leaves room: FLUX.1-dev at 1024² fits 24 GiB), every block otherwise."""
    if not cfg.gradient_checkpointing:
        return 0
    if cfg.checkpoint_every_n_blocks:
        return cfg.checkpoint_every_n_blocks
    if not fp8_matmul:
        return 1
    small = 0 < base_params <= SMALL_BASE_PARAMS and cfg.batch_size * cfg.resolution ** 2 <= SMALL_BASE_PIXELS
    return 0 if small else 2


def base_parameters(transformer) -> int:
    """Elements of the transformer's weights, parameters and buffers (fp8-stored weights are buffers)."""
    return sum(t.numel() for t in transformer.parameters()) + sum(t.numel() for t in transformer.buffers())


def wrap_blocks(transformer, every: int, *, compile: bool = False, activation_memory_budget: float = 1.0,
                dynamic: bool = False, backend: str = "inductor", cuda_graphs: bool = False):
    """Each block's forward: compiled (``torch.compile``, regional: identical blocks share one graph), then
    checkpointed on every ``every``-th block (1 = all, 2 = half, 0 = none: recompute that block's forward in
    the backward instead of keeping its activations). Checkpointing wraps the compiled forward, not the
    reverse: dynamo compiles no frame that starts inside torch.utils.checkpoint. ``dynamic``: one graph with a
    symbolic sequence length for every bucket shape, instead of a static graph per shape (faster kernels, but
    each new shape compiles again). ``cuda_graphs``: inductor's "reduce-overhead" mode (the training step then
    calls ``step_begin`` first). Returns (checkpointed, compiled) block counts."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if compile:
        # Process-wide knobs, as torch only offers them so: the partitioner's budget for recomputation inside
        # a block; static shapes (one graph per bucket shape, faster kernels than symbolic ones) for many buckets.
        torch._functorch.config.activation_memory_budget = activation_memory_budget
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    wrapped = compiled = 0
    for i, block in enumerate(blocks(transformer)):
        fwd = block.forward
        if compile:
            mode = {"mode": "reduce-overhead"} if cuda_graphs else {}
            fwd = torch.compile(fwd, fullgraph=FULLGRAPH, dynamic=dynamic, backend=backend, **mode)
            compiled += 1
        if every and i % every == 0:
            fwd = functools.partial(checkpoint, fwd, use_reentrant=False)
            wrapped += 1
        if fwd is not block.forward:
            block.forward = fwd
    return wrapped, compiled


def step_begin(device) -> None:
    """Tell CUDA graph trees that a new forward/backward starts (before each micro-batch's forward), so the
    graphs' output memory of the one before may be reused. A no-op without CUDA graphs; nothing off CUDA."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def adamw_options(cfg, params) -> dict:
    """Keyword arguments for ``torch.optim.AdamW``: the fused CUDA kernel when the LoRA lives on a GPU."""
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if cfg.fused_optimizer and on_cuda:
        return {"fused": True}
    if cfg.fused_optimizer:
        log.info("[train] fused_optimizer skipped: the LoRA parameters are not on a CUDA GPU")
    return {}


def set_attention_backend(model, name: str) -> None:
    """``model.set_attention_backend(name)`` for ``model`` only. diffusers also makes the backend the process-wide
    default, so every model built later in the process (the pipelines ``flywheel run`` loads after training, the
    next benchmark variant, the next test) would use it too, and the plain path would compute differently from
    a spawned ``--gpus`` worker that never trained before. The attention processors pass their own backend, so
    restoring the default leaves ``model`` on ``name``."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    try:
        _quiet_diffusers(model.set_attention_backend, name)
    finally:
        _AttentionBackendRegistry.set_active_backend(before)


def _quiet_diffusers(fn, *args):
    """diffusers warns 'experimental feature' on every set_attention_backend call: once is noise enough."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        fn(*args)
    finally:
        dlog.set_verbosity(level)
