"""Runs that recover: a stopped run is resumed only with the settings it started with; changed settings, or
--restart, start a new run and say so; a NaN loss stops the run at once, names the step and marks it failed."""

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
[models]
base = {base}
[train]
resolution = 64
bucket_step = 16
rank = 4
alpha = 4
steps = 4
learning_rate = {lr}
gradient_checkpointing = false
max_sequence_length = 32
checkpoint_every = 2
sample_every = 0
sample_prompts = []
"""


class Killed(Exception):
    pass


def write_config(root: Path, base: Path, lr: str = "0.005") -> None:
    (root / "flywheel.toml").write_text(CONFIG.format(base=json.dumps(str(base)), lr=lr), encoding="utf-8")


@pytest.fixture
def root(tmp_path: Path, tiny_flux_dir: Path) -> Path:
    """A project with two captioned sources and [models] base = the tiny FLUX folder."""
    from flywheel.project import open_project

    root = tmp_path / "proj"
    assert CliRunner().invoke(main, ["init", str(root), "--name", "Test Character", "--trigger", "fw_test"]).exit_code == 0
    write_config(root, tiny_flux_dir)
    rng = np.random.default_rng(0)
    with open_project(root) as project:
        for w, h in [(64, 64), (96, 64)]:
            sha, _ = project.store.put_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
            image_id = project.catalog.insert("images", {"sha256": sha, "pixel_sha256": sha, "phash": "0" * 16,
                                                         "width": w, "height": h, "kind": "source", "round": 0})
            project.catalog.insert("captions", {"image_id": image_id, "text": "fw_test in a room", "source": "vlm"})
    return root


def flywheel(root: Path, *args: str):
    return CliRunner().invoke(main, ["-C", str(root), *args])


def rows(root: Path, sql: str) -> list[dict]:
    from flywheel.project import open_project

    with open_project(root) as project:
        return [dict(r) for r in project.catalog.query(sql)]


def one_line(output: str) -> str:
    """The CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    import flywheel.train as train_mod

    real = train_mod.checkpoint.save_checkpoint

    def save_then_die(run_dir, at, **kw):
        path = real(run_dir, at, **kw)
        if at == step:
            raise Killed
        return path

    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", save_then_die)


def count_steps(monkeypatch) -> list:
    import flywheel.train as train_mod

    done, real = [], train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **kw: done.append(1) or real(*a, **kw))
    return done


def test_changed_train_settings_after_a_stop_start_a_new_run_and_say_why(root, tiny_flux_dir, monkeypatch):
    kill_after_checkpoint(monkeypatch, 2)
    res = flywheel(root, "train", "--force")
    assert isinstance(res.exception, Killed)
    monkeypatch.undo()
    write_config(root, tiny_flux_dir, lr="0.002")  # the user edits [train] after the crash
    steps = count_steps(monkeypatch)

    res = flywheel(root, "train", "--resume")
    assert res.exit_code == 0, res.output
    assert ("WARNING run 1 set aside, not resumed (the settings changed since it stopped: learning_rate: 0.005 -> "
            "0.002); new run 2 starts from step 0") in one_line(res.output)
    assert re.search(r"run 2 \(dataset v1\): final loss \d", res.output)
    assert len(steps) == 4  # all four steps of the new run, none of the old run's
    runs = rows(root, "SELECT r.id, r.status, r.config_json, r.dataset_id, o.error FROM lora_runs r "
                      "JOIN operations o ON o.id = r.operation_id ORDER BY r.id")
    assert [r["status"] for r in runs] == ["failed", "ok"]
    assert runs[0]["error"] == "superseded by run 2: the settings changed since it stopped: learning_rate: 0.005 -> 0.002"
    assert json.loads(runs[1]["config_json"])["learning_rate"] == 0.002 and runs[1]["dataset_id"] == runs[0]["dataset_id"]
    assert (root / ".flywheel" / "runs" / "run-0001" / "checkpoint-000002").is_dir()  # set aside, not deleted

    # A set-aside run is never picked up again.
    res = flywheel(root, "train", "--resume")
    assert res.exit_code == 1 and "Error: no unfinished training run to resume" in res.output
    res = flywheel(root, "train", "--resume", "--run", "1")
    assert res.exit_code == 1
    assert "Error: run 1 was set aside (superseded by run 2: the settings changed" in one_line(res.output)


def test_same_settings_resume_and_a_changed_base_or_dataset_does_not(root, tiny_flux_dir, tmp_path, monkeypatch):
    import shutil

    from flywheel.config import TrainConfig
    from flywheel.project import open_project
    from flywheel.training import runs

    kill_after_checkpoint(monkeypatch, 2)
    assert isinstance(flywheel(root, "train", "--force").exception, Killed)
    monkeypatch.undo()
    with open_project(root) as project:
        run = runs.unfinished_run(project.catalog)
        same = project.config.train
        base = str(tiny_flux_dir)
        assert runs.changes(run, same, base=base, dataset_version=None, run_dataset_version=1) == []
        assert runs.changes(run, same, base=base, dataset_version=1, run_dataset_version=1) == []
        other = tmp_path / "other-flux"
        shutil.copytree(tiny_flux_dir, other)
        assert runs.changes(run, same, base=str(other), dataset_version=2, run_dataset_version=1) == [
            f"base model: {tiny_flux_dir} -> {other}", "dataset: v1 -> v2"]
        more = TrainConfig.model_validate({**same.model_dump(), "steps": 8, "target_modules": ["to_q"]})
        assert runs.changes(run, more, base=base, dataset_version=None, run_dataset_version=1) == [
            "steps: 4 -> 8", 'target_modules: ["to_q", "to_k", "to_v", "to_out.0"] -> ["to_q"]']
    steps = count_steps(monkeypatch)
    res = flywheel(root, "train", "--resume")
    assert res.exit_code == 0, res.output
    assert len(steps) == 2 and "set aside" not in res.output  # steps 3 and 4: the same run, continued
    assert [r["status"] for r in rows(root, "SELECT status FROM lora_runs")] == ["ok"]


