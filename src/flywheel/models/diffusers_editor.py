"""``DiffusersEditor``: what every diffusers editor adapter shares, so a family file keeps only what differs.

The shared part: the state (``pipe``, ``model_id``, ``device``, ``dtype``, ``cpu_offload``, ``quantization``,
``settings``, ``loras``), loading (``from_pretrained``: the folder and its label, ``load_pipeline`` with the
dtype / quantization / offload handling, then the editor LoRAs through ``editor_options.apply_loras``) and
the ``params()`` keys the catalog records with every edit. A family subclass sets ``family`` and implements:

- ``pipeline(folder, label, settings, device=, dtype=)`` (classmethod): which pipeline class loads the folder,
  the family's default settings, the components to quantize, extra load arguments and the family's own
  constructor arguments (``PipelineSpec``). It pops the settings that are not sampler arguments and raises
  ``ConfigError`` for settings it cannot honour, before anything is loaded.
- ``edit(requests)``: the pipeline calls for a batch of ``EditRequest``.
- optionally: ``max_references`` (how many reference images of the character an edit uses; without it
  enrich sends its configured number), ``loaded(pipe, spec)`` (after loading, before the LoRAs: e.g. a fixed
  scheduler shift), ``family_params()`` (keys recorded next to the settings) and an ``__init__`` that takes
  the family's own state (``PipelineSpec.state``) and passes the rest on.

Every family takes the ``speed`` setting (``flywheel.models.editor_speed``: regional torch.compile of the
denoiser's blocks, optionally with fp8 matmuls), applied after the LoRAs are fused; ``params()`` records it
and what was applied (``speed_applied``: "auto" resolves per device) when it is set.

The weights live only under ``self.pipe``: ``ModelPool.release`` sets it to None to free them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PipelineSpec:
    """How a family loads one folder."""

    cls: type  # the diffusers pipeline class
    defaults: dict[str, Any]  # the family's settings; the preset's and the user's override them
    quantize: tuple[str, ...] = ("transformer",)  # the components nf4 / int8 / fp8 apply to
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # more ``from_pretrained`` arguments
    state: dict[str, Any] = field(default_factory=dict)  # the family's own constructor arguments


class DiffusersEditor:
    """An ImageEditor over one diffusers pipeline (see the module docstring for what a family implements)."""

    family = ""  # params()["family"]
    takes_loras = True  # False: the pipeline has no LoRA loader, and params() records no "loras"

    def __init__(self, pipe, *, model_id: str, device: str, dtype, cpu_offload: bool, quantization: str,
                 settings: dict[str, Any], loras: list[dict[str, Any]] | None = None, speed: str = "none",
                 speed_applied: str = "none"):
        self.pipe = pipe
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.cpu_offload = cpu_offload
        self.quantization = quantization
        self.settings = settings
        self.loras = loras or []
        self.speed = speed
        self.speed_applied = speed_applied

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        raise NotImplementedError(f"{cls.__name__} does not say which pipeline it loads")

    @classmethod
    def loaded(cls, pipe, spec: PipelineSpec) -> None:
        """After loading, before the editor LoRAs; nothing by default."""

    @classmethod
    def from_pretrained(cls, path: str | Path, *, model_id: str | None = None, device: str = "cpu",
                        dtype: str | None = None, cpu_offload: bool = False, quantization: str = "none",
                        vae_tiling: bool | None = None, **settings: Any):
        """Load the folder ``path`` (labelled ``model_id`` in errors and the catalog; the path by default).

        ``settings``: the family's sampler settings, the family-only keys its ``pipeline`` reads, and ``loras``
        (editor LoRAs, ``flywheel.models.editor_options``), loaded after the pipeline and recorded in params().
        """
        from flywheel.models._diffusers_common import load_pipeline
        from flywheel.models.editor_options import apply_loras
        from flywheel.models.editor_speed import apply_speed, check_speed

        folder, label = Path(path), model_id or str(path)
        speed = settings.pop("speed", None) or "none"
        check_speed(speed, label)  # before loading many GB
        spec = cls.pipeline(folder, label, settings, device=device, dtype=dtype)
        loras = settings.pop("loras", ())
        pipe, torch_dtype = load_pipeline(spec.cls, folder, label=label, device=device, dtype=dtype,
                                          cpu_offload=cpu_offload, quantization=quantization, vae_tiling=vae_tiling,
                                          quantize=spec.quantize, **spec.load_kwargs)
        cls.loaded(pipe, spec)
        records = apply_loras(pipe, loras, model_id=label, quantization=quantization, dtype=torch_dtype)
        applied = apply_speed(pipe, speed, device=device, quantization=quantization, cpu_offload=cpu_offload,
                              label=label)  # after fusing the LoRAs: the compiled blocks hold the final weights
        return cls(pipe, model_id=label, device=device, dtype=torch_dtype, cpu_offload=cpu_offload,
                   quantization=quantization, settings={**spec.defaults, **settings}, loras=records, speed=speed,
                   speed_applied=applied, **spec.state)

    def edit(self, requests: list) -> list:
        raise NotImplementedError(f"{type(self).__name__} does not implement edit")

    def family_params(self) -> dict[str, Any]:
        """The family's own recorded keys (after the settings, before the LoRAs)."""
        return {}

    def params(self) -> dict[str, Any]:
        params = {"model": self.model_id, "family": self.family, "device": self.device, "dtype": str(self.dtype),
                  "cpu_offload": self.cpu_offload, "quantization": self.quantization, **self.settings,
                  **self.family_params()}
        if self.speed != "none":
            params.update(speed=self.speed, speed_applied=self.speed_applied)
        if self.takes_loras:
            params["loras"] = [dict(r) for r in self.loras]
        return params
