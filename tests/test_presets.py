"""Presets, weight resolution (offline, safetensors only), the errors users see, and `flywheel models`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.config import ModelsConfig, parse_config, render_config_template
from flywheel.errors import ConfigError, InsufficientMemoryError, ModelLoadError, ModelNotFoundError
from flywheel.models import load_text_to_image, load_vlm
from flywheel.models.base import ChatRequest
from flywheel.models.hub import check_gpu_memory, count_parameters, resolve_model
from flywheel.models.presets import PRESETS, ROLE_OF_FAMILY, TINY_FOR_ROLE

ISSUE_PRESETS = {"qwen2-vl-2b", "qwen2-vl-7b", "qwen2.5-vl-7b", "flux-dev", "flux-schnell", "flux-kontext-dev",
                 "qwen-image-edit-2511", "qwen-image-edit-2511-lightning", "instruct-pix2pix"}


def test_presets_cover_every_role_with_hub_ids_and_memory_figures():
    assert ISSUE_PRESETS <= set(PRESETS)
    for p in PRESETS.values():
        assert p.role == ROLE_OF_FAMILY[p.family]
        if p.tiny:
            assert p.hub_id is None and p.dtype == "float32"
        else:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", p.hub_id) and p.vram_gib > 0 and p.dtype == "bfloat16"
    assert {PRESETS[name].role for name in TINY_FOR_ROLE.values()} == set(TINY_FOR_ROLE)


def test_editor_presets_pair_stock_and_fast_settings_and_the_fast_one_is_the_default():
    from flywheel.config import EditorLora

    stock, fast, fast8 = (PRESETS[f"qwen-image-edit-2511{s}"] for s in ("", "-lightning", "-lightning-8step"))
    assert stock.hub_id == fast.hub_id == fast8.hub_id == "Qwen/Qwen-Image-Edit-2511"  # same weights, other settings
    assert (stock.settings["num_inference_steps"], stock.settings["true_cfg_scale"]) == (40, 4.0)
    assert "loras" not in stock.settings and "scheduler_shift" not in stock.settings
    lightning = "lightx2v/Qwen-Image-Edit-2511-Lightning"
    for preset, steps in ((fast, 4), (fast8, 8)):
        s = preset.settings  # the Lightning recipe: n steps, no CFG, the shift-3 schedule it was distilled with
        assert (s["num_inference_steps"], s["true_cfg_scale"], s["scheduler_shift"]) == (steps, 1.0, 3.0)
        assert s["loras"] == [{"hub": lightning,
                               "weight": f"Qwen-Image-Edit-2511-Lightning-{steps}steps-V1.0-bf16.safetensors"}]
    kontext, turbo = PRESETS["flux-kontext-dev"], PRESETS["flux-kontext-dev-turbo"]
    assert kontext.hub_id == turbo.hub_id and kontext.settings["num_inference_steps"] == 28
    assert turbo.settings["num_inference_steps"] == 8
    assert turbo.settings["loras"][0]["hub"] == "alimama-creative/FLUX.1-Turbo-Alpha"
    assert ModelsConfig().editor == "qwen-image-edit-2511-lightning" and "default editor" in fast.note
    for preset in PRESETS.values():  # every preset LoRA is one .safetensors file of a hub repo
        for lora in preset.settings.get("loras", []):
            EditorLora(**lora)


def test_importing_the_model_layer_does_no_heavy_work():
    code = ("import sys, flywheel.models, flywheel.models.presets, flywheel.models.hub, flywheel.testing.tiny, "
            "flywheel.config; heavy = {'torch', 'transformers', 'diffusers'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_preset_missing_offline_names_model_folder_and_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as err:
        load_vlm("qwen2-vl-2b", ModelsConfig(device="cpu"))  # CPU asked for: no "no GPU" error first
    msg = str(err.value)
    assert "Qwen/Qwen2-VL-2B-Instruct" in msg
    assert str(tmp_path / "hf" / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct") in msg
    assert "hf download Qwen/Qwen2-VL-2B-Instruct" in err.value.hint


def test_preset_loads_offline_from_the_hf_cache(monkeypatch, tmp_path, tiny_vlm_dir):
    """A preset whose weights are in the HF cache loads with HF_HUB_OFFLINE=1 (cache layout as `hf download`)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct"
    commit = "0" * 40
    shutil.copytree(tiny_vlm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    vlm = load_vlm("qwen2-vl-2b", ModelsConfig(device="cpu"))
    assert vlm.model_id == "qwen2-vl-2b"
    assert len(vlm.generate([ChatRequest("hi")], max_new_tokens=2)) == 1


def test_missing_local_folder_and_incomplete_folders_are_explained(tmp_path, tiny_vlm_dir):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(no_config))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_vlm_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only") as err:
        load_vlm(str(pickled))
    assert "safe_serialization=True" in err.value.hint
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        resolve_model(str(pickled))


