"""[models] stack: one choice fills every role (explicit keys win), and a non-commercial licence is said once."""

from __future__ import annotations

import json
import logging
import typing

import pytest

from flywheel.config import EnrichConfig, ModelsConfig, parse_config
from flywheel.enrich import BACKEND_FAMILY, editor_spec
from flywheel.errors import ConfigError
from flywheel.models.pool import recorded_load
from flywheel.models.presets import PRESETS, get_preset
from flywheel.models.stacks import DEFAULT_STACK, ROLE_KEYS, STACKS
from flywheel.project import init_project, open_project

PROJECT = {"project": {"name": "A", "trigger": "fw_a"}}
ROLE_OF_KEY = {"captioner": "vlm", "judge": "vlm", "editor": "editor", "base": "text_to_image"}


def test_a_stack_fills_every_role_and_the_enrich_backend_unless_set_explicitly():
    cfg = parse_config({**PROJECT, "models": {"stack": "flux1-kontext"}})
    assert (cfg.models.editor, cfg.models.base, cfg.enrich.backend) == ("flux-kontext-dev", "flux-dev", "flux-kontext")
    assert cfg.models.model_fields_set == {"stack"}  # filled roles stay "not set": a later stack change refills them
    explicit = parse_config({**PROJECT, "models": {"stack": "flux1-kontext", "editor": "instruct-pix2pix",
                                                  "judge": "none"}, "enrich": {"backend": "instruct-pix2pix"}})
    assert (explicit.models.editor, explicit.models.judge, explicit.models.captioner) == \
        ("instruct-pix2pix", "none", "qwen2-vl-2b")
    assert explicit.enrich.backend == "instruct-pix2pix"
    cfg.models.stack = "tiny"  # assignment re-validates: the roles the user never set follow the new stack
    assert {k: getattr(cfg.models, k) for k in ROLE_KEYS} == dict.fromkeys(ROLE_KEYS, "tiny")


def test_the_default_stack_is_klein4b_and_the_field_defaults_are_its_roles():
    """New projects get klein4b (docs/models.md: the only stack that fits 24 GB and is open for commercial use;
    its whole loop ran under a 24 GiB cap on an H200). ModelsConfig() is the same with or without the stack."""
    models = ModelsConfig()
    assert models.stack == DEFAULT_STACK == "klein4b"
    assert STACKS["klein4b"].roles() == {k: ModelsConfig.model_fields[k].default for k in ROLE_KEYS} == \
        {"captioner": "qwen3-vl-4b", "judge": "qwen3-vl-4b", "editor": "flux2-klein-4b", "base": "flux2-klein-base-4b"}
    assert parse_config(PROJECT).enrich.backend == EnrichConfig.model_fields["backend"].default == "flux2-klein"
    flux1 = parse_config({**PROJECT, "models": {"stack": "flux1"}})  # the previous default, one line away
    assert (flux1.models.editor, flux1.models.base, flux1.enrich.backend) == \
        ("qwen-image-edit-2511-lightning", "flux-dev", "qwen-image-edit")


def test_an_unknown_stack_is_a_config_error_naming_the_closest_one():
    with pytest.raises(ConfigError) as err:
        parse_config({**PROJECT, "models": {"stack": "flux-1"}})
    assert "models.stack: Value error, unknown stack 'flux-1'; did you mean 'flux1'? (stacks: flux1, " in str(err.value)
    with pytest.raises(ConfigError, match="unknown stack 'zzz' \\(stacks: "):
        parse_config({**PROJECT, "models": {"stack": "zzz"}})


@pytest.mark.parametrize("name", list(STACKS))
def test_every_stack_names_presets_in_their_roles_and_the_backend_its_editor_needs(name):
    stack = STACKS[name]
    for key, spec in stack.roles().items():
        preset = get_preset(spec, ROLE_OF_KEY[key])  # type: ignore[arg-type]
        assert preset is not None and preset.role == ROLE_OF_KEY[key], (key, spec)
    assert stack.enrich_backend in typing.get_args(EnrichConfig.model_fields["backend"].annotation)
    editor = get_preset(stack.editor, "editor")
    assert editor is not None and BACKEND_FAMILY[stack.enrich_backend] == editor.family
    cfg = parse_config({**PROJECT, "models": {"stack": name}})
    assert editor_spec(cfg.enrich, cfg.models) == stack.editor  # enrich runs the stack's editor, not a stand-in


