"""SDXL-Turbo + ControlNet with ``control = "depth"``: the ControlNet gets the source's depth map from a tiny
random Depth Anything V2 (the real architecture), the depth model loads once for many edits, and a wrong or
missing ``depth_model`` is a one-line error that names the setting to fix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_models_edit import PipeSpy
from test_routes import _add, _edits, _run

from flywheel.models.base import EditRequest

HINT = "set [enrich.controlnet] depth_model to a depth-estimation model"


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    """Two real photos of a person (the sample's astronaut crops, as in test_routes) at 128 px."""
    from flywheel.sample import write_sample

    paths = write_sample(tmp_path_factory.mktemp("people"))[:2]
    return [Image.open(p).convert("RGB").resize((128, 128), Image.Resampling.LANCZOS) for p in paths]


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    from flywheel.testing.tiny.depth import build_tiny_depth_anything

    return build_tiny_depth_anything(tmp_path_factory.mktemp("depth") / "depth-anything")


@pytest.fixture
def depth_loads(monkeypatch):
    """Every depth model load (transformers' from_pretrained) in this test, from a fresh cache."""
    from transformers import AutoModelForDepthEstimation

    from flywheel.models import sdxl_controlnet

    sdxl_controlnet._depth_model.cache_clear()
    loads, real = [], AutoModelForDepthEstimation.from_pretrained
    monkeypatch.setattr(AutoModelForDepthEstimation, "from_pretrained",
                        lambda folder, **kw: loads.append(str(folder)) or real(folder, **kw))
    yield loads
    sdxl_controlnet._depth_model.cache_clear()


def test_controlnet_gets_the_depth_map_of_the_source_and_loads_the_depth_model_once(people, depth_dir, depth_loads):
    from flywheel.models import load_editor
    from flywheel.models.sdxl_controlnet import canny_image, depth_image

    editor = load_editor("tiny-sdxl-turbo-controlnet", control="depth", depth_model=str(depth_dir))
    editor.pipe = spy = PipeSpy(editor.pipe)
    wide = people[0].resize((128, 96))
    editor.edit([EditRequest(wide, "a beach", seed=1), EditRequest(people[1], "a forest", seed=2)])
    editor.edit([EditRequest(people[1], "neon", seed=3)])
    assert depth_loads == [str(depth_dir)]  # once for three edits in two batches
    for call in spy.calls:
        control = np.asarray(call["control_image"])
        assert call["control_image"].size == call["image"].size  # the source as the pipeline got it (72x56, 64x64)
        assert control.shape[2] == 3 and (control == control[..., :1]).all()  # grey, in 3 channels
        assert (control.min(), control.max()) == (0, 255) and len(np.unique(control)) > 20  # a map, not a constant
        assert np.array_equal(control, np.asarray(depth_image(call["image"], str(depth_dir), "cpu")))
        assert not np.array_equal(control, np.asarray(canny_image(call["image"], 100, 200)))
    assert [c["control_image"].size for c in spy.calls] == [(72, 56), (64, 64), (64, 64)]
    params = editor.params()
    assert (params["control"], params["depth_model"]) == ("depth", str(depth_dir))

    again = load_editor("tiny-sdxl-turbo-controlnet", control="depth", depth_model=str(depth_dir), mode="txt2img")
    again.pipe = spy2 = PipeSpy(again.pipe)
    again.edit([EditRequest(wide, "a beach", seed=1)])
    assert np.array_equal(np.asarray(spy2.calls[0]["image"]), np.asarray(spy.calls[0]["control_image"]))
    assert depth_loads == [str(depth_dir)]  # same model, same device: still the one load


def test_a_missing_or_wrong_depth_model_is_a_one_line_error_naming_the_setting(people, tmp_path, depth_loads):
    from transformers import Dinov2Config, Dinov2Model

    from flywheel.errors import ConfigError, ModelLoadError, ModelNotFoundError
    from flywheel.models import load_editor

    with pytest.raises(ConfigError, match="control = 'depth' needs a depth model") as err:
        load_editor("tiny-sdxl-turbo-controlnet", control="depth")
    assert "depth_model" in err.value.hint
    # The easy mistake: the DINOv2 backbone instead of the depth model built on it.
    backbone = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                             image_size=28)).save_pretrained(backbone)
    for spec, error, message in [
            (str(backbone), ModelLoadError,
             f"depth_model '{backbone}' is not a depth-estimation model (model_type 'dinov2')"),
            (str(tmp_path / "nowhere"), ModelNotFoundError, f"depth_model '{tmp_path / 'nowhere'}': folder does not exist")]:
        editor = load_editor("tiny-sdxl-turbo-controlnet", control="depth", depth_model=spec)
        with pytest.raises(error) as err:
            editor.edit([EditRequest(people[0], "a beach", seed=1)])
        assert err.value.args == (message,)  # one line; the hint says what to set
        assert err.value.hint.startswith(HINT) and "Depth-Anything-V2-Small-hf" in err.value.hint
    assert depth_loads == []


def test_depth_route_through_flywheel_enrich_records_the_depth_model(project, people, depth_dir, depth_loads):
    from flywheel.models import sdxl_controlnet

    _add(project, people[:1])
    extra = f'[enrich.controlnet]\nstrength = 1.0\ncontrol = "depth"\ndepth_model = "{depth_dir}"\n'
    out = _run(project, recipes='["oil_painting", "neon"]', backend="sdxl-turbo-controlnet",
               models='editor = "tiny-sdxl-turbo-controlnet"', extra=extra)
    assert out.exit_code == 0, out.output
    assert "2 new, 0 already done" in out.output
    edits = _edits(project.root)
    assert len(edits) == 2
    for e in edits:
        params = e["params"]["editor"]
        assert (params["family"], params["control"], params["depth_model"]) == ("sdxl_controlnet", "depth",
                                                                                 str(depth_dir))
        assert e["image"].size == (64, 64)
    assert depth_loads == [str(depth_dir)]  # one load for the stage's two edits
    assert sdxl_controlnet._depth_model.cache_info().currsize == 0  # released with the editor at the stage's end



def test_a_wrong_depth_model_stops_flywheel_enrich_with_the_fix(project, people, tmp_path):
    _add(project, people[:1])
    extra = f'[enrich.controlnet]\ncontrol = "depth"\ndepth_model = "{tmp_path / "nowhere"}"\n'
    out = _run(project, recipes='["oil_painting"]', backend="sdxl-turbo-controlnet",
               models='editor = "tiny-sdxl-turbo-controlnet"', extra=extra)
    assert out.exit_code != 0 and "Traceback" not in out.output
    assert f"depth_model '{tmp_path / 'nowhere'}': folder does not exist" in out.output
    assert HINT in out.output
    assert not _edits(project.root)
