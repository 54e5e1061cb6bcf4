"""The LoRA training step of every family: draw t and noise, one forward/backward, clip, optimizer step.

Only ``family.image_seq_len`` (for the timestep shift) and ``family.loss`` differ between families; t and the
noise come from the run's CPU generator, so a resumed run draws exactly what the uninterrupted one did.
They (and the cached batch) reach the GPU through pinned memory without a wait (``to_device``): a plain copy
from pageable memory first waits for every kernel already queued, which stops the CPU from queueing the next
step while the GPU still runs this one.
"""

from __future__ import annotations

from flywheel.training.flux_step import Batch, sample_sigmas


def train_step(family, transformer, optimizer, batch: Batch, generator, *, params, guidance: float = 1.0,
               sampling: str = "shifted_sigmoid", max_grad_norm: float | None = 1.0, lr_scheduler=None):
    """Draw noise and t from ``generator``, one forward/backward, clip, optimizer (and scheduler) step."""
    import torch

    from flywheel.training.speed import step_begin

    lat = batch.latents
    sigmas, noise = draw(family, lat, generator, sampling)
    step_begin(lat.device)
    loss = family.loss(transformer, batch, noise, sigmas, guidance=guidance)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return loss.detach()


def draw(family, lat, generator, sampling: str):
    """(t, noise) for the latents ``lat``, drawn on the CPU from ``generator`` and sent to ``lat``'s device."""
    import torch

    sigmas = sample_sigmas(lat.shape[0], generator, image_seq_len=family.image_seq_len(lat), sampling=sampling)
    noise = torch.randn(lat.shape, generator=generator, dtype=torch.float32)
    return to_device(sigmas, lat.device), to_device(noise, lat.device, lat.dtype)


def to_device(tensor, device, dtype=None):
    """``tensor.to(device, dtype)`` that does not make the CPU wait for the GPU: to a CUDA device through pinned
    memory, asynchronously (the pinned copy stays alive until the copy is done: PyTorch's caching host
    allocator records the stream), then cast there. The values are exactly those of ``tensor.to(...)``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, dtype)
    return tensor.pin_memory().to(device, non_blocking=True).to(dtype=dtype)


class LateLoss:
    """A step's loss, to be read after the next step is queued. On a GPU it is copied to pinned memory behind
    the step's kernels and an event marks the copy, so ``value()`` waits for that step only: ``float(loss)``
    would wait for everything queued since, the next step included. Elsewhere it is the loss itself."""

    def __init__(self, loss):
        import torch

        loss, self.event = loss.detach(), None
        if loss.is_cuda:
            self.host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            self.host.copy_(loss, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = loss

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)
