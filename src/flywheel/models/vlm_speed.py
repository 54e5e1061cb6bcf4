"""The fast path of the Qwen-VL adapter: image preprocessing on the model's GPU, a static KV cache with a
compiled decode step, and the knobs behind ``[models] vlm_compile`` (docs/models.md, "VLM speed").

Why each piece (measured with ``benchmarks/vlm_caption.py`` on an H200, issue 15):
- Preprocessing (resize, normalise, patchify) of a 1024² image takes tens of milliseconds on one CPU core,
  while the GPU waits: at batch 32 that alone is seconds per batch. transformers' torchvision image
  processor runs the same steps on the GPU when given ``device``.
- Eager decoding is bound by the CPU (Python and kernel launches: ~20 ms a step for a 2B model whose
  weights take ~1 ms to read). A static cache lets ``generate`` compile the decode step with CUDA graphs.
- The compiled step is specialised to the cache's shape: a second shape (batch size, cache length) compiles
  once more (measured 48 s), with dynamic shapes. So the adapter keeps one shape per process where it can:
  a short last batch is filled up with copies of its last request (their answers are dropped), and the cache
  length only grows (rounded up, so prompts of similar length share it).
- Compiling costs ~38 s in a fresh process and ~8 s once inductor's on-disk cache holds the graphs, so "auto"
  compiles only for a stage with enough requests to win that back (``COMPILE_PAYS_OFF``, lower where this
  machine compiled the same step before); the stage says how many it has with the adapter's ``expect``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

CompileSetting = Literal["auto", "on", "off"]
COMPILE_SETTINGS = ("auto", "on", "off")
CACHE_BUCKET = 256  # static cache lengths are multiples of this: one shape for prompts of similar length


# Where "auto" starts compiling: the requests a stage must have for the one-off compilation to pay for
# itself. Measured on the H200 (benchmarks/vlm_stage.py, Qwen2-VL-2B, 1024², 128 new tokens, batch 16): 0.255 s
# per image uncompiled, 0.108-0.111 s compiled (0.145 s saved). Compiling took 37-39 s in a fresh process
# (break-even 257 images; a stage of 256 took 65.4 s compiled, as long as uncompiled) and 8.0 s in a new
# process once inductor's on-disk cache held the graphs (break-even 55; 4.3-5.6 s within one process).
# Whether this machine compiled the same decode step before is read from a marker in inductor's cache folder
# (``compiled_before``), so the lower threshold applies exactly while the cache that makes compiling cheap is
# there. docs/models.md, "VLM speed".
COMPILE_PAYS_OFF = 256
COMPILE_PAYS_OFF_WARM = 64


def use_compiled_decode(setting: str, device: str, quantization: str, requests: int | None = None, *,
                        warm: bool = False) -> bool:
    """``vlm_compile`` resolved for a stage of ``requests`` requests (None: any number). "auto" compiles on CUDA
    with unquantized weights (bitsandbytes layers do not compile; a static cache without compilation is slower
    than the default dynamic one) once the stage has ``COMPILE_PAYS_OFF`` requests or more
    (``COMPILE_PAYS_OFF_WARM`` when ``warm``: compiled on this machine before); never on CPU."""
    if setting not in COMPILE_SETTINGS:
        from flywheel.errors import ConfigError

        raise ConfigError(f"unknown vlm_compile {setting!r}", hint=f"use one of {', '.join(COMPILE_SETTINGS)}")
    if setting == "auto":
        threshold = COMPILE_PAYS_OFF_WARM if warm else COMPILE_PAYS_OFF
        return device == "cuda" and quantization == "none" and (requests is None or requests >= threshold)
    return setting == "on"


def compile_marker(key: dict[str, Any], root: str | None = None) -> Path | None:
    """The file that says this decode step (``key``: model, batch size, library versions, GPU) was compiled on
    this machine, in inductor's cache folder (``root``, default: inductor's own), so it disappears with the
    cache that made compiling it again cheap. None when this torch has no such folder to ask for."""
    if root is None:
        try:
            from torch._inductor.runtime.cache_dir_utils import cache_dir
        except ImportError:
            return None
        root = cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(root) / "flywheel-vlm-decode" / digest


def compiled_before(marker: Path | None) -> bool:
    return marker is not None and marker.is_file()


def remember_compiled(marker: Path | None, key: dict[str, Any]) -> None:
    """Leave the marker; a cache folder that cannot be written only costs the lower threshold next time."""
    if marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(key, sort_keys=True))
    except OSError as err:
        log.info("could not mark the compiled decode step in %s: %s", marker.parent, err)


def cache_length(prompt_len: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    """Static cache length for a batch: prompt + answer, rounded up to ``bucket``."""
    need = prompt_len + max_new_tokens
    return -(-need // bucket) * bucket


def decode_kwargs(device: str, max_cache_len: int, *, backend: str = "inductor") -> dict[str, Any]:
    """Extra ``generate`` kwargs for the static cache (``max_cache_len`` tokens: ``cache_length``) + compiled
    decode step.

    transformers compiles the decode step itself (``get_compiled_call``) once it sees a static cache on a
    supported device, and reuses the compiled call across ``generate`` calls. On CUDA: CUDA graphs
    ("reduce-overhead"); elsewhere (tests) plain inductor or ``backend``, forced through the config's
    ``_compile_all_devices`` flag, which transformers reads for exactly this.
    """
    from transformers import CompileConfig

    if device == "cuda":  # transformers' own defaults: inductor, CUDA graphs, automatic dynamic shapes
        config = CompileConfig(backend=backend)
    else:
        config = CompileConfig(backend=backend, mode="default")
        config._compile_all_devices = True
    return {"cache_implementation": "static", "max_cache_len": max_cache_len, "compile_config": config}


def processes_on_device(image_processor: Any) -> bool:
    """True when the image processor can run on a torch device (transformers' torchvision backend)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # an older transformers: only its *Fast processors take a device
        return type(image_processor).__name__.endswith("Fast")
    return isinstance(image_processor, TorchvisionBackend)


def image_kwargs(image_processor: Any, max_pixels: int, device: str | None) -> dict[str, Any]:
    """Processor kwargs that apply the pixel budget (``size``: min/max pixels) and, when ``device`` is
    given and the processor supports it, run preprocessing there.

    The budget only lowers the processor's own maximum (the model's limit, from its preprocessor config).
    """
    size = dict(getattr(image_processor, "size", None) or {})
    kwargs: dict[str, Any] = {}
    if size.get("longest_edge"):  # Qwen's processors express min/max pixels as shortest/longest edge
        longest = min(int(size["longest_edge"]), max_pixels)
        kwargs["size"] = {"shortest_edge": min(int(size.get("shortest_edge") or 56 * 56), longest),
                          "longest_edge": longest}
    if device is not None and processes_on_device(image_processor):
        kwargs["device"] = device
    return kwargs


GQA_DECODE_ATTENTION = "flywheel_sdpa_gqa_decode"


def _sdpa_gqa_decode(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention, except for decode steps (one query position) of grouped-query attention
    with a mask: there the query heads that share a key/value head are folded into the query axis.

    With a mask (always, with a static cache) transformers repeats every key/value head to all its query heads
    before SDPA: for Qwen2-VL-2B (12 query heads, 2 key/value heads) at batch 128 and a 1536-token cache that
    is ~34 GB written and read again per decode step, several times the step's real work. Folded, each head is
    read once and the products are the same ones (a test compares the answers).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads or attention_mask is None or dropout or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    folded = query.reshape(b, kv_heads, heads // kv_heads, dim)  # head h reads key/value head h // groups
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask.ndim == 4 else attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_gqa_decode_attention(model: Any) -> bool:
    """Switch the text decoder of ``model`` from "sdpa" to the folded grouped-query decode attention (above);
    the vision tower keeps its own. Returns whether it was switched (not for flash-attention or eager)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    text = model.config.get_text_config()
    if getattr(text, "_attn_implementation", None) != "sdpa":
        return getattr(text, "_attn_implementation", None) == GQA_DECODE_ATTENTION
    AttentionInterface.register(GQA_DECODE_ATTENTION, _sdpa_gqa_decode)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, sdpa_mask)  # the same masks as "sdpa"
    text._attn_implementation = GQA_DECODE_ATTENTION
    log.info("text decoder attention: %s (grouped-query decode steps read each key/value head once)",
             GQA_DECODE_ATTENTION)
    return True
