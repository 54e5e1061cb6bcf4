"""The FLUX.1 flow-matching LoRA training step: one small function shared by ``flywheel.train`` and
``benchmarks/train_step.py``. It touches only the transformer: latents and text embeddings come cached.

Flow matching as FLUX was trained: ``x_t = (1 - t) x_0 + t noise``, the transformer predicts the velocity
``noise - x_0``; ``t`` is drawn from a sigmoid of a normal ("logit-normal") and shifted towards noise for
larger images with the same resolution-dependent shift the FLUX scheduler uses at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15  # FLUX.1 scheduler_config.json


@dataclass
class Batch:
    """One bucket's worth of cached inputs (all on the training device)."""

    latents: Any          # FLUX.1: (B, 16, H/8, W/8), shifted and scaled like the VAE config says
    prompt_embeds: Any    # FLUX.1: (B, L, 4096) T5
    pooled: Any           # FLUX.1: (B, 768) CLIP pooled; None for families without one (klein)


def pack_latents(latents):
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): FLUX's 2x2 patch sequence."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, device, dtype):
    """Position ids (0, row, col) of the packed latent patches of an (h, w) latent."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def shift_mu(image_seq_len: int) -> float:
    return BASE_SHIFT + (MAX_SHIFT - BASE_SHIFT) * (image_seq_len - BASE_SEQ_LEN) / (MAX_SEQ_LEN - BASE_SEQ_LEN)


def sample_sigmas(batch: int, generator, *, image_seq_len: int, sampling: str = "shifted_sigmoid"):
    """Noise levels t in (0, 1), on the CPU from ``generator`` (so resume reproduces them exactly)."""
    import torch

    if sampling == "uniform":
        return torch.rand(batch, generator=generator)
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    if sampling == "shifted_sigmoid":
        m = math.exp(shift_mu(image_seq_len))
        t = m * t / (1 + (m - 1) * t)  # = e^mu / (e^mu + (1/t - 1)), the FLUX time shift
    return t


def flow_matching_loss(transformer, batch: Batch, noise, sigmas, *, guidance: float = 1.0):
    """Mean squared error between the predicted and the true velocity for one noised batch."""
    import torch
    import torch.nn.functional as F

    lat = batch.latents
    b, _, h, w = lat.shape
    dtype = transformer.dtype
    t = sigmas.to(lat.device, lat.dtype).view(b, 1, 1, 1)
    noisy = (1 - t) * lat + t * noise
    pred = transformer(
        hidden_states=pack_latents(noisy).to(dtype),
        timestep=sigmas.to(lat.device, dtype),  # the transformer multiplies by 1000 itself
        guidance=torch.full((b,), guidance, device=lat.device, dtype=dtype) if transformer.config.guidance_embeds else None,
        pooled_projections=batch.pooled.to(dtype),
        encoder_hidden_states=batch.prompt_embeds.to(dtype),
        txt_ids=torch.zeros(batch.prompt_embeds.shape[1], 3, device=lat.device, dtype=dtype),
        img_ids=image_ids(h, w, lat.device, dtype),
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), pack_latents(noise - lat).float())


def train_step(transformer, optimizer, batch: Batch, generator, *, params, guidance: float = 1.0,
               sampling: str = "shifted_sigmoid", max_grad_norm: float | None = 1.0, lr_scheduler=None) -> float:
    """The FLUX.1 step (``flywheel.training.step.train_step`` with the FLUX.1 family), for the benchmarks."""
    from flywheel.training.families.flux1 import Flux1
    from flywheel.training.step import train_step as family_step

    return family_step(Flux1(), transformer, optimizer, batch, generator, params=params, guidance=guidance,
                       sampling=sampling, max_grad_norm=max_grad_norm, lr_scheduler=lr_scheduler)


def checkpoint_blocks(transformer, every: int = 1) -> int:
    """Activation checkpointing on every ``every``-th transformer block (1 = all, 2 = half, ...): trades
    recomputation for memory more finely than diffusers' all-or-nothing switch. Returns blocks wrapped."""
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    wrapped = 0
    for i, block in enumerate(blocks):
        if every and i % every == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            wrapped += 1
    return wrapped
