"""Edit speed (issue 11): klein's reference_area, the editors' speed option (regional torch.compile, fp8 matmuls),
and enrich storing one finished edit while the editor makes the next."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_editors_2026 import _add_sources, _cli_enrich, _image
from test_models_edit import PipeSpy

from flywheel.config import EnrichConfig
from flywheel.errors import ConfigError
from flywheel.models import load_editor
from flywheel.models.base import EditRequest


def test_klein_references_arrive_at_reference_area_and_the_source_at_max_area():
    editor = load_editor("tiny-flux2-klein", max_area=128 * 128, reference_area=64 * 64)
    editor.pipe = spy = PipeSpy(editor.pipe)
    src, ref = _image((200, 100)), _image((300, 300), seed=1)
    editor.edit([EditRequest(src, "make it blue", seed=0, references=[ref, ref])])
    assert [im.size for im in spy.calls[-1]["image"]] == [(176, 96), (64, 64), (64, 64)]
    assert (spy.calls[-1]["width"], spy.calls[-1]["height"]) == (176, 96)
    assert "reference_area" not in spy.calls[-1]  # ours, not a pipeline argument
    assert editor.params()["reference_area"] == 64 * 64
    # Unset: the references are as large as the edited image (klein's stock behaviour).
    editor.settings["reference_area"] = None
    editor.edit([EditRequest(src, "make it blue", seed=0, references=[ref])])
    assert [im.size for im in spy.calls[-1]["image"]] == [(176, 96), (128, 128)]


def test_reference_area_and_speed_are_settings_of_the_work_key_and_the_operation(project):
    from flywheel.project import open_project

    _add_sources(project)
    out = _cli_enrich(project, "flux2-klein", "tiny-flux2-klein",
                      '\nmax_area = 16384\nreference_area = 4096\nspeed = "auto"')
    assert out.exit_code == 0, out.output
    p = open_project(project.root)
    try:
        rows = p.catalog.query("SELECT o.work_key, o.params_json FROM operations o JOIN images i "
                               "ON i.operation_id = o.id WHERE o.stage = 'enrich' AND o.status = 'ok'")
        assert len(rows) == 3
        for row in rows:
            editor = json.loads(row["params_json"])["editor"]
            assert (editor["max_area"], editor["reference_area"]) == (16384, 4096)
            # "auto" compiles on CUDA only: on this CPU nothing was applied, and the row says so.
            assert (editor["speed"], editor["speed_applied"]) == ("auto", "none")
        from flywheel.enrich import editor_id

        models = p.config.models.model_copy(update={"editor": "tiny-flux2-klein"})
        base = EnrichConfig(backend="flux2-klein", max_area=16384)
        keys = {editor_id(base.model_copy(update=u), models) for u in
                ({}, {"reference_area": 4096}, {"speed": "auto"}, {"speed": "compile"})}
        assert len(keys) == 4  # each changes the output (compiled kernels round differently): other work
        assert editor_id(base.model_copy(update={"speed": "none"}), models) == editor_id(base, models)
        assert rows[0]["work_key"].endswith(editor_id(base.model_copy(update={"reference_area": 4096,
                                                                               "speed": "auto"}), models))
    finally:
        p.close()


def test_reference_area_and_speed_are_refused_where_no_pipeline_reads_them():
    from flywheel.enrich_settings import editor_settings

    with pytest.raises(ConfigError, match="reference_area does not apply to backend 'qwen-image-edit'") as err:
        editor_settings(EnrichConfig(backend="qwen-image-edit", reference_area=512 * 512))
    assert "resizes references to ~1024² itself" in err.value.hint
    with pytest.raises(ConfigError, match="speed does not apply to backend 'inpaint-sdxl'"):
        editor_settings(EnrichConfig(backend="inpaint-sdxl", speed="compile"))
    assert editor_settings(EnrichConfig(backend="flux2-klein", speed="compile-fp8", reference_area=4096)) == {
        "speed": "compile-fp8", "reference_area": 4096}


def test_compile_traces_the_klein_blocks_whole_and_keeps_the_edit():
    """Regional compile of the real klein blocks with fullgraph (a graph break would raise here); the eager
    backend keeps CPU tests fast, the tracing is the same as inductor's on the GPU."""
    from flywheel.models.editor_speed import apply_speed

    editor = load_editor("tiny-flux2-klein")
    req = [EditRequest(_image(), "make it blue", seed=3, references=[_image(seed=1)])]
    before = np.asarray(editor.edit(req)[0])
    assert apply_speed(editor.pipe, "compile", device="cpu", backend="eager") == "compile"
    blocks = [*editor.pipe.transformer.transformer_blocks, *editor.pipe.transformer.single_transformer_blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)  # nn.Module.compile: every block, one graph each
    assert (np.asarray(editor.edit(req)[0]) == before).all()


