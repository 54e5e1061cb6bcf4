"""Config: the written template, example configs, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.config import load_config, parse_config, render_config_template
from flywheel.errors import ConfigError
from flywheel.project import init_project, open_project

EXAMPLES = sorted((Path(__file__).parents[1] / "configs" / "examples").glob("*.toml"))


def test_init_writes_a_commented_config_that_loads(tmp_path):
    cfg_path = init_project(tmp_path / "p", name='Zoë "Z" O\'Neil', trigger="fw_zoe")
    text = cfg_path.read_text()
    assert text.count("\n#") > 10  # the comments are the docs
    cfg = load_config(cfg_path)
    assert cfg.project.name == 'Zoë "Z" O\'Neil' and cfg.project.trigger == "fw_zoe"
    assert (tmp_path / "p" / ".flywheel" / "catalog.sqlite").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_loads(path):
    assert load_config(path).project.trigger


def test_examples_exist():
    assert EXAMPLES, "configs/examples/ must hold commented example configs"


def test_unknown_key_names_its_path_and_suggests_the_right_one():
    with pytest.raises(ConfigError) as err:
        parse_config({"project": {"name": "x", "trigger": "fw_x"}, "ingest": {"min_sides": 10}})
    assert "ingest.min_sides: unknown key (did you mean 'min_side'?)" in str(err.value)


def test_wrong_type_and_missing_keys_are_named():
    with pytest.raises(ConfigError) as err:
        parse_config({"project": {"name": "x"}, "ingest": {"min_side": "big", "animated": "all"}})
    msg = str(err.value)
    assert "project.trigger: required key is missing" in msg
    assert "ingest.min_side: Input should be a valid integer" in msg and "'big'" in msg
    assert "ingest.animated: Input should be 'first_frame' or 'refuse'" in msg


def test_bad_trigger_explains_what_a_trigger_is():
    with pytest.raises(ConfigError, match="must be one word"):
        parse_config({"project": {"name": "x", "trigger": "two words"}})
    with pytest.raises(ConfigError, match="must be one word"):
        render_config_template("x", "two words")


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "flywheel.toml"
    bad.write_text("[project\nname = 'x'\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_init_refuses_to_overwrite_and_open_finds_project_from_subfolder(tmp_path):
    init_project(tmp_path / "p", name="x", trigger="fw_x")
    with pytest.raises(ConfigError, match="already exists"):
        init_project(tmp_path / "p", name="y", trigger="fw_y")
    (tmp_path / "p" / "deep" / "er").mkdir(parents=True)
    with open_project(tmp_path / "p" / "deep" / "er") as project:
        assert project.root == (tmp_path / "p").resolve()
