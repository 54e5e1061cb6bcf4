"""Typed, strict project configuration (``flywheel.toml``).

Every section is a pydantic model with ``extra="forbid"`` so a typo is an error, never a silently
ignored key. ``load_config`` turns validation errors into one ``ConfigError`` that names each bad key
by its dotted path (``ingest.min_side``) and suggests the closest valid key for unknown ones.
Stages add their own section model here as they land; the defaults are the documented behaviour.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from flywheel.config_api import ApiConfig
from flywheel.config_compute import ComputeConfig
from flywheel.config_base import Section
from flywheel.config_models import (
    ROLES,
    ModelsConfig,
    Precision,
    Quantization,
    RoleLoad,
)
from flywheel.config_routes import ControlNetSettings, DescribeSettings, EnrichRoutes, InpaintSettings
from flywheel.config_train import GenerateConfig, TrainConfig, TuneJudgeConfig
from flywheel.errors import ConfigError

__all__ = ["ROLES", "Config", "GenerateConfig", "ModelsConfig", "Precision", "Quantization", "RoleLoad", "Section",
           "TrainConfig", "TuneJudgeConfig", "load_config", "parse_config", "render_config_template"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_FILENAME = "flywheel.toml"
TRIGGER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{1,63}$")


class ProjectConfig(Section):
    name: str = Field(min_length=1, description="Human-readable name of the character/project.")
    trigger: str = Field(description="Trigger token the LoRA learns for the character, e.g. 'fw_astro'.")

    @field_validator("trigger")
    @classmethod
    def _trigger_is_one_token(cls, v: str) -> str:
        if not TRIGGER_RE.match(v):
            raise ValueError(
                "must be one word of 2-64 letters, digits, '_' or '-' (no spaces), e.g. 'fw_astro'; "
                "a rare token works best because the LoRA binds the character to it"
            )
        return v


class IngestConfig(Section):
    min_side: int = Field(256, ge=16, description="Reject images whose short side is below this (px).")
    max_pixels: int = Field(
        64_000_000, ge=1_000_000, description="Refuse to decode images above this many pixels (bombs)."
    )
    animated: Literal["first_frame", "refuse"] = "first_frame"
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    near_duplicate_distance: int = Field(
        6, ge=0, le=32, description="Max perceptual-hash Hamming distance (of 64 bits) for a near-duplicate."
    )
    detect_faces: bool = True


DEFAULT_CAPTION_PROMPT = (
    "Write one caption for this training image of the character {trigger}. Begin with the word {trigger}. "
    "Describe only what changes from picture to picture: {vary}. {traits}"
    "The word {trigger} already stands for the character's fixed look (face, body, hair), so never describe it. "
    "Write one or two plain sentences with no quotes, lists or preamble."
)


class CaptionConfig(Section):
    mode: Literal["vlm", "template"] = Field(
        "vlm", description="'vlm': the captioner writes captions; 'template': built from the edit recipe/prompt."
    )
    template_fallback: bool = Field(True, description="Use a template caption when the VLM output is unusable.")
    vary: list[str] = Field(
        default_factory=lambda: ["setting", "background", "lighting", "pose", "expression", "art style", "framing"],
        description="What captions describe: the things that vary between images.",
    )
    identity_traits: list[str] = Field(
        default_factory=list, description="Fixed traits captions leave out (the trigger carries them), e.g. 'red hair'."
    )
    strip_identity_traits: bool = Field(False, description="Remove listed traits from captions (else only flag).")
    prompt: str = Field(DEFAULT_CAPTION_PROMPT, description="Captioner prompt; placeholders {trigger} {vary} {traits}.")
    batch_size: int = Field(16, ge=1, le=256)
    max_new_tokens: int = Field(96, ge=8, le=2048)

    @field_validator("prompt")
    @classmethod
    def _prompt_placeholders(cls, v: str) -> str:
        try:
            v.format(trigger="t", vary="v", traits="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"bad placeholder ({err}); use only {{trigger}}, {{vary}} and {{traits}} (double literal braces: {{{{ }}}})"
            ) from None
        return v


class JudgeConfig(Section):
    structured_verdict: bool = Field(True, description="Also ask the VLM for a JSON verdict with reasons.")
    batch_size: int = Field(16, ge=1, le=256, description="Images judged per step (VLM calls batch them).")
    max_new_tokens: int = Field(192, ge=16, le=2048)
    # Identity: dlib face-embedding distance to the closest source face (0.6 is dlib's same-person line).
    max_face_distance: float = Field(0.6, gt=0.0, le=2.0)
    # dlib HOG detections scoring below this are ignored: weak hits are mostly patterns, not faces.
    min_face_score: float = Field(0.5, ge=0.0)
    no_face: Literal["defer", "needs_review", "reject", "ignore"] = Field(
        "defer", description="No face in the image or the sources: 'defer' to the VLM (needs_review without one)."
    )
    min_same_character_prob: float = Field(0.5, ge=0.0, le=1.0)
    # A tuned judge (`flywheel tune-judge`): its P(keep) on the question it learned from human reviews.
    min_keep_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Optional whole-image identity: a DINOv2 / CLIP hub id or folder ("none": off); cosine to the closest source.
    image_embedding_model: str = "none"
    min_image_similarity: float = Field(0.5, ge=-1.0, le=1.0)
    # Edit applied: share of pixels changed vs the parent, and the VLM's P(edit applied).
    min_changed_fraction: float = Field(0.05, ge=0.0, le=1.0)
    min_edit_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Quality: variance of the Laplacian at 512 px (0..1 intensities), estimated noise sigma, P(artifacts).
    min_sharpness: float = Field(0.0005, ge=0.0)
    max_noise_sigma: float = Field(0.04, gt=0.0)
    max_artifact_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Near-duplicate: perceptual-hash Hamming distance (of 64 bits) to a source or an accepted image.
    near_duplicate_distance: int = Field(6, ge=0, le=32)
    # ...confirmed by pixels: a relit or recoloured variant keeps its phash but is not a duplicate.
    near_duplicate_max_change: float = Field(0.05, ge=0.0, le=1.0)
    # Too close: a near or mirrored copy of a source (signals.copies) has a grey-image SSIM above this...
    max_copy_similarity: float = Field(0.9, ge=-1.0, le=1.0)
    # ...a median colour difference (CIE Delta E) at most this (a golden-hour relight moves colours by ~12)...
    max_copy_color_difference: float = Field(8.0, ge=0.0)
    # ...and, where both have a face, a face distance to that source below this (other photos: ~0.3-0.5).
    min_face_distance_copy: float = Field(0.25, ge=0.0, le=2.0)
    # Caption truth: the VLM's P("this caption describes this image") must be at least this.
    min_caption_match: float = Field(0.5, ge=0.0, le=1.0)
    # Coverage tags (flywheel.coverage): also ask the VLM for view, framing, expression and lighting (4 questions
    # per image that may enter the set, and per source); off: view and framing from face landmarks only.
    coverage_questions: bool = False


class EditorLora(Section):
    """One ``[[enrich.loras]]`` entry: a ``weight`` file from the ``hub`` repo, or a local ``path``, at ``scale``."""

    hub: str | None = Field(None, description="Hub repo id (owner/name) that holds the weight file.")
    weight: str | None = Field(None, description="The *.safetensors file in that repo (may include a subfolder).")
    path: Path | None = Field(None, description="A local *.safetensors file (relative: to the project folder).")
    scale: float = Field(1.0, ge=-8.0, le=8.0)

    @model_validator(mode="after")
    def _one_safetensors_source(self) -> EditorLora:
        if (self.hub is None) == (self.path is None):
            raise ValueError("give either hub = 'owner/name' with weight = 'file.safetensors', "
                             "or path = 'file.safetensors'")
        if self.hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.hub):
            raise ValueError(f"hub = {self.hub!r} is not a hub repo id (owner/name)")
        if self.hub is not None and not self.weight:
            raise ValueError(f"hub = {self.hub!r} needs weight = the .safetensors file to load from it")
        if self.path is not None and self.weight:
            raise ValueError("weight only goes with hub; a local file is given by path alone")
        name = self.weight or str(self.path)
        if not name.endswith(".safetensors"):
            raise ValueError(f"{name!r} is not a .safetensors file "
                             "(Flywheel loads safetensors only: pickles can run code)")
        return self


class EnrichConfig(Section):
    """``flywheel enrich``: identity-preserving edits of every source (recipes in ``flywheel.recipes``)."""

    backend: Literal["qwen-image-edit", "flux-kontext", "flux2-klein", "longcat-image-edit", "instruct-pix2pix",
                     "inpaint-sdxl", "inpaint-flux-fill", "sdxl-turbo-controlnet", "describe-generate",
                     "composite", "api"] = Field(
        "flux2-klein", description="'composite' is the CPU editor (person segmentation + compositing); unset: "
        "the [models] stack's backend"
    )
    routes: EnrichRoutes = Field(default_factory=EnrichRoutes, description="Another backend per recipe axis.")
    inpaint: InpaintSettings = Field(default_factory=InpaintSettings)
    controlnet: ControlNetSettings = Field(default_factory=ControlNetSettings)
    describe: DescribeSettings = Field(default_factory=DescribeSettings)
    recipes: list[str] = Field(
        default_factory=lambda: ["forest", "city_night", "beach", "sunset", "neon", "oil_painting", "anime",
                                 "left_view", "right_view", "close_up"],
        min_length=1, description="Recipe ids, axes (background, lighting, style, camera) or 'all'.",
    )
    seeds: int = Field(1, ge=1, le=64, description="Edits per source and recipe, with seeds seed, seed+1, ...")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1, le=64)
    references: int = Field(2, ge=0, le=8, description="Other sources passed as extra references (Qwen-Image-Edit).")
    extra_recipe_files: list[Path] = Field(default_factory=list, description="Your recipe TOML files.")
    # Editor settings: unset (None) = the [models] editor preset's value (docs/enrich.md lists the presets).
    steps: int | None = Field(None, ge=1, le=200, description="Denoising steps per edit.")
    guidance: float | None = Field(
        None, ge=0.0, le=30.0, description="Distilled guidance (FLUX.1 Kontext) or text guidance (InstructPix2Pix).")
    true_cfg: float | None = Field(
        None, ge=1.0, le=20.0, description="True CFG scale (Qwen-Image-Edit, Kontext); 1 = off, > 1 doubles the work.")
    negative_prompt: str | None = Field(None, description="What edits should avoid; used with true_cfg > 1.")
    max_area: int | None = Field(
        None, ge=64 * 64, le=4096 * 4096, description="Output size in pixels; the source's aspect ratio is kept.")
    scheduler_shift: float | None = Field(
        None, gt=0.0, le=20.0, description="Fixed flow-matching shift (Lightning LoRAs are distilled at 3).")
    loras: list[EditorLora] | None = Field(
        None, description="LoRAs on the editor (replace the preset's); [] = none, not even the preset's.")
    reference_area: int | None = Field(
        None, ge=64 * 64, le=4096 * 4096, description="Pixels each reference is resized to (FLUX.2 klein); "
        "unset = max_area. Smaller references = fewer tokens per step = faster edits.")
    speed: Literal["none", "compile", "compile-fp8", "auto"] | None = Field(
        None, description="Editor inference speed: regional torch.compile of the transformer blocks ('compile'; "
        "'auto' = compile on CUDA only), with torchao fp8 matmuls ('compile-fp8', CUDA 8.9+).")


class EvaluateConfig(Section):
    """``flywheel evaluate``: LoRA round vs round on held-out prompts and fixed seeds (docs/evaluation.md)."""

    prompts: list[str] = Field(
        default_factory=list, description="Held-out prompts with {trigger}; empty = the shipped evaluation set.")
    seed: int = Field(1000, description="First seed; each prompt is rendered with seeds seed .. seed+n-1.")
    seeds_per_prompt: int = Field(2, ge=1)
    image_embedder: str | None = Field(
        None, description="DINO/DINOv2 or CLIP hub id or folder for DINO / CLIP-I (e.g. facebook/dinov2-small).")
    clip_model: str | None = Field(None, description="CLIP hub id or folder for CLIP-T (prompt fidelity).")
    primary: Literal["auto", "recognisable", "face_distance", "dino", "clip_i", "clip_t", "judge_pass"] = "auto"
    judge_images: bool = Field(True, description="Judge the evaluation images, for the judge pass rate.")
    resamples: int = Field(2000, ge=100, le=100_000)


class LoopConfig(Section):
    """``flywheel run``: the whole data flywheel, resumable from the catalog."""

    rounds: int = Field(2, ge=1, le=10, description="LoRA rounds: v1 on sources + edits, v2 adds vetted synthetic.")
    sources: list[str] = Field(default_factory=list, description="Paths/globs ingested first (relative to the project).")
    review: Literal["auto", "needs_review", "all"] = Field(
        "needs_review", description="Gate before each dataset freeze: 'auto' lets the judge decide; 'needs_review' "
        "waits until every needs_review image has a human decision; 'all' waits for a decision on every image.")
    evaluate: bool = True


class Config(Section):
    """The whole ``flywheel.toml``."""

    project: ProjectConfig
    ingest: IngestConfig = IngestConfig()
    enrich: EnrichConfig = EnrichConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    caption: CaptionConfig = CaptionConfig()
    judge: JudgeConfig = JudgeConfig()
    tune_judge: TuneJudgeConfig = TuneJudgeConfig()
    models: ModelsConfig = ModelsConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    loop: LoopConfig = LoopConfig()
    api: ApiConfig = ApiConfig()  # OpenAI-compatible services (config_api.py, docs/api.md)
    compute: ComputeConfig = ComputeConfig()  # where batch stages run: here or on Ray (config_compute.py)

    @model_validator(mode="after")
    def _enrich_backend_from_stack(self) -> Config:
        """The [models] stack's editor needs its [enrich] backend, unless [enrich] backend is set explicitly."""
        from flywheel.models.stacks import STACKS

        if "backend" not in self.enrich.model_fields_set:
            self.enrich.__dict__["backend"] = STACKS[self.models.stack].enrich_backend
        return self


