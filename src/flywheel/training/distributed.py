"""Data-parallel LoRA training: what one rank of ``flywheel train --gpus N`` does differently in the loop.

The design goal is that N ranks with ``batch_size`` B train the same LoRA as one process with batch N*B:

- the data order is planned with the global micro-batch N*B (``micro_batch``), so every rank walks the same
  list of global batches;
- every rank draws the *whole* global batch's caption dropout, t and noise from the run's seeded generator
  and keeps its own contiguous slice (``Ranks.part``), so the draws, and the generator state checkpointed
  after them, are exactly those of the one-process run;
- each rank's loss is its slice's share of the global mean (slice mean x slice size / global size /
  accumulation), and the LoRA gradients (and the loss) are summed across ranks (``GradReducer``): in
  ~25 MB buckets, each sent with an async ``all_reduce`` as soon as the last micro-batch's backward has
  produced its gradients, so the link works while the backward goes on (earlier micro-batches of gradient
  accumulation do not communicate). The summed gradient is the one-process gradient, up to float reduction
  order. Clipping and AdamW then run on identical gradients on every rank, so the LoRAs stay identical
  without a broadcast per step (one broadcast from rank 0 at the start guards the initial state).

A last, smaller batch of a bucket is split unevenly (a rank can get nothing: it runs no forward and only
joins every bucket's all_reduce, with zeros, in the same order as the others). One rank alone has nothing
to sum: ``--gpus 1`` communicates nothing per step.

``Ranks()`` is one process without a process group: the trainer uses its ``step`` only to accumulate
batches, and ``training.step.train_step`` otherwise. With one rank and no accumulation ``Ranks.step`` does
the operations of ``train_step`` in the same order (tested bit for bit: ``--gpus 1`` vs the plain path).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flywheel.errors import ConfigError, NoGPUError

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This process's place in the run: rank, world size, and whether a process group is up."""

    rank: int = 0
    world: int = 1
    group: bool = False  # torch.distributed is initialised (the --gpus path, also with one GPU)
    _reducer: Any = field(default=None, init=False, repr=False, compare=False)  # GradReducer of the LoRA params

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, samples, LoRA files and (through the parent) the catalog."""
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` items (sizes differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. encodes the caches), the others after it (and read its files)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def start(self, params: dict[str, Any], cfg) -> None:
        """Before the first step: every rank takes rank 0's LoRA (identical by construction; this guards it),
        and the log states the batch arithmetic."""
        log.info("effective batch %d per optimizer step (%s)", effective_batch(cfg), describe(cfg))
        if not self.group or self.world == 1:
            return
        import torch.distributed as dist

        for name in sorted(params):
            dist.broadcast(params[name].data, src=0)

    def step(self, family, transformer, optimizer, micro: list[list[int]], make_batch: Callable[[list[int]], Any],
             generator, *, params: list, guidance: float = 1.0, sampling: str = "shifted_sigmoid",
             max_grad_norm: float | None = 1.0, lr_scheduler=None):
        """One optimizer step over ``micro``, the global micro-batches (image ids) it accumulates; returns the
        global mean loss (the same on every rank). ``make_batch(ids)`` draws the caption dropout of every id
        and returns the whole global batch on this rank's device (a few MB of cached tensors)."""
        import torch

        from flywheel.training.speed import step_begin
        from flywheel.training.step import draw

        reducer = self._reducer_for(params)
        total = None
        for i, ids in enumerate(micro):
            batch = make_batch(ids)
            lat = batch.latents
            n = lat.shape[0]
            sigmas, noise = draw(family, lat, generator, sampling)
            part = self.part(n)
            share = (part.stop - part.start) / n / len(micro)
            if share == 0:
                continue  # nothing of this batch on this rank: it still joins every bucket's all_reduce below
            if share != 1:
                batch, noise, sigmas = _slice(batch, part), noise[part], sigmas[part]
            step_begin(lat.device)
            loss = family.loss(transformer, batch, noise, sigmas, guidance=guidance)
            if share != 1:  # the one-process path multiplies by nothing, so its floats are untouched
                loss = loss * share
            total = loss.detach() if total is None else total + loss.detach()
            if reducer is not None and i == len(micro) - 1:
                reducer.arm(total)  # only the last micro-batch's backward sends its buckets as they are ready
            loss.backward()
        if total is None:
            total = torch.zeros((), device=_device_of(params))
        if reducer is not None:
            total = reducer.finish(total)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if lr_scheduler is not None:
            lr_scheduler.step()
        return total

    def _reducer_for(self, params: list):
        """The gradient reducer over ``params`` (made at the first step; its hooks stay on the parameters), or
        None when there is nothing to sum: no process group, or one rank."""
        if not self.group or self.world == 1 or not params:
            return None
        if self._reducer is None or not self._reducer.covers(params):
            from flywheel.training.reducer import GradReducer

            if self._reducer is not None:
                self._reducer.remove()
            self._reducer = GradReducer(params)
        return self._reducer


