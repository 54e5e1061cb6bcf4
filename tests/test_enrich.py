"""``flywheel enrich``: planning, idempotent re-runs, crash + resume, lineage, references, failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from flywheel.config import EditorLora, EnrichConfig
from flywheel.enrich import enrich, plan, work_key
from flywheel.errors import StageError
from flywheel.images import phash, phash_hex, pixel_sha256
from flywheel.models.base import EditRequest

pytest.importorskip("mediapipe")

RECIPES = ["studio", "overcast", "right_view"]  # one cheap recipe from three axes


def add_source(project, image: Image.Image, name: str) -> int:
    sha, _ = project.store.put_image(image)
    with project.catalog.transaction():
        return project.catalog.insert("images", {
            "sha256": sha, "pixel_sha256": pixel_sha256(image), "phash": phash_hex(phash(image)),
            "width": image.width, "height": image.height, "kind": "source", "round": 0, "original_name": name,
        })


@pytest.fixture
def sources(project) -> list[int]:
    """Three different shots of the astronaut (a real photo of a person), 192 px to keep edits fast."""
    from skimage import data

    full = Image.fromarray(data.astronaut())
    shots = [full, full.crop((40, 0, 420, 380)), ImageOps.mirror(full.crop((0, 20, 480, 500)))]
    return [add_source(project, s.resize((192, 192), Image.Resampling.LANCZOS), f"s{i}.png") for i, s in enumerate(shots)]


def composite_cfg(**kw) -> EnrichConfig:
    return EnrichConfig(backend="composite", recipes=RECIPES, seeds=2, **kw)


def counts(project) -> dict[str, int]:
    q = project.catalog.query
    return {
        "enriched": q("SELECT COUNT(*) FROM images WHERE kind = 'enriched'")[0][0],
        "calls": q("SELECT COUNT(*) FROM operations WHERE stage = 'enrich' AND kind = 'model_call'")[0][0],
        "parents": q("SELECT COUNT(*) FROM image_parents")[0][0],
    }


def assert_complete_and_consistent(project, cfg: EnrichConfig) -> None:
    """Exactly one image per planned unit, each linked to its 'ok' operation and its source."""
    planned = {u.work_key: u for u in plan(project, cfg)}
    rows = project.catalog.query(
        "SELECT o.work_key, o.status, o.seed, o.params_json, o.duration_ms, i.id AS image_id, p.parent_id, p.role "
        "FROM operations o JOIN images i ON i.operation_id = o.id "
        "JOIN image_parents p ON p.image_id = i.id WHERE o.stage = 'enrich' AND i.kind = 'enriched'"
    )
    assert sorted(r["work_key"] for r in rows) == sorted(planned)
    for r in rows:
        unit = planned[r["work_key"]]
        params = json.loads(r["params_json"])
        assert (r["status"], r["role"], r["parent_id"], r["seed"]) == ("ok", "source", unit.source_id, unit.seed)
        assert params["prompt"] == unit.recipe.full_prompt and params["recipe"] == unit.recipe.id
        assert params["caption"] == unit.recipe.caption_for(cfg.backend)  # template captions read it
        assert params["backend"] == cfg.backend and params["composite"]["axis"] == unit.recipe.axis
        assert r["duration_ms"] is not None


def test_plan_is_sources_x_recipes_x_seeds_with_stable_keys(project, sources):
    cfg = composite_cfg()
    units = plan(project, cfg)
    assert len(units) == 3 * 3 * 2 and len({u.work_key for u in units}) == len(units)
    sha = project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (sources[0],))[0][0]
    assert units[0].work_key == work_key(sha, "studio", 0, "composite") == f"enrich:{sha}:studio:0:composite"
    assert [u.work_key for u in plan(project, cfg)] == [u.work_key for u in units]


def test_another_editor_model_is_other_work(project, sources):
    """Switching [models] editor from the tiny model to the real one must redo the edits, not skip them."""
    from flywheel.enrich import editor_id

    cfg = EnrichConfig(backend="qwen-image-edit", recipes=["studio"])
    tiny = project.config.models.model_copy(update={"editor": "tiny"})
    real = project.config.models.model_copy(update={"editor": "qwen-image-edit-2511"})
    assert editor_id(cfg, tiny) == "qwen-image-edit=tiny"
    keys_tiny = {u.work_key for u in plan(project, cfg, editor_id(cfg, tiny))}
    keys_real = {u.work_key for u in plan(project, cfg, editor_id(cfg, real))}
    assert len(keys_tiny) == len(keys_real) == 3 and not keys_tiny & keys_real


def test_enrich_makes_every_planned_edit_once_and_rerun_adds_nothing(project, sources):
    cfg = composite_cfg()
    seen = []
    result = enrich(project, cfg, progress=lambda done, total, label="": seen.append((done, total)))
    assert (result.planned, len(result.made), result.already_done, result.failed) == (18, 18, 0, [])
    assert seen[0] == (0, 18) and seen[-1] == (18, 18)
    assert_complete_and_consistent(project, cfg)
    before = counts(project)
    again = enrich(project, cfg)
    assert (again.made, again.already_done) == ([], 18)
    assert counts(project) == before
    # A wider config only adds the new units.
    more = enrich(project, cfg.model_copy(update={"seeds": 3}))
    assert (len(more.made), more.already_done) == (9, 18)


class FlakyEditor:
    """The real composite editor, except that the ``fail_at``-th request (1-based) raises, like a crash."""

    def __init__(self, fail_at: int, error: BaseException):
        from flywheel.models.composite import CompositeEditor

        self.inner, self.fail_at, self.error, self.seen = CompositeEditor(), fail_at, error, 0
        self.model_id = self.inner.model_id

    def params(self):
        return self.inner.params()

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        self.seen += len(requests)
        if self.seen >= self.fail_at:
            raise self.error
        return self.inner.edit(requests)


def test_crash_mid_run_then_rerun_gives_exactly_the_planned_set(project, sources):
    cfg = composite_cfg(batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        enrich(project, cfg, editor=FlakyEditor(fail_at=5, error=KeyboardInterrupt()))
    assert counts(project)["enriched"] == 4  # two full batches of two before the third batch died
    statuses = project.catalog.query("SELECT status, COUNT(*) FROM operations WHERE kind = 'model_call' GROUP BY status")
    assert dict((r[0], r[1]) for r in statuses) == {"ok": 4, "failed": 2}
    # A killed process (no chance to mark anything failed) leaves 'running' rows: fake one for a planned unit.
    pending = [u for u in plan(project, cfg) if u.work_key not in
               {r[0] for r in project.catalog.query("SELECT work_key FROM operations WHERE work_key IS NOT NULL")}]
    project.catalog.start_operation("enrich", model="composite", work_key=pending[0].work_key)

    result = enrich(project, cfg)
    assert (len(result.made), result.already_done) == (14, 4)
    assert counts(project) == {"enriched": 18, "calls": 18, "parents": 18}
    assert_complete_and_consistent(project, cfg)


class RecordingEditor:
    """Stands in for Qwen-Image-Edit: records what it was sent, returns a seed-dependent recolour."""

    model_id = "recording-editor"

    def __init__(self):
        self.requests: list[EditRequest] = []

    def params(self):
        return {}

    def edit(self, requests):
        self.requests += requests
        return [Image.fromarray(np.roll(np.asarray(r.image), r.seed + 1, axis=2)) for r in requests]


def test_references_are_passed_and_recorded_for_qwen_image_edit(project, sources):
    ed = RecordingEditor()
    cfg = EnrichConfig(backend="qwen-image-edit", recipes=["forest"], references=2)
    result = enrich(project, cfg, editor=ed)
    assert len(result.made) == 3 and all(len(r.references) == 2 for r in ed.requests)
    assert all(r.prompt == r.recipe.full_prompt for r in ed.requests)
    for image_id in result.made:
        parents = project.catalog.query("SELECT parent_id, role FROM image_parents WHERE image_id = ?", (image_id,))
        assert sorted(p["role"] for p in parents) == ["reference", "reference", "source"]
        assert len({p["parent_id"] for p in parents}) == 3 and {p["parent_id"] for p in parents} == set(sources)


def test_a_source_left_out_on_the_review_page_is_neither_edited_nor_a_reference(project, sources):
    from flywheel.review.decisions import record_review

    record_review(project, [sources[1]], "rejected", "tester", reason="blurry")
    cfg = EnrichConfig(backend="qwen-image-edit", recipes=["forest"], references=2)
    assert {u.source_id for u in plan(project, cfg)} == {sources[0], sources[2]}
    ed = RecordingEditor()
    result = enrich(project, cfg, editor=ed)
    assert len(result.made) == 2 and all(len(r.references) == 1 for r in ed.requests)
    refs = {row["parent_id"] for row in project.catalog.query("SELECT parent_id FROM image_parents")}
    assert sources[1] not in refs
    record_review(project, [sources[1]], "cleared", "tester")  # put back: its edits are planned again
    assert {u.source_id for u in plan(project, cfg)} == set(sources)


def test_a_source_without_a_person_fails_its_background_edits_and_the_rest_go_on(project, sources):
    from skimage import data

    wall = add_source(project, Image.fromarray(data.brick()).convert("RGB").resize((192, 192)), "wall.png")
    cfg = EnrichConfig(backend="composite", recipes=["studio", "overcast"])
    result = enrich(project, cfg)
    assert len(result.made) == 7
    assert len(result.failed) == 1 and ":studio:" in result.failed[0][0] and "found no person" in result.failed[0][1]
    wall_sha = project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (wall,))[0][0]
    assert result.failed[0][0] == work_key(wall_sha, "studio", 0, "composite")
    retry = enrich(project, cfg)  # failed units are retried (and fail the same way: the editor is deterministic)
    assert (retry.already_done, len(retry.failed), counts(project)["calls"]) == (7, 1, 8)


def test_no_sources_and_unknown_recipes_are_clear_errors(project):
    with pytest.raises(StageError, match="no source images") as err:
        enrich(project, composite_cfg())
    assert "flywheel ingest" in err.value.hint
    from flywheel.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe or axis 'sunrise'"):
        enrich(project, EnrichConfig(backend="composite", recipes=["sunrise"]))


def test_cli_enrich_runs_the_configured_recipes(project, sources):
    from click.testing import CliRunner

    from flywheel.cli import main

    project.close()
    toml = project.root / "flywheel.toml"
    text = toml.read_text(encoding="utf-8")
    start = text.index("\nrecipes = [", text.index("[enrich]"))
    end = text.index("\n", start + 1)
    toml.write_text(text[:start] + '\nrecipes = ["studio"]' + text[end:], encoding="utf-8")
    out = CliRunner().invoke(main, ["-C", str(project.root), "enrich", "--backend", "composite"])
    assert out.exit_code == 0, out.output
    assert "3/3" in out.output and "enrich (composite): 3 edits planned; 3 new, 0 already done" in out.output


def test_a_batch_recorded_in_part_is_edited_whole_on_resume(project, sources):
    """GPU editors' outputs depend (in the last bits) on the batch: a resume must send the same batches."""
    from flywheel.models.composite import CompositeEditor

    class Recording(CompositeEditor):
        def __init__(self):
            super().__init__()
            self.batches: list[int] = []

        def edit(self, requests):
            self.batches.append(len(requests))
            return super().edit(requests)

    cfg = EnrichConfig(backend="composite", recipes=["studio"], seeds=1, batch_size=3)
    real_finish, calls = project.catalog.finish_operation, []

    def killed_after_first_record(op_id, status, *args, **kwargs):
        calls.append(op_id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while recording the batch's second edit
        return real_finish(op_id, status, *args, **kwargs)

    project.catalog.finish_operation = killed_after_first_record
    first = Recording()
    with pytest.raises(KeyboardInterrupt):
        enrich(project, cfg, editor=first)
    project.catalog.finish_operation = real_finish
    again = Recording()
    result = enrich(project, cfg, editor=again)
    assert first.batches == [3] and again.batches == [3]  # the same batch, not the 2 missing edits alone
    assert (len(result.made), result.already_done) == (2, 1)
    assert counts(project)["enriched"] == 3


# --- editor settings from [enrich]: they reach the pipeline, the work keys and the catalog ---------------
def test_editor_settings_change_work_keys_only_where_they_differ_from_the_preset(project, sources):
    from flywheel.config import ConfigError
    from flywheel.enrich import editor_id, editor_settings

    models = project.config.models.model_copy(update={"editor": "qwen-image-edit-2511-lightning"})
    base = EnrichConfig(backend="qwen-image-edit", recipes=["studio"])
    assert editor_id(base, models) == "qwen-image-edit=qwen-image-edit-2511-lightning"
    lightning = {"hub": "lightx2v/Qwen-Image-Edit-2511-Lightning",
                 "weight": "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"}

    def key(**settings):
        return editor_id(base.model_copy(update=settings), models)

    # What the preset already does is the same work; anything else is other work, each its own.
    same = {key(), key(steps=4), key(true_cfg=1.0, scheduler_shift=3.0), key(loras=[EditorLora(**lightning)])}
    other = [key(steps=8), key(true_cfg=4.0), key(loras=[]), key(loras=[EditorLora(**lightning, scale=0.5)]),
             key(loras=[EditorLora(path="loras/style.safetensors")]), key(negative_prompt="blurry"),
             key(max_area=512**2)]
    assert len(same) == 1 and len(set(other)) == len(other) and not same & set(other)
    assert all(k.startswith("qwen-image-edit=qwen-image-edit-2511-lightning+") for k in other)
    # LoRA paths are relative to the project (the key keeps them as written, so a moved project keeps its edits).
    cfg = base.model_copy(update={"loras": [EditorLora(path="loras/style.safetensors", scale=0.8)], "steps": 6})
    assert editor_settings(cfg, project.root) == {
        "num_inference_steps": 6, "loras": [{"path": str(project.root / "loras/style.safetensors"), "scale": 0.8}]}
    # A setting the backend's pipeline never reads is an error, not silently dropped.
    with pytest.raises(ConfigError, match="guidance does not apply to backend 'qwen-image-edit'") as err:
        editor_settings(base.model_copy(update={"guidance": 3.5}))
    assert "true_cfg" in err.value.hint
    with pytest.raises(ConfigError, match="true_cfg does not apply to backend 'instruct-pix2pix'"):
        editor_settings(EnrichConfig(backend="instruct-pix2pix", true_cfg=2.0))
    assert editor_settings(EnrichConfig(backend="composite", steps=3)) == {}  # `--backend composite` keeps working


def test_enrich_sends_the_configured_settings_lora_and_picture_prompt_to_the_pipeline(
        project, sources, tiny_qwen_image_edit_dir, tiny_qwen_image_lora, small_qwen_edit_inputs, monkeypatch):
    """flywheel.toml -> enrich -> the tiny Qwen-Image-Edit-Plus pipeline's __call__: what it receives."""
    import shutil

    from diffusers import QwenImageEditPlusPipeline

    from flywheel.models.qwen_image_edit import pipeline_prompt

    calls = []
    real_call = QwenImageEditPlusPipeline.__call__

    def spy(self, *args, **kwargs):  # records, then runs the real pipeline
        calls.append(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageEditPlusPipeline, "__call__", spy)
    (project.root / "loras").mkdir()
    shutil.copy(tiny_qwen_image_lora, project.root / "loras" / "style.safetensors")
    project.config.models.editor = str(tiny_qwen_image_edit_dir)
    cfg = EnrichConfig(backend="qwen-image-edit", recipes=["studio"], references=1, steps=3, true_cfg=1.0,
                       max_area=64 * 64, loras=[EditorLora(path="loras/style.safetensors", scale=0.6)])
    result = enrich(project, cfg)
    assert len(result.made) == 3 and len(calls) == 3
    full_prompt = plan(project, cfg)[0].recipe.full_prompt
    assert [(c["num_inference_steps"], c["true_cfg_scale"]) for c in calls] == [(3, 1.0)] * 3
    assert {(c["width"], c["height"]) for c in calls} == {(64, 64)}
    assert [len(c["image"]) for c in calls] == [2, 2, 2]  # the source, then one reference
    assert calls[0]["prompt"] == pipeline_prompt(full_prompt, 1)
    assert calls[0]["prompt"].startswith(f"Edit Picture 1: {full_prompt} Keep the character in Picture 1. Picture 2 ")
    rows = project.catalog.query("SELECT work_key, params_json FROM operations WHERE stage = 'enrich' AND "
                                 "work_key IS NOT NULL AND status = 'ok'")
    assert len(rows) == 3
    for row in rows:
        params = json.loads(row["params_json"])
        assert params["prompt"] == full_prompt and params["pipeline_prompt"] == calls[0]["prompt"]
        assert params["editor"]["num_inference_steps"] == 3 and params["editor"]["max_area"] == 64 * 64
        assert params["editor"]["loras"] == [{"source": str(project.root / "loras" / "style.safetensors"),
                                              "path": str(project.root / "loras" / "style.safetensors"),
                                              "scale": 0.6, "fused": True}]
        assert row["work_key"].endswith(":" + editor_id_of(project, cfg)) and "+" in row["work_key"]
    assert enrich(project, cfg).already_done == 3  # the same settings resume; nothing is redone


def editor_id_of(project, cfg):
    from flywheel.enrich import editor_id

    return editor_id(cfg, project.config.models)


def test_template_documents_every_enrich_key_with_valid_examples():
    """The commented editor settings in the flywheel.toml template are valid when uncommented."""
    import re
    import tomllib

    from flywheel.config import render_config_template

    text = render_config_template("A", "fw_a")
    section = text[text.index("\n[enrich]\n"):text.index("\n[caption]\n")]
    uncommented = re.sub(r"(?m)^# (\[\[enrich\.loras\]\]|[a-z_]+ = .*)$", r"\1", section)
    data = tomllib.loads(uncommented)["enrich"]
    assert set(data) == set(EnrichConfig.model_fields)
    cfg = EnrichConfig(**data)
    assert [lo.hub or str(lo.path) for lo in cfg.loras] == ["lightx2v/Qwen-Image-Edit-2511-Lightning",
                                                             "loras/my-editor-style.safetensors"]
