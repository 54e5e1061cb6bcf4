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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flywheel.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_FILENAME = "flywheel.toml"
TRIGGER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{1,63}$")


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class Config(Section):
    """The whole ``flywheel.toml``."""

    project: ProjectConfig
    ingest: IngestConfig = IngestConfig()


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", hint="run `flywheel init DIR` to create one") from None
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
