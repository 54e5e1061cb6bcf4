"""``[models]``: which model plays each role and how it is loaded (split from config.py to keep files readable)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from flywheel.config_base import Section

Quantization = Literal["none", "nf4", "int8", "fp8"]
Precision = Literal["auto", "bfloat16", "float16", "float32"]
ROLES = ("vlm", "editor", "base")


class RoleLoad(Section):
    """``[models.overrides.<role>]``: how one role's model is loaded, where it differs from ``[models]``.

    Unset keys inherit ``[models]``. Roles: ``vlm`` (captioner and judge), ``editor``, ``base`` (the FLUX
    base for training, generation and evaluation).
    """

    device: Literal["auto", "cpu", "cuda"] | None = None
    dtype: Precision | None = None
    quantization: Quantization | None = None
    cpu_offload: bool | None = None


class ModelsConfig(Section):
    """``[models]``: which model plays each role, and how models are loaded (see docs/models.md).

    ``stack`` fills captioner, judge, editor and base (``flywheel.models.stacks``); a role set explicitly wins.
    The role defaults below are the default stack's, so ``ModelsConfig()`` is the same either way.
    """

    stack: str = Field("klein4b", description="Named model set for every role (`flywheel models list`).")
    captioner: str = Field("qwen3-vl-4b", description="Preset name, local folder or hub id of the captioner VLM.")
    judge: str = Field("qwen3-vl-4b", description="Preset name, local folder or hub id of the judge VLM.")
    editor: str = Field("flux2-klein-4b",
                        description="Preset name, local folder or hub id of the editor.")
    base: str = Field("flux2-klein-base-4b", description="Preset name, local folder or hub id of the text-to-image base.")
    quantization: Quantization = Field(
        "none", description="Weights of every role's model: none, nf4 / int8 (bitsandbytes), fp8 (diffusion "
        "models only: fp8 storage, bf16 compute). Per role: [models.overrides.<role>].")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Precision = Field("auto", description="'auto': the preset's dtype on a GPU (bf16), float32 on CPU.")
    vlm_max_pixels: int = Field(1024 * 1024, ge=56 * 56, description="Images are downscaled to this many pixels.")
    vlm_batch_size: int = Field(16, ge=1, le=512, description="Requests per VLM forward pass (captions, judge).")
    vlm_compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Captions: static KV cache + torch.compile'd decode step with CUDA graphs. 'auto': on "
        "with a CUDA GPU and unquantized weights for a stage of enough images to win the one-off compilation "
        "back, off on CPU and for small stages (docs/models.md, VLM speed).")
    cpu_offload: bool = False
    trust_remote_code: bool = False
    overrides: dict[Literal["vlm", "editor", "base"], RoleLoad] = Field(
        default_factory=dict, description="Per-role load settings, e.g. [models.overrides.editor] cpu_offload = true.")

    def for_role(self, role: str) -> dict[str, Any]:
        """device / dtype / quantization / cpu_offload for ``role`` ('vlm', 'editor', 'base' or the loader's
        'text_to_image'), with the role's overrides applied."""
        role = "base" if role == "text_to_image" else role
        settings: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "quantization": self.quantization,
                                    "cpu_offload": self.cpu_offload}
        override = self.overrides.get(role)  # type: ignore[call-overload]
        if override is not None:
            settings.update(override.model_dump(exclude_none=True))
        return settings

    @field_validator("stack")
    @classmethod
    def _known_stack(cls, v: str) -> str:
        from flywheel.models.stacks import STACKS, suggest_stack

        if v in STACKS:
            return v
        close = suggest_stack(v)
        raise ValueError(f"unknown stack '{v}'" + (f"; did you mean '{close}'?" if close else "")
                         + f" (stacks: {', '.join(STACKS)}; `flywheel models list` shows them)")

    @model_validator(mode="after")
    def _fill_roles_from_stack(self) -> ModelsConfig:
        """Roles not set explicitly take the stack's model (written past validate_assignment: they are
        the stack's presets, and must stay out of ``model_fields_set`` so a later stack change still fills them)."""
        from flywheel.models.stacks import STACKS

        for key, spec in STACKS[self.stack].roles().items():
            if key not in self.model_fields_set:
                self.__dict__[key] = spec
        return self

    @field_validator("captioner", "judge", "editor", "base")
    @classmethod
    def _known_model(cls, v: str, info: ValidationInfo) -> str:
        from flywheel.models.hub import looks_like_path
        from flywheel.models.presets import PRESETS, suggest

        if v == "none" and info.field_name == "judge":  # judge on pixel signals only (docs/judging.md)
            return v
        if v == "api" or v.startswith("api:"):  # an OpenAI-compatible service ([api], docs/api.md)
            return v
        if v == "tiny" or v in PRESETS or looks_like_path(v) or v.count("/") == 1:
            return v
        close = suggest(v)
        raise ValueError(
            "not a preset name, a folder or a hub id (owner/name)"
            + (f"; did you mean '{close}'?" if close else "")
            + " (`flywheel models list` shows the presets)"
        )
