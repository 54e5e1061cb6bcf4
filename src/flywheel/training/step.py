"""The LoRA training step of every family: draw t and noise, one forward/backward, clip, optimizer step.

Only ``family.image_seq_len`` (for the timestep shift) and ``family.loss`` differ between families; t and the
noise come from the run's CPU generator, so a resumed run draws exactly what the uninterrupted one did.
"""

from __future__ import annotations

from flywheel.training.flux_step import Batch, sample_sigmas


def train_step(family, transformer, optimizer, batch: Batch, generator, *, params, guidance: float = 1.0,
               sampling: str = "shifted_sigmoid", max_grad_norm: float | None = 1.0, lr_scheduler=None):
    """Draw noise and t from ``generator``, one forward/backward, clip, optimizer (and scheduler) step."""
    import torch

    lat = batch.latents
    sigmas = sample_sigmas(lat.shape[0], generator, image_seq_len=family.image_seq_len(lat), sampling=sampling)
    noise = torch.randn(lat.shape, generator=generator, dtype=torch.float32).to(lat.device, lat.dtype)
    loss = family.loss(transformer, batch, noise, sigmas, guidance=guidance)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return loss.detach()