def test_restart_sets_unfinished_runs_aside_and_plain_train_asks_which(root, monkeypatch):
    kill_after_checkpoint(monkeypatch, 2)
    assert isinstance(flywheel(root, "train", "--force").exception, Killed)
    monkeypatch.undo()

    res = flywheel(root, "train", "--force")  # a second run while one is unfinished: the user's call
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.splitlines() == [
        "Error: run 1 (round 1) did not finish (last checkpoint at step 2)",
        "Hint: `flywheel train --resume` continues it (a new run if [train] changed since), `flywheel train "
        "--restart` sets it aside and starts a new run"]
    res = flywheel(root, "train", "--resume", "--restart")
    assert res.exit_code == 2 and "--resume continues a run and --restart starts a new one: pick one" in res.output

    steps = count_steps(monkeypatch)
    res = flywheel(root, "train", "--restart", "--force")
    assert res.exit_code == 0, res.output
    assert ("run 1 set aside, not resumed (`flywheel train --restart`); new run 2 starts from step 0"
            in one_line(res.output))
    assert len(steps) == 4
    assert [(r["status"], r["error"]) for r in rows(
        root, "SELECT r.status, o.error FROM lora_runs r JOIN operations o ON o.id = r.operation_id ORDER BY r.id")] == [
        ("failed", "superseded by run 2: `flywheel train --restart`"), ("ok", None)]


def test_flywheel_run_trains_a_new_run_when_train_changed_after_a_failure(root, tiny_flux_dir, monkeypatch):
    """The loop's training step: a stopped round-1 run with today's [train] is resumed (same run); with an
    edited [train] it is set aside and a new round-1 run trains on the round's dataset."""
    from flywheel.loop import StageHooks, _train_round
    from flywheel.progress import no_progress
    from flywheel.project import open_project

    kill_after_checkpoint(monkeypatch, 2)
    assert isinstance(flywheel(root, "train", "--force").exception, Killed)
    monkeypatch.undo()
    write_config(root, tiny_flux_dir, lr="0.001")
    with open_project(root) as project:
        _train_round(project, 1, StageHooks(device="cpu"), no_progress)
        runs = [dict(r) for r in project.catalog.query("SELECT id, round, status, dataset_id FROM lora_runs ORDER BY id")]
    assert [(r["id"], r["round"], r["status"]) for r in runs] == [(1, 1, "failed"), (2, 1, "ok")]
    assert runs[0]["dataset_id"] == runs[1]["dataset_id"]


def test_a_nan_loss_stops_the_run_names_the_step_and_marks_it_failed(root, monkeypatch):
    import torch

    import flywheel.train as train_mod

    calls, real = [], train_mod.train_step

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return torch.tensor(float("nan")) if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "train_step", nan_at_step_3)
    res = flywheel(root, "train", "--force")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.splitlines()[-2:] == [
        "Error: run 1 stopped: the loss became nan at step 3 of 4 (learning_rate 0.005)",
        "Hint: lower learning_rate (or max_grad_norm) in [train] of flywheel.toml, then `flywheel train --resume` "
        "or `flywheel run`: changed settings start a new run"]
    # Step 3's loss is read once step 4 is queued (training.step.LateLoss): one step more ran, never two, and
    # nothing after the NaN was saved.
    assert len(calls) == 4
    run_dir = root / ".flywheel" / "runs" / "run-0001"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000002"]  # nothing saved after NaN
    assert not (run_dir / "pytorch_lora_weights.safetensors").exists()
    (run,) = rows(root, "SELECT r.status, o.status AS op FROM lora_runs r JOIN operations o ON o.id = r.operation_id")
    assert run == {"status": "failed", "op": "failed"}
    calls = rows(root, "SELECT status, error FROM operations WHERE stage = 'train' AND kind = 'model_call' "
                       "AND params_json LIKE '%lora_run_id%'")
    assert [(c["status"], "at step 3 of 4" in c["error"]) for c in calls] == [("failed", True)]


def test_a_stopped_run_followed_by_a_finished_run_of_its_round_is_not_unfinished(project):
    """Catalogs from before runs were set aside can hold a failed run that a later run of the same round
    replaced: it is neither resumed nor in the way of a new run."""
    from flywheel.errors import StageError
    from flywheel.training import runs

    cat = project.catalog
    ds = cat.insert("dataset_versions", {"version": 1, "round": 1, "rule": "test"})

    def run(round_: int, status: str) -> int:
        return cat.insert("lora_runs", {"round": round_, "dataset_id": ds, "base_model": "/m", "config_json": "{}",
                                        "output_dir": "runs/x", "status": status})

    first = run(1, "failed")
    run(1, "ok")  # the user started round 1 again, and it finished
    assert runs.unfinished_runs(cat) == []
    runs.refuse_second_run(project, cat)  # nothing in the way
    third = run(2, "running")  # killed while training round 2
    assert [r["id"] for r in runs.unfinished_runs(cat)] == [third]
    assert runs.unfinished_run(cat)["id"] == third
    with pytest.raises(StageError, match=f"no unfinished training run to resume with id {first}"):
        runs.unfinished_run(cat, first)