def test_a_backend_set_against_the_stack_runs_its_own_default_editor_and_an_explicit_clash_is_an_error():
    cfg = parse_config({**PROJECT, "models": {"stack": "flux1-kontext"}, "enrich": {"backend": "qwen-image-edit"}})
    assert editor_spec(cfg.enrich, cfg.models) == "qwen-image-edit-2511-lightning"
    clash = parse_config({**PROJECT, "models": {"stack": "flux1-kontext", "editor": "flux-kontext-dev"},
                          "enrich": {"backend": "qwen-image-edit"}})
    with pytest.raises(ConfigError, match="backend = 'qwen-image-edit', but \\[models\\] editor = 'flux-kontext-dev'"):
        editor_spec(clash.enrich, clash.models)


def _load(catalog, spec: str, role: str) -> None:
    with recorded_load(catalog, "generate", spec, {"role": role}) as record:
        record(spec, {})


def test_a_non_commercial_model_prints_its_licence_once_per_project(tmp_path, caplog):
    """Every recorded load passes through the notice: the first load of flux-dev in a project logs one WARNING
    with the licence and its URL and marks the load row; later loads (any process) say nothing."""
    licence = PRESETS["flux-dev"].licence
    assert licence is not None and not licence.commercial
    roots = [init_project(tmp_path / name, name="A", trigger="fw_a") for name in ("one", "two")]
    caplog.set_level(logging.WARNING, logger="flywheel.models.licences")
    with open_project(roots[0]) as project:
        _load(project.catalog, "flux-dev", "text_to_image")
        _load(project.catalog, "qwen2-vl-2b", "vlm")  # Apache-2.0: nothing to say
    with open_project(roots[0]) as project:  # a new process, the same project
        _load(project.catalog, "black-forest-labs/FLUX.1-dev", "base")  # the trainer's hub-id load of the same model
        rows = [json.loads(r["params_json"]) for r in project.catalog.query(
            "SELECT params_json FROM operations WHERE kind = 'model_call' ORDER BY id")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [(f"model 'flux-dev' is under the {licence.name} licence, which does not allow commercial use "
                         f"of the model: {licence.url} (shown once per project)")]
    assert [r.get("licence_notice") for r in rows] == ["flux-dev", None, None]
    assert all(r["action"] == "load" for r in rows)
    with open_project(roots[1]) as other:  # another project is told again
        _load(other.catalog, "flux-dev", "text_to_image")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_a_new_project_changes_every_role_by_changing_the_stack_line(tmp_path):
    """`flywheel init` writes the roles commented out: editing `stack` is the one change; an uncommented role wins."""
    from click.testing import CliRunner

    from flywheel.cli import main

    root = tmp_path / "p"
    assert CliRunner().invoke(main, ["init", str(root), "--name", "A", "--trigger", "fw_a"]).exit_code == 0
    toml = root / "flywheel.toml"
    text = toml.read_text()
    assert '\nstack = "klein4b"\n' in text and '\n# judge = "qwen3-vl-4b"' in text
    toml.write_text(text.replace('\nstack = "klein4b"\n', '\nstack = "flux1-kontext"\n')
                    .replace('\n# judge = "qwen3-vl-4b"', '\njudge = "none"'))
    listing = CliRunner().invoke(main, ["-C", str(root), "models", "list"])
    assert listing.exit_code == 0, listing.output
    assert listing.output.splitlines()[-1] == ("This project: stack flux1-kontext; captioner qwen2-vl-2b, judge none, "
                                               "editor flux-kontext-dev, base flux-dev; [enrich] backend flux-kontext.")
