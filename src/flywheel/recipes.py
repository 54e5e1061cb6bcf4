"""Edit recipes: the data ``flywheel enrich`` applies to every source image.

A recipe is one edit along one axis (``background``, ``lighting``, ``style``, ``camera``): the prompt a
generative editor follows, the ``keep`` clause that says what must not change (appended to the prompt,
because editors drift identity unless told), and a ``composite`` spec, the recipe as parameters for the
CPU composite editor, which cannot read prompts. Recipes ship in ``flywheel/data/recipes.toml``; users
add their own files via ``[enrich] extra_recipe_files``. A file looks like::

    [recipes.forest]
    axis = "background"
    prompt = "Change the background to a forest, keep everything else the same."
    keep = "Keep the person's face, hair, outfit and pose identical."
    caption = "standing in a forest, trees in the background"
    composite_caption = "in front of an illustrated forest backdrop"   # optional: what the CPU editor makes
    composite = { scene = "forest" }

Every problem is reported as a ``ConfigError`` naming the file and the key path (``recipes.forest.axis``).
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SHIPPED_RECIPES = Path(__file__).parent / "data" / "recipes.toml"
AXES = ("background", "lighting", "style", "camera")
Axis = Literal["background", "lighting", "style", "camera"]
Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[Channel, Channel, Channel]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackgroundSpec(Spec):
    """Cut the subject out (person segmentation) and place it on a procedurally drawn scene."""

    axis: Literal["background"] = "background"
    scene: Literal["forest", "city_night", "beach", "snowy_mountain", "studio", "desert"]
    colors: list[RGB] = Field(default_factory=list, max_length=2, description="studio only: backdrop centre, edge")
    blur: float = Field(0.0, ge=0.0, le=10.0, description="extra depth-of-field blur of the scene (px at 512 px)")
    harmonize: Unit = Field(0.25, description="how far the subject's LAB mean and spread move toward the scene "
                            "around it")

    @model_validator(mode="after")
    def _colors_only_for_studio(self) -> BackgroundSpec:
        if self.colors and self.scene != "studio":
            raise ValueError("'colors' only applies to scene = 'studio'")
        return self


class LightingSpec(Spec):
    """Relight the whole image: LAB colour transfer toward a tint, a directional colour gradient, a rim."""

    axis: Literal["lighting"] = "lighting"
    tint: RGB = (255, 255, 255)
    tint_strength: Unit = 0.0
    brightness: float = Field(1.0, ge=0.2, le=2.0)
    contrast: float = Field(1.0, ge=0.3, le=2.0)
    saturation: float = Field(1.0, ge=0.0, le=2.0)
    gradient: list[RGB] = Field(default_factory=list, max_length=2, description="light side, far side")
    gradient_angle: float = Field(0.0, ge=-360, le=360, description="where light comes from: 0 left, 90 top")
    gradient_strength: Unit = 0.0
    rim: RGB | None = None
    rim_strength: Unit = 0.0
    rim_angle: float = Field(0.0, ge=-360, le=360, description="side the rim light comes from: 0 left, 90 top")
    vignette: Unit = 0.0

    @model_validator(mode="after")
    def _gradient_has_two_stops(self) -> LightingSpec:
        if self.gradient and len(self.gradient) != 2:
            raise ValueError("'gradient' needs exactly two colours: [light side, far side]")
        return self


class StyleSpec(Spec):
    """Re-render the image with an OpenCV filter chain (edge-preserving, stylization, quantisation...)."""

    axis: Literal["style"] = "style"
    filter: Literal["oil", "watercolor", "cel", "pencil", "render", "halftone"]
    strength: Unit = Field(1.0, description="blend of the filtered image over the original")
    colors: int = Field(12, ge=2, le=64, description="cel: palette size after quantisation")


class CameraSpec(Spec):
    """Approximate a camera change in 2D: perspective warp (yaw/pitch/roll), zoom about a focus, flip."""

    axis: Literal["camera"] = "camera"
    yaw: float = Field(0.0, ge=-30, le=30, description="degrees; positive turns the view to the subject's left")
    pitch: float = Field(0.0, ge=-30, le=30, description="degrees; positive looks up at the subject (low angle)")
    roll: float = Field(0.0, ge=-30, le=30)
    zoom: float = Field(1.0, ge=0.5, le=3.0, description=">1 closer, <1 wider (the margin is a blurred extension)")
    focus: Literal["face", "subject", "center"] = "subject"
    flip: bool = False


# Each spec carries its axis (filled in from the recipe) so pydantic picks the right schema.
CompositeSpec = Annotated[
    Union[BackgroundSpec, LightingSpec, StyleSpec, CameraSpec], Field(discriminator="axis")
]


class Recipe(BaseModel):
    """One edit. ``full_prompt`` is what a generative editor receives; ``composite`` what the CPU editor uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z][a-z0-9_\-]{0,63}$")
    axis: Axis
    prompt: str = Field(min_length=1)
    keep: str = Field(min_length=1, description="what must stay the same, e.g. 'Keep the face identical.'")
    caption: str | None = Field(None, min_length=1, description="what the result shows, for template captions")
    composite_caption: str | None = Field(
        None, min_length=1, description="what the CPU composite editor's result really shows, when it differs "
        "from 'caption' (a posterise filter is not an anime illustration; a 2D warp is not a low angle)")
    composite: CompositeSpec

    @model_validator(mode="before")
    @classmethod
    def _tag_spec_with_axis(cls, data: Any) -> Any:
        # The spec's schema depends on the recipe's axis; hand the axis to the discriminator.
        if isinstance(data, dict) and isinstance(data.get("composite"), dict) and data.get("axis") in AXES:
            data = {**data, "composite": {**data["composite"], "axis": data["axis"]}}
        return data

    @model_validator(mode="after")
    def _id_is_not_an_axis(self) -> Recipe:
        if self.id in (*AXES, "all"):
            raise ValueError(f"'{self.id}' is reserved (it selects a whole axis in [enrich] recipes); rename it")
        return self

    def caption_for(self, backend: str) -> str | None:
        """The template caption for edits made by ``backend``: the composite editor's own when it has one."""
        if backend == "composite" and self.composite_caption:
            return self.composite_caption
        return self.caption

    @property
    def full_prompt(self) -> str:
        prompt = self.prompt.strip()
        if prompt[-1] not in ".!?":
            prompt += "."
        return f"{prompt} {self.keep.strip()}"