def test_auto_compiles_only_a_whole_unquantized_model_on_cuda_and_the_klein_preset_uses_it():
    """'auto' is the fast klein preset's speed (with 512² references: 0.90 s per edit on an H200 against 1.49 s),
    so it must never turn a working setup into an error: offloaded or quantized editors, or no CUDA, stay eager."""
    from flywheel.models.editor_speed import apply_speed
    from flywheel.models.presets import PRESETS

    assert PRESETS["flux2-klein-4b"].settings["speed"] == "auto"
    assert PRESETS["flux2-klein-4b"].settings["reference_area"] == 512 * 512
    editor = load_editor("tiny-flux2-klein")
    assert apply_speed(editor.pipe, "auto", device="cpu") == "none"
    assert apply_speed(editor.pipe, "auto", device="cuda", cpu_offload=True) == "none"
    assert apply_speed(editor.pipe, "auto", device="cuda", quantization="nf4") == "none"
    blocks = [*editor.pipe.transformer.transformer_blocks, *editor.pipe.transformer.single_transformer_blocks]
    assert all(b._compiled_call_impl is None for b in blocks)


def test_fp8_and_unknown_speeds_are_clear_errors_on_the_cpu():
    with pytest.raises(ConfigError, match="speed = 'compile-fp8' needs a CUDA GPU; tiny-flux2-klein runs on cpu"):
        load_editor("tiny-flux2-klein", speed="compile-fp8")
    with pytest.raises(ConfigError, match="unknown speed 'fast'") as err:
        load_editor("tiny-flux2-klein", speed="fast")
    assert "compile-fp8" in err.value.hint


class SlowEditor:
    """A GPU editor stand-in: each edit takes ``seconds`` without using the CPU (like waiting on the GPU)."""

    model_id = "slow-editor"

    def __init__(self, seconds: float, fail_at: int | None = None):
        self.seconds, self.fail_at, self.calls, self.threads = seconds, fail_at, 0, set()

    def params(self):
        return {}

    def edit(self, requests):
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt
        time.sleep(self.seconds)
        return [Image.fromarray(np.roll(np.asarray(r.image), r.seed + 7 * self.calls, axis=1)) for r in requests]


@pytest.fixture
def slow_store(monkeypatch):
    """Storing an edit takes 0.15 s more (a 1024² PNG + hashes on a slow CPU); records on which thread."""
    import flywheel.enrich_units as units

    real, threads = units.store_output, set()

    def store_output(project, out):
        threads.add(threading.get_ident())
        time.sleep(0.15)
        return real(project, out)

    monkeypatch.setattr(units, "store_output", store_output)
    return threads


def test_an_edit_is_stored_while_the_editor_makes_the_next(project, slow_store):
    from flywheel.enrich import enrich

    _add_sources(project)
    cfg = EnrichConfig(backend="qwen-image-edit", recipes=["studio", "overcast"], references=0)  # 6 edits
    editor = SlowEditor(0.15)
    t0 = time.perf_counter()
    result = enrich(project, cfg, editor=editor)
    wall = time.perf_counter() - t0
    assert len(result.made) == 6
    # Serial, 6 x (0.15 edit + 0.15 store) = 1.8 s; overlapped, ~7 x 0.15 = 1.05 s (+ the catalog's own time).
    assert wall < 1.55, wall
    assert slow_store and not slow_store & editor.threads  # stored off the editor's (the stage's) thread
    rows = project.catalog.query("SELECT o.status, i.sha256 FROM operations o JOIN images i ON i.operation_id = o.id "
                                 "WHERE o.stage = 'enrich' AND o.kind = 'model_call'")
    assert [r["status"] for r in rows] == ["ok"] * 6
    assert all(project.store.image_path(r["sha256"]).is_file() for r in rows)


def test_a_crash_keeps_the_finished_edit_still_being_stored(project, slow_store):
    from flywheel.enrich import enrich

    _add_sources(project)
    cfg = EnrichConfig(backend="qwen-image-edit", recipes=["studio", "overcast"], references=0)
    with pytest.raises(KeyboardInterrupt):
        enrich(project, cfg, editor=SlowEditor(0.01, fail_at=3))
    statuses = project.catalog.query("SELECT status, COUNT(*) AS n FROM operations WHERE kind = 'model_call' "
                                     "GROUP BY status")
    # Edit 2 was stored on the worker when edit 3 died: it is recorded, not thrown away; edit 3 is 'failed'.
    assert {r["status"]: r["n"] for r in statuses} == {"ok": 2, "failed": 1}
    result = enrich(project, cfg, editor=SlowEditor(0.01))
    assert (len(result.made), result.already_done) == (4, 2)
    assert project.catalog.query("SELECT COUNT(*) FROM images WHERE kind = 'enriched'")[0][0] == 6
