"""LoRA families: what differs between base models the trainer can train on, behind one small protocol.

``flywheel.train`` runs one loop for every family (buckets, caches, optimizer, checkpoints, resume, the
NaN stop, samples, catalog rows). A family supplies only what is specific to its architecture: how its
pipeline loads, how a prompt and an image are encoded for the cache, how a cached batch becomes the
transformer's inputs and the flow-matching loss, which Linear layers a LoRA can target and what the
exported files are called, how a training sample is rendered, and which model renders its LoRAs later.

A new family (Qwen-Image, Z-Image) is one new module with a class like ``flux2_klein.Flux2Klein`` and one
line in ``_FAMILIES``; the diffusers pipeline class in the base folder's ``model_index.json`` picks it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flywheel.errors import ConfigError

if TYPE_CHECKING:
    from flywheel.training.flux_step import Batch

# diffusers pipeline class (model_index.json) -> (module, class) of its training family.
_FAMILIES: dict[str, tuple[str, str]] = {
    "FluxPipeline": ("flywheel.training.families.flux1", "Flux1"),
    "Flux2KleinPipeline": ("flywheel.training.families.flux2_klein", "Flux2Klein"),
}


class Family(Protocol):
    name: str                     # recorded with the run ("flux1", "flux2_klein")
    label: str                    # for messages ("FLUX.1", "FLUX.2 klein")
    linears: tuple[str, ...]      # the transformer's Linear layers by name, "{i}" for a block index
    containers: tuple[str, ...]   # non-Linear modules a target name could also match (peft refuses them)
    sample_guidance: float        # CFG / distilled guidance of training samples

    def load(self, base: str, load: Any) -> tuple[Any, str, Any]:
        """(pipeline on the CPU, its source folder, its dtype) for a ``setup.BaseLoad``."""

    def text_encoders(self, pipe) -> list:
        """The text encoder modules (moved to the GPU for caching, then released)."""

    def encode_text(self, pipe, prompt: str, *, max_sequence_length: int) -> dict[str, Any]:
        """One prompt's cached tensors (float32), e.g. {"prompt_embeds": (1, L, D)}."""

    def encode_latent(self, vae, pixels) -> Any:
        """The normalised latent (1, C, h, w) the transformer learns, of pixels (1, 3, H, W) in [-1, 1]."""

    def batch(self, latents: list, texts: list[dict], device, dtype) -> Batch:
        """One bucket's cached latents and text tensors as a ``Batch`` on ``device``."""

    def image_seq_len(self, latents) -> int:
        """Image tokens of a latent batch: the resolution-dependent timestep shift uses it."""

    def loss(self, transformer, batch: Batch, noise, sigmas, *, guidance: float = 1.0):
        """Flow-matching MSE between the predicted and the true velocity ``noise - x0`` for one noised batch."""

    def nameable(self, module: str) -> bool:
        """Whether the exported ComfyUI / kohya file can name a LoRA on ``module`` (checked before training)."""

    def export(self, state: dict, run_dir: Path, transformer) -> list[tuple[str, Path]]:
        """Files besides the diffusers LoRA (ComfyUI / kohya formats) as (artifact kind, path)."""

    def sample_pipeline(self, pipe, transformer):
        """A pipeline that renders from cached text tensors with ``transformer`` (no text encoders)."""

    def sample_kwargs(self, text: dict, empty: dict, device, dtype) -> dict[str, Any]:
        """The pipeline's prompt arguments for one cached prompt (``empty``: the "" prompt, for CFG)."""

    def generate_model(self, spec: str) -> str | None:
        """The model that renders this base's LoRAs in generate / evaluate, if not the base itself."""


def load_on_cpu(pipeline_cls, base: str, load: Any) -> tuple[Any, str, Any]:
    """``Family.load`` for a diffusers pipeline class: the base through the one FLUX loader, left on the CPU
    (the trainer places each component), the memory check at the precision training will hold it in."""
    from flywheel.models.flux import _load_pipeline

    pipe, source, _, dtype = _load_pipeline(pipeline_cls, base, dtype=load.dtype, device=load.device,
                                            cpu_offload=load.cpu_offload, quantization="none", place=False,
                                            check_precision=load.quantize)
    return pipe, source, dtype


def family_for_folder(folder: str | Path) -> Family:
    """The training family of a diffusers base folder, by the pipeline class its model_index.json names."""
    from flywheel.models.hub import read_json

    cls = read_json(Path(folder) / "model_index.json").get("_class_name", "")
    if cls == "Flux2KleinKVPipeline":
        raise ConfigError(f"{folder} is FLUX.2 klein 9B KV, a distilled editor: LoRAs train on a klein base",
                          hint="set [models] base = 'flux2-klein-base-4b' (or 'flux2-klein-base-9b')")
    if cls not in _FAMILIES:
        raise ConfigError(f"{folder} holds a {cls or 'unknown'} pipeline, which Flywheel cannot train LoRAs on",
                          hint="LoRA bases: " + ", ".join(_FAMILIES) + " (e.g. [models] base = 'flux-dev' or "
                          "'flux2-klein-base-4b')")
    module, name = _FAMILIES[cls]
    return getattr(importlib.import_module(module), name)()


def families() -> list[str]:
    return list(_FAMILIES)
