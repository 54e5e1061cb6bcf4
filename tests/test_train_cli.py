"""`flywheel train` and `flywheel generate` through the real command line, on the tiny FLUX."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flywheel.cli import main

CONFIG = """
[project]
name = "Test Character"
trigger = "fw_test"
[train]
base_model = {base}
resolution = 64
bucket_step = 16
rank = 4
alpha = 4
steps = 6
learning_rate = 0.005
gradient_checkpointing = false
max_sequence_length = 32
checkpoint_every = 2
sample_every = 0
sample_prompts = ["a photo of {{trigger}}"]
sample_steps = 1
sample_size = 64
[generate]
use_shipped_prompts = false
extra_prompts = ["{{trigger}} in a forest", "{{trigger}} on a beach"]
seeds_per_prompt = 1
width = 64
height = 48
steps = 2
max_sequence_length = 32
batch_size = 2
"""


@pytest.fixture
def root(tmp_path: Path, tiny_flux_dir: Path) -> Path:
    """A project made by `flywheel init`, its [train] base_model pointed at the tiny FLUX folder, with two
    source images (one captioned) in the catalog."""
    from flywheel.project import open_project

    root = tmp_path / "proj"
    res = CliRunner().invoke(main, ["init", str(root), "--name", "Test Character", "--trigger", "fw_test"])
    assert res.exit_code == 0, res.output
    (root / "flywheel.toml").write_text(CONFIG.format(base=json.dumps(str(tiny_flux_dir))), encoding="utf-8")
    rng = np.random.default_rng(0)
    with open_project(root) as project:
        for i, (w, h) in enumerate([(64, 64), (96, 64)]):
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            sha, _ = project.store.put_image(image)
            image_id = project.catalog.insert("images", {
                "sha256": sha, "pixel_sha256": sha, "phash": "0" * 16, "width": w, "height": h, "kind": "source",
                "round": 0})
            if i == 0:
                project.catalog.insert("captions", {"image_id": image_id, "text": "fw_test in a red room",
                                                    "source": "vlm"})
    return root


def flywheel(root: Path, *args: str):
    return CliRunner().invoke(main, ["-C", str(root), *args])


def rows(root: Path, sql: str) -> list:
    from flywheel.project import open_project

    with open_project(root) as project:
        return [dict(r) for r in project.catalog.query(sql)]


def test_train_then_generate_from_the_command_line(root: Path, tiny_flux_dir: Path):
    # Nothing to resume and nothing to generate with yet: clear errors, exit code 1, no traceback.
    res = flywheel(root, "train", "--resume")
    assert res.exit_code == 1
    assert "Error: no unfinished training run to resume" in res.output
    assert "Hint: start one with `flywheel train`" in res.output and "Traceback" not in res.output
    res = flywheel(root, "generate")
    assert res.exit_code == 1 and "no finished LoRA run" in res.output and "Hint: run `flywheel train`" in res.output

    res = flywheel(root, "train", "--steps", "3", "--force")  # sources only, on purpose
    assert res.exit_code == 0, res.output
    m = re.search(r"run (\d+) \(dataset v(\d+)\): final loss (\d+\.\d{4})", res.output)
    assert m and m.group(1) == "1" and m.group(2) == "1" and float(m.group(3)) > 0
    lora = Path(re.search(r"LoRA \(diffusers\): (\S+)", res.output).group(1))
    kohya = Path(re.search(r"LoRA \(kohya/ComfyUI\): (\S+)", res.output).group(1))
    assert lora.is_file() and kohya.is_file() and lora.parent == root / ".flywheel" / "runs" / "run-0001"

    (run,) = rows(root, "SELECT * FROM lora_runs")
    assert run["status"] == "ok" and run["round"] == 1 and run["finished_at"]
    assert Path(run["base_model"]).resolve() == tiny_flux_dir.resolve()  # [train] base_model, resolved
    assert json.loads(run["config_json"])["steps"] == 3  # --steps overrides [train] steps, and is recorded
    kinds = sorted(r["kind"] for r in rows(root, "SELECT kind FROM artifacts WHERE lora_run_id = 1"))
    assert kinds == ["checkpoint", "config", "lora", "lora_kohya", "loss_csv", "loss_curve", "sample"]
    (members,) = rows(root, "SELECT COUNT(*) AS n FROM dataset_members")
    assert members["n"] == 2
    # A finished run is not resumed.
    res = flywheel(root, "train", "--resume")
    assert res.exit_code == 1 and "no unfinished training run to resume" in res.output

    res = flywheel(root, "generate")
    assert res.exit_code == 0, res.output
    assert "round 1: 2 images generated, 0 already there" in res.output
    synth = rows(root, "SELECT i.round, i.width, i.height, o.params_json FROM images i JOIN operations o "
                       "ON o.id = i.operation_id WHERE i.kind = 'synthetic' ORDER BY i.id")
    assert [(s["round"], s["width"], s["height"]) for s in synth] == [(1, 64, 48), (1, 64, 48)]
    params = [json.loads(s["params_json"]) for s in synth]
    assert [p["prompt"] for p in params] == ["fw_test in a forest", "fw_test on a beach"]
    assert all(p["lora_run_id"] == 1 and p["lora_path"] == str(lora) for p in params)
    res = flywheel(root, "generate")  # done already: nothing is redone
    assert res.exit_code == 0 and "round 1: 0 images generated, 2 already there" in res.output


def test_train_resume_from_the_command_line_continues_the_killed_run(root: Path, monkeypatch):
    """A run that stopped (here: killed right after its step-4 checkpoint) is continued by
    `flywheel train --resume`, not restarted."""
    import flywheel.train as train_mod

    real = train_mod.checkpoint.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(run_dir, step, **kw):
        path = real(run_dir, step, **kw)
        if step == 4:
            raise Killed
        return path

    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", save_then_die)
    res = flywheel(root, "train", "--force")
    assert res.exit_code != 0 and isinstance(res.exception, Killed)
    assert [r["status"] for r in rows(root, "SELECT status FROM lora_runs")] == ["failed"]
    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", real)
    steps_run = []
    real_step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **kw: steps_run.append(1) or real_step(*a, **kw))

    res = flywheel(root, "train", "--resume")
    assert res.exit_code == 0, res.output
    assert len(steps_run) == 2  # steps 5 and 6 only: continued from the step-4 checkpoint, not restarted
    assert re.search(r"run 1 \(dataset v1\): final loss \d+\.\d{4}", res.output)
    (run,) = rows(root, "SELECT status FROM lora_runs")
    assert run["status"] == "ok"
    csv = (root / ".flywheel" / "runs" / "run-0001" / "loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv] == ["step", "1", "2", "3", "4", "5", "6"]