def micro_batch(cfg) -> int:
    """Images per global micro-batch, the unit the data order is planned in: gpus x batch_size."""
    return cfg.batch_size * max(1, getattr(cfg, "gpus", 0))


def effective_batch(cfg) -> int:
    """Images per optimizer step: gpus x batch_size x gradient_accumulation."""
    return micro_batch(cfg) * getattr(cfg, "gradient_accumulation", 1)


def describe(cfg) -> dict:
    """The batch arithmetic, for the log and the run's config.json."""
    gpus = getattr(cfg, "gpus", 0)
    return {"gpus": gpus, "processes": max(1, gpus), "batch_size_per_process": cfg.batch_size,
            "gradient_accumulation": getattr(cfg, "gradient_accumulation", 1), "effective_batch": effective_batch(cfg),
            "path": "distributed" if gpus else "single process"}


def place(project, cfg, device: str | None) -> tuple[str, int]:
    """``check`` for ``[train] gpus`` and the device the user asked for (the stage's override, else [models]
    base device: 'auto', 'cpu', 'cuda:1' ...)."""
    return check(cfg.gpus, device or project.config.models.for_role("base")["device"])


def launch(project, placed: tuple[str, int], progress, **run_kwargs) -> list[float]:
    """Train on ``cfg.gpus`` worker processes (``training/launch.py``); this process stays the catalog's writer."""
    from flywheel.training.launch import launch as start

    return start(project, "flywheel.train:_run", gpus=run_kwargs["cfg"].gpus, backend=placed[0],
                 first_cuda=placed[1], progress=progress, **run_kwargs)


def check(gpus: int, device: str) -> tuple[str, int]:
    """(backend, first CUDA index) for ``gpus`` processes on ``device``, or a one-line error before anything
    is recorded: CPU processes (gloo) only when the CPU is asked for by name; otherwise N visible GPUs."""
    if not gpus:
        return "", 0
    if device == "cpu":
        return "gloo", 0
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise NoGPUError(f"[train] gpus = {gpus} (--gpus {gpus}) needs {gpus} CUDA GPU(s), but PyTorch sees none",
                         hint="train in one process (leave out --gpus / set [train] gpus = 0), or test the "
                         f"multi-process path on the CPU with --gpus {gpus} --device cpu")
    first = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    if first + gpus > count:
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count))
        raise ConfigError(f"[train] gpus = {gpus} (--gpus {gpus}) asks for more GPUs than are visible "
                          f"({count - first} from cuda:{first}; {names})",
                          hint=f"use --gpus {count - first} or fewer; CUDA_VISIBLE_DEVICES chooses which are visible")
    return "nccl", first


def _slice(batch, part: slice):
    """This rank's rows of a batch dataclass: every tensor field is batch-first (None fields stay None)."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[part] for f in dataclasses.fields(batch)
                                         if getattr(batch, f.name) is not None})


def _device_of(params: list):
    return params[0].device if params else "cpu"