def _format_errors(err: ValidationError, data: dict[str, Any], source: str) -> str:
    lines = [f"{source} is not valid:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _model_at(Config, e["loc"][:-1])
            key = str(e["loc"][-1])
            close = difflib.get_close_matches(key, list(parent.model_fields), n=1) if parent else []
            tip = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"  {path}: unknown key{tip}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            lines.append(f"  {path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section model at a location path, to suggest valid keys for an unknown one."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def parse_config(data: dict[str, Any], source: str = CONFIG_FILENAME) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            _format_errors(err, data, source),
            hint=f"fix the keys above in {source}; `flywheel init` writes a commented example",
        ) from None


def load_config(path: Path) -> Config:
    """Read and validate a ``flywheel.toml``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", hint="run `flywheel init DIR` to create one") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", hint="check the file's permissions") from None
    try:
        text = raw.decode("utf-8-sig")  # TOML is UTF-8; a byte-order mark (Windows editors) is harmless
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line}, column {column}",
            hint="save flywheel.toml with the UTF-8 encoding (most editors: 'Save with encoding' > UTF-8)",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}", hint="check quotes and brackets on that line") from None
    return parse_config(data, str(path))


def render_config_template(name: str, trigger: str) -> str:
    """The commented ``flywheel.toml`` that ``flywheel init`` writes (the comments are the docs)."""
    template = (Path(__file__).parent / "data" / "flywheel.toml.template").read_text(encoding="utf-8")
    # Validate before writing so `init` never writes a config that `load_config` would refuse.
    parse_config({"project": {"name": name, "trigger": trigger}}, "--name/--trigger")
    return template.replace("{{name}}", _toml_string(name)).replace("{{trigger}}", _toml_string(trigger))


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
