"""The models of one command, loaded once and released on purpose: ``ModelPool``.

Every stage gets its models from a pool (``pool.vlm(spec)``, ``pool.editor(spec)``, ``pool.text_to_image(spec)``),
which loads through ``flywheel.models.load`` (one path: ``[models]`` device, dtype, offload, quantization
per role, and the memory check) and hands back the same adapter while its settings are unchanged. So
caption and judge share one VLM when they name the same model, and evaluate renders both rounds with one
base, swapping LoRAs. A pool holds one model at a time by default: asking for another releases the first,
because on a 24 GB card two of these models never fit together.

A stage given no pool makes its own and releases it when it ends (``stage_pool``); ``flywheel run`` passes
one pool along and releases it between stages that use different models. Releasing drops every reference,
collects garbage and returns cached CUDA blocks, and logs allocated memory against the pool's baseline.
Each load leaves an operation row (a model call whose params say ``"action": "load"``, with the seconds, GPU
memory after loading and the resolved settings), so a run's loads can be counted from the catalog
(``load_counts``; benchmarks/loop.py prints them per stage).
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.catalog.db import Catalog
    from flywheel.config import ModelsConfig

log = logging.getLogger(__name__)


@dataclass
class _Held:
    key: tuple
    role: str
    label: str
    adapter: Any


@dataclass
class ModelPool:
    """Loaded adapters keyed by (role, spec, settings); see the module docstring."""

    models_cfg: ModelsConfig
    catalog: Catalog | None = None
    stage: str = "load"
    exclusive: bool = True  # one model at a time: loading another releases the rest
    held: list[_Held] = field(default_factory=list)
    loads: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, role, label) of every load
    baseline_bytes: int | None = None
    compute: Any = None  # [compute]: with backend "ray" a load is a pool of Ray actors (flywheel.compute)
    api_cfg: Any = None  # [api] (flywheel.config_api), for "api:<model>" specs

    def vlm(self, spec: str, **overrides: Any):
        return self.get("vlm", spec, **overrides)

    def editor(self, spec: str, **overrides: Any):
        return self.get("editor", spec, **overrides)

    def text_to_image(self, spec: str, **overrides: Any):
        return self.get("text_to_image", spec, **overrides)

    def get(self, role: str, spec: str, **overrides: Any):
        """The adapter for ``spec`` in ``role``: the one already held, or a fresh load."""
        key = (role, spec, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        for held in self.held:
            if held.key == key:
                log.debug("pool: reusing %s for %s", held.label, self.stage)
                return held.adapter
        if self.exclusive and self.held:
            self.release()
        return self._load(key, role, spec, overrides)

    def _load(self, key: tuple, role: str, spec: str, overrides: dict[str, Any]):
        from flywheel.models import load

        if self.baseline_bytes is None:
            self.baseline_bytes = _allocated()
        from flywheel.models.openai_common import is_api_spec, pool_extras

        # A service gets [api] and a recorder of its HTTP calls; the first load says where images will go.
        extra, notice = pool_extras(self, spec) if is_api_spec(spec) else ({}, {})
        with recorded_load(self.catalog, self.stage, spec, {"role": role, **overrides, **notice}) as record:
            if self.compute is not None and self.compute.backend == "ray" and not is_api_spec(spec):  # Ray actors
                from functools import partial

                from flywheel.compute import remote

                adapter = remote(self.compute, partial(load, spec, self.models_cfg, role=role, **extra, **overrides),
                                 spec)
            else:
                adapter = load(spec, self.models_cfg, role=role, **extra, **overrides)  # type: ignore[arg-type]
            record(adapter.model_id, adapter.params())
        label = getattr(adapter, "model_id", spec)
        self.held.append(_Held(key, role, label, adapter))
        self.loads.append((self.stage, role, label))
        return adapter

    def release(self) -> None:
        """Drop every held model and give the memory back (GPU caches included)."""
        if not self.held:
            return
        labels = [h.label for h in self.held]
        for held in self.held:
            close = getattr(held.adapter, "close", None)
            if callable(close):
                close()
            _drop_weights(held.adapter)
        self.held.clear()
        free_accelerator_memory()
        log.info("released %s (%s)", ", ".join(labels), _memory_line(self.baseline_bytes))

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def recorded_load(catalog: Catalog | None, stage: str, spec: str, params: dict[str, Any]) -> Iterator:
    """Log and record one model load (the pool's, and the trainer's own): the block calls
    ``record(model_id, resolved_params)`` once the model is loaded; the row gets the seconds and GPU memory."""
    import json

    from flywheel.models.licences import licence_notice

    params = {**params, **licence_notice(catalog, spec, params.get("role"))}  # a non-commercial licence, once
    log.info("loading %s for %s ...", spec, stage)
    t0 = time.perf_counter()
    op = catalog.start_operation(stage, model=spec, params={"action": "load", **params}) if catalog else None
    final: dict[str, Any] = {}

    def record(model_id: str, resolved: dict[str, Any]) -> None:
        final.update(model=model_id, params=resolved)

    try:
        yield record
    except BaseException as err:
        if op is not None:
            catalog.finish_operation(op, "failed", _ms(t0), f"{type(err).__name__}: {err}".split("\n")[0])
        raise
    seconds = time.perf_counter() - t0
    log.info("loaded %s in %.1f s (%s)", final.get("model", spec), seconds, _memory_line())
    if op is not None:
        row = {"action": "load", "seconds": round(seconds, 3), "gpu_allocated_gib": round(_allocated() / 1024**3, 3),
               **params, **_jsonable(final.get("params", {}))}
        with catalog.transaction():
            catalog.execute("UPDATE operations SET params_json = ?, model = ? WHERE id = ?",
                            (json.dumps(row, sort_keys=True, default=str), final.get("model", spec), op))
        catalog.finish_operation(op, "ok", int(seconds * 1000))


@contextmanager
def stage_pool(project, pool: ModelPool | None, stage: str) -> Iterator[ModelPool]:
    """The pool a stage loads from: the caller's (kept loaded for the next stage), or its own (released at
    the end of the stage, also when it fails)."""
    if pool is not None:
        previous, pool.stage = pool.stage, stage
        try:
            yield pool
        finally:
            pool.stage = previous
        return
    with ModelPool(project.config.models, catalog=project.catalog, stage=stage, api_cfg=project.config.api,
                   compute=project.config.compute) as own:
        yield own


# The attributes through which an adapter holds its weights: diffusers pipelines, transformers models and
# processors, and an inner adapter (describe-then-generate's text-to-image model).
WEIGHT_ATTRS = ("pipe", "model", "processor", "generator")


def _drop_weights(adapter: Any) -> None:
    """Cut a released adapter from its weights, so a stage that still holds the adapter (a local variable
    alive while its ``with stage_pool(...)`` block exits) cannot keep them allocated. On the H200 the klein
    generator was still allocated when its release was logged (15.0 GiB), and 7.2 GiB of it (the size of its
    transformer) was still there when the next stage loaded its captioner, at a 24 GiB cap. Using an adapter
    after its release is a bug; it fails on the first call instead of silently holding GPU memory."""
    held = getattr(adapter, "__dict__", {})  # its own attributes only: a Ray handle forwards any other name
    for name in WEIGHT_ATTRS:                 # to its (by now closed) replicas
        if held.get(name) is not None:
            held[name] = None


def load_counts(catalog: Catalog) -> dict[str, int]:
    """How many model loads each stage made, from the catalog's load rows."""
    rows = catalog.query("SELECT stage, COUNT(*) AS n FROM operations WHERE kind = 'model_call' AND status = 'ok' "
                         "AND json_extract(params_json, '$.action') = 'load' GROUP BY stage")
    return {r["stage"]: int(r["n"]) for r in rows}