def test_unknown_names_suggest_the_closest_preset():
    with pytest.raises(ConfigError, match="unknown model 'qwen2-vl2b'") as err:
        load_vlm("qwen2-vl2b")
    assert "qwen2-vl-2b" in err.value.hint
    with pytest.raises(ConfigError, match="did you mean 'flux-schnell'"):
        parse_config({"project": {"name": "A", "trigger": "fw_a"}, "models": {"base": "flux-schnel"}})
    with pytest.raises(ConfigError, match="models.quantization"):
        parse_config({"project": {"name": "A", "trigger": "fw_a"}, "models": {"quantization": "4bit"}})


def test_a_preset_used_in_the_wrong_role_fails_before_any_download():
    with pytest.raises(ConfigError, match="used as the captioner/judge"):
        load_vlm("flux-dev")
    with pytest.raises(ConfigError, match="used as the base"):
        load_text_to_image("qwen2-vl-2b")


def test_not_enough_gpu_memory_gives_the_figure_and_the_options():
    gib = 1024**3
    with pytest.raises(InsufficientMemoryError) as err:
        check_gpu_memory("qwen2-vl-7b", needed=20 * gib, free=8 * gib, precision="bfloat16", n_params=8_300_000_000)
    assert "20.0 GiB" in str(err.value) and "8.0 GiB is free" in str(err.value)
    assert 'quantization = "nf4"' in err.value.hint and "fits" in err.value.hint and "cpu_offload" in err.value.hint
    check_gpu_memory("qwen2-vl-2b", needed=5 * gib, free=8 * gib, precision="bfloat16", n_params=2_200_000_000)


def test_parameter_count_comes_from_safetensors_headers(tiny_vlm, tiny_vlm_dir):
    n_params, n_bytes = count_parameters(tiny_vlm_dir)
    assert n_params == sum(p.numel() for p in tiny_vlm.model.state_dict().values())
    assert n_bytes == 4 * n_params  # saved in float32


def test_tiny_preset_builds_once_into_the_cache_and_settings_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_CACHE", str(tmp_path / "cache"))
    vlm = load_vlm("tiny")
    folder = tmp_path / "cache" / "tiny" / "tiny-qwen2-vl-v1"
    assert (folder / ".complete").exists() and (folder / "model.safetensors").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert vlm.params()["max_pixels"] == PRESETS["tiny-qwen2-vl"].settings["max_pixels"]  # preset default
    again = load_vlm("tiny-qwen2-vl", ModelsConfig(vlm_max_pixels=56 * 56))  # config beats preset
    assert again.params()["max_pixels"] == 56 * 56
    assert load_vlm("tiny", ModelsConfig(vlm_max_pixels=56 * 56), max_pixels=999).params()["max_pixels"] == 999
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_template_documents_every_models_key():
    data = tomllib.loads(render_config_template("A", "fw_a"))
    assert set(data["models"]) == set(ModelsConfig.model_fields)
    assert parse_config(data).models == ModelsConfig()


def test_cli_models_list_and_info(tmp_path, monkeypatch):
    runner = CliRunner()
    listing = runner.invoke(main, ["models", "list"])
    assert listing.exit_code == 0
    for name in ISSUE_PRESETS:
        assert name in listing.output
    info = runner.invoke(main, ["-C", str(tmp_path), "models", "info", "tiny"])
    assert info.exit_code == 0, info.output
    assert re.search(r"parameters: [\d,]+", info.output) and "device: cpu" in info.output
    assert "vram: n/a" in info.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = runner.invoke(main, ["-C", str(tmp_path), "models", "info", "qwen2-vl-7b"])
    assert missing.exit_code == 1
    assert "hf download Qwen/Qwen2-VL-7B-Instruct" in missing.output
