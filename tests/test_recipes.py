"""Edit recipes: the shipped set, selection, user files, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.config import parse_config
from flywheel.errors import ConfigError
from flywheel.recipes import AXES, SHIPPED_RECIPES, load_recipes, parse_recipe_file

SEED_PROMPTS = [
    "Change the background to a forest, keep everything else the same.",
    "Make the lighting look like sunset, keep the subject identical.",
    "Convert this to an oil painting style, preserve the person's features exactly.",
    "Change camera angle to slightly left view, maintain character appearance.",
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """
[recipes.library]
axis = "background"
prompt = "Put the character in a cosy library"
keep = "Keep the face identical."
composite = { scene = "studio", colors = [[120, 90, 60], [40, 30, 20]] }
"""


def test_shipped_recipes_cover_every_axis_and_include_the_seed_prompts():
    book = load_recipes()
    for axis in AXES:
        assert len([r for r in book.recipes.values() if r.axis == axis]) >= 5, axis
    prompts = [r.prompt for r in book.recipes.values()]
    for prompt in SEED_PROMPTS:
        assert prompt in prompts
    forest = book.recipes["forest"]
    assert forest.full_prompt == f"{forest.prompt} {forest.keep}"
    assert all(r.keep and r.caption and r.composite.axis == r.axis for r in book.recipes.values())
    assert set(book.origins.values()) == {str(SHIPPED_RECIPES)}


def test_select_by_id_axis_and_all_keeps_order_without_repeats():
    book = load_recipes()
    chosen = book.select(["sunset", "lighting", "forest"])
    ids = [r.id for r in chosen]
    assert ids[0] == "sunset" and ids[-1] == "forest" and len(ids) == len(set(ids))
    assert {r.axis for r in chosen[:-1]} == {"lighting"}
    assert len(book.select(["all"])) == len(book.recipes)
    with pytest.raises(ConfigError, match=r"unknown recipe or axis 'forrest'.*did you mean 'forest'"):
        book.select(["forrest"])


def test_user_file_adds_recipes_and_prompt_gets_a_full_stop(tmp_path):
    write(tmp_path, "mine.toml", GOOD)
    book = load_recipes([Path("mine.toml")], base=tmp_path)
    library = book.recipes["library"]
    assert book.origins["library"] == str(tmp_path / "mine.toml")
    assert library.full_prompt == "Put the character in a cosy library. Keep the face identical."
    assert library.composite.colors == [(120, 90, 60), (40, 30, 20)]


def test_duplicate_id_across_files_names_both_files(tmp_path):
    path = write(tmp_path, "mine.toml", GOOD.replace("recipes.library", "recipes.forest"))
    with pytest.raises(ConfigError) as err:
        load_recipes([path])
    msg = str(err.value)
    assert str(path) in msg and "recipes.forest" in msg and str(SHIPPED_RECIPES) in msg


def test_duplicate_id_in_one_file_names_the_file(tmp_path):
    path = write(tmp_path, "mine.toml", GOOD + GOOD)
    with pytest.raises(ConfigError, match="mine.toml is not valid TOML"):
        parse_recipe_file(path)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('axis = "background"', 'axis = "lightning"', "recipes.library.axis: Input should be"),
        ('scene = "studio"', 'scene = "moon"', "recipes.library.composite.scene: Input should be"),
        ("composite = { scene", "composite = { blurr = 1, scene", "recipes.library.composite.blurr: unknown key"),
        ('keep = "Keep the face identical."\n', "", "recipes.library.keep: required key is missing"),
        ("prompt =", "colour = 1\nprompt =", "recipes.library.colour: unknown key"),
        ("[recipes.library]", "[recipes.lighting]", "'lighting' is reserved"),
        ('scene = "studio"', 'scene = "forest"', "'colors' only applies to scene = 'studio'"),
    ],
)
def test_bad_recipe_names_file_and_key(tmp_path, old, new, expected):
    path = write(tmp_path, "bad.toml", GOOD.replace(old, new))
    with pytest.raises(ConfigError) as err:
        parse_recipe_file(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unknown_axis_reports_only_the_axis(tmp_path):
    path = write(tmp_path, "bad.toml", GOOD.replace('axis = "background"', 'axis = "sound"'))
    with pytest.raises(ConfigError) as err:
        parse_recipe_file(path)
    assert "recipes.library.axis" in str(err.value) and "composite" not in str(err.value).split("hint")[0]


def test_missing_recipe_file_and_stray_top_level_keys(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.toml"):
        load_recipes(["nope.toml"], base=tmp_path)
    path = write(tmp_path, "stray.toml", "title = 'x'\n" + GOOD)
    with pytest.raises(ConfigError, match=r"stray.toml: expected only \[recipes.ID\] tables.*'title'"):
        parse_recipe_file(path)


def test_enrich_config_section_is_strict():
    cfg = parse_config({"project": {"name": "A", "trigger": "fw_a"}, "enrich": {"backend": "composite", "seeds": 2}})
    assert cfg.enrich.backend == "composite" and cfg.enrich.seeds == 2 and "forest" in cfg.enrich.recipes
    with pytest.raises(ConfigError, match=r"enrich.backend"):
        parse_config({"project": {"name": "A", "trigger": "fw_a"}, "enrich": {"backend": "dalle"}})
    with pytest.raises(ConfigError, match=r"enrich.seed_count: unknown key"):
        parse_config({"project": {"name": "A", "trigger": "fw_a"}, "enrich": {"seed_count": 2}})