_HELPER_MODELS: list = []  # the loaders below; free_accelerator_memory empties them


def helper_model(loader):
    """Decorator: a loader of a helper model an adapter uses but the pool does not hold (SAM masks, depth maps),
    kept once per process like an ``lru_cache(maxsize=1)``, and dropped with the pool's models on release."""
    cached = functools.lru_cache(maxsize=1)(loader)
    _HELPER_MODELS.append(cached)
    return cached


def free_accelerator_memory() -> None:
    """Collect garbage and return cached CUDA blocks (torch is only touched if a model imported it).

    Compiled code goes too: torch.compile's caches (the VLM's compiled decode step, the trainer's compiled
    blocks) can hold a released model's weights. On the H200 the 8B captioner stayed allocated (16.3 GiB) after
    its stage and training then ran out of memory at a 24 GiB cap; the next stage's models compile afresh.
    """
    torch = sys.modules.get("torch")
    if torch is not None and "torch._dynamo" in sys.modules:
        torch.compiler.reset()
    for cached in _HELPER_MODELS:
        cached.cache_clear()
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_gpu_peak() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gib() -> float | None:
    """Peak GPU memory allocated by this process since the last ``reset_gpu_peak`` (None without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 1024**3, 3)


def _allocated() -> int:
    torch = sys.modules.get("torch")
    return int(torch.cuda.memory_allocated()) if torch is not None and torch.cuda.is_available() else 0


def _memory_line(baseline: int | None = None) -> str:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return "no CUDA GPU"
    gib = 1024**3
    now = torch.cuda.memory_allocated() / gib
    extra = f", baseline {baseline / gib:.2f} GiB" if baseline is not None else ""
    return f"GPU {now:.2f} GiB allocated, peak {torch.cuda.max_memory_allocated() / gib:.2f} GiB{extra}"


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)) for k, v in params.items()}


def _ms(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1000)