@dataclass
class RecipeBook:
    """All known recipes in file order (shipped first), with the file each came from."""

    recipes: dict[str, Recipe] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def select(self, names: list[str]) -> list[Recipe]:
        """Recipes named by id, by axis (all of that axis) or 'all'; in the order given, each once."""
        chosen: dict[str, Recipe] = {}
        for name in names:
            if name == "all":
                matches = list(self.recipes.values())
            elif name in AXES:
                matches = [r for r in self.recipes.values() if r.axis == name]
            elif name in self.recipes:
                matches = [self.recipes[name]]
            else:
                close = difflib.get_close_matches(name, [*self.recipes, *AXES], n=3)
                tip = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                raise ConfigError(
                    f"enrich.recipes: unknown recipe or axis '{name}'{tip}",
                    hint=f"use a recipe id, an axis ({', '.join(AXES)}) or 'all'; "
                    f"known ids: {', '.join(self.recipes)}",
                )
            for recipe in matches:
                chosen.setdefault(recipe.id, recipe)
        return list(chosen.values())


def load_recipes(extra_files: list[Path] | tuple[Path, ...] = (), *, base: Path | None = None) -> RecipeBook:
    """The shipped recipes plus the user's files (relative paths resolve against ``base``)."""
    book = RecipeBook()
    for path in [SHIPPED_RECIPES, *(_resolve(Path(p), base) for p in extra_files)]:
        for recipe in parse_recipe_file(path):
            if recipe.id in book.recipes:
                raise ConfigError(
                    f"{path}: recipes.{recipe.id}: duplicate recipe id, already defined in {book.origins[recipe.id]}",
                    hint="give your recipe another id (ids must be unique across the shipped and your files)",
                )
            book.recipes[recipe.id] = recipe
            book.origins[recipe.id] = str(path)
    return book


def _resolve(path: Path, base: Path | None) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() or base is None else base / path


def parse_recipe_file(path: Path) -> list[Recipe]:
    """Read and validate one recipe file; all problems in it are reported together."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"recipe file not found: {path}", hint="fix the path in [enrich] extra_recipe_files (relative to the project)"
        ) from None
    except tomllib.TOMLDecodeError as err:
        # TOML itself refuses a table defined twice, so a duplicate id inside one file lands here.
        raise ConfigError(f"{path} is not valid TOML: {err}", hint="check quotes, brackets and repeated [recipes.ID] tables") from None
    unknown = [k for k in data if k != "recipes"]
    if unknown or not isinstance(data.get("recipes"), dict):
        raise ConfigError(
            f"{path}: expected only [recipes.ID] tables" + (f", found top-level key(s) {unknown}" if unknown else ""),
            hint="write each recipe as a [recipes.ID] table with axis, prompt, keep and composite",
        )
    recipes, problems = [], []
    for rid, raw in data["recipes"].items():
        if not isinstance(raw, dict):
            problems.append(f"  recipes.{rid}: must be a table with axis, prompt, keep and composite")
            continue
        if "id" in raw:
            problems.append(f"  recipes.{rid}.id: the id is the table name; remove this key")
            continue
        try:
            recipes.append(Recipe.model_validate({"id": rid, **raw}))
        except ValidationError as err:
            problems.extend(_format(err, rid, raw))
    if problems:
        raise ConfigError(
            f"{path} has invalid recipes:\n" + "\n".join(problems),
            hint=f"fix the keys above; see {SHIPPED_RECIPES.name} in the Flywheel package for working examples",
        )
    return recipes


def _format(err: ValidationError, rid: str, raw: dict[str, Any]) -> list[str]:
    axis_ok = raw.get("axis") in AXES
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc[:1] == ["composite"]:
            if not axis_ok and "axis" in raw:
                continue  # the spec cannot be checked against an unknown axis; the axis error says why
            loc = ["composite", *loc[2:]] if len(loc) > 1 and loc[1] in AXES else loc
        key = ".".join(["recipes", rid, *loc]) if loc else f"recipes.{rid}"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return lines
