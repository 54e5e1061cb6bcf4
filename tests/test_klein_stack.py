"""The klein stacks: ``flywheel run`` completes on ``tiny-klein`` (klein edits, a LoRA trained on the klein base
twin, generation and evaluation on the distilled klein twin), and ``klein4b`` is Apache-2.0 end to end."""

from __future__ import annotations

import json
from pathlib import Path

from flywheel.loop import run_loop
from flywheel.models.presets import get_preset
from flywheel.models.stacks import STACKS
from flywheel.project import open_project
from flywheel.sample import write_sample

KLEIN_LOOP = """
[project]
name = "Astronaut"
trigger = "fw_astro"
[loop]
rounds = 2
sources = ["sources"]
review = "auto"
[models]
stack = "tiny-klein"
judge = "none"
device = "cpu"
[enrich]
recipes = ["forest"]
[caption]
mode = "template"
[judge]
no_face = "needs_review"
[train]
resolution = 64
bucket_step = 16
rank = 4
alpha = 4
steps = 4
learning_rate = 0.005
gradient_checkpointing = false
max_sequence_length = 32
checkpoint_every = 2
sample_every = 0
sample_steps = 1
sample_size = 64
[generate]
prompts = 2
seeds_per_prompt = 1
width = 64
height = 64
max_sequence_length = 32
[evaluate]
prompts = ["a photo of {trigger} in a library"]
seeds_per_prompt = 1
"""


def test_flywheel_run_completes_on_the_tiny_klein_stack(tmp_path: Path):
    root = tmp_path / "klein"
    root.mkdir()
    (root / "flywheel.toml").write_text(KLEIN_LOOP)
    write_sample(root / "sources")
    for extra in sorted((root / "sources").iterdir())[2:]:  # two sources keep it quick
        extra.unlink()
    with open_project(root) as project:
        result = run_loop(project)
        cat = project.catalog
        assert result.report is not None and result.verdict
        edits = cat.query("SELECT model FROM operations WHERE stage = 'enrich' AND kind = 'model_call' "
                          "AND status = 'ok'")
        assert edits and all(r["model"] == "tiny-flux2-klein" for r in edits)  # the stack's editor edited
        runs = cat.query("SELECT * FROM lora_runs WHERE status = 'ok' ORDER BY id")
        assert len(runs) == 2
        resolved = json.loads((project.workspace / runs[0]["output_dir"] / "config.json").read_text())
        assert (resolved["family"], resolved["generate_model"]) == ("flux2_klein", "tiny-flux2-klein")
        # Generated and held-out images render on the distilled klein, with its preset's steps ([generate]
        # steps unset): the run's LoRA on the model the stack generates with.
        renders = cat.query("SELECT params_json FROM operations WHERE stage IN ('generate', 'evaluate') "
                            "AND work_key IS NOT NULL AND status = 'ok'")
        params = [json.loads(r["params_json"]) for r in renders]
        assert params and all(p["family"] == "flux2_klein" and p["distilled"] for p in params)
        assert {p["num_inference_steps"] for p in params} == {get_preset("tiny-flux2-klein").settings[
            "num_inference_steps"]}


def test_klein4b_is_apache_end_to_end_and_each_model_fits_24_gb():
    stack = STACKS["klein4b"]
    presets = [get_preset(spec, role) for spec, role in [(stack.captioner, "vlm"), (stack.judge, "vlm"),
                                                          (stack.editor, "editor"), (stack.base, "text_to_image")]]
    base = get_preset(stack.base, "text_to_image")
    presets.append(get_preset(base.generate_with, "text_to_image"))
    assert all(p is not None and p.licence and p.licence.name == "Apache-2.0" for p in presets)
    assert all(p.vram_gib <= 24 for p in presets)
    assert base.generate_with == "flux2-klein-4b"


def test_demo_config_takes_a_tiny_stack_and_refuses_a_real_one():
    import pytest
    import tomllib

    from flywheel.config import parse_config
    from flywheel.demo import demo_config
    from flywheel.errors import ConfigError

    cfg = parse_config(tomllib.loads(demo_config("tiny-klein")))
    assert (cfg.models.stack, cfg.models.base, cfg.enrich.backend) == ("tiny-klein", "tiny-flux2-klein-base",
                                                                       "composite")
    assert parse_config(tomllib.loads(demo_config())).models.base == "tiny"  # the default demo is unchanged
    with pytest.raises(ConfigError, match="the demo runs offline on tiny models: stack 'klein4b' is not one of "):
        demo_config("klein4b")


def test_export_writes_an_ai_toolkit_job_for_the_klein_base(tmp_path: Path):
    import yaml
    from PIL import Image

    from flywheel.dataset import freeze_dataset
    from flywheel.export import export_dataset
    from flywheel.project import init_project

    init_project(tmp_path / "p", name="A", trigger="fw_a")
    (tmp_path / "p" / "flywheel.toml").write_text('[project]\nname = "A"\ntrigger = "fw_a"\n[models]\n'
                                                  'stack = "tiny-klein"\n')
    with open_project(tmp_path / "p") as project:
        sha, _ = project.store.put_image(Image.new("RGB", (64, 32), (200, 0, 0)))
        project.catalog.insert("images", {"sha256": sha, "pixel_sha256": sha, "phash": "0" * 16, "width": 64,
                                          "height": 32, "kind": "source", "round": 0})
        freeze_dataset(project, 1)
        res = export_dataset(project, tmp_path / "out", fmt="kohya")
    job = yaml.safe_load((tmp_path / "out" / "ai-toolkit.yaml").read_text())
    (process,) = job["config"]["process"]
    assert process["model"] == {"name_or_path": "black-forest-labs/FLUX.2-klein-base-4B", "arch": "flux2_klein_4b",
                                "quantize": True}
    assert process["sample"]["guidance_scale"] == 4.0 and res.configs
