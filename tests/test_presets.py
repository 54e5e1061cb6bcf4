"""Presets, weight resolution (offline, safetensors only), the errors users see, and `flywheel models`."""

from __future__ import annotations

import json
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
from flywheel.models.stacks import DEFAULT_STACK, STACKS

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
    assert STACKS["flux1"].editor == "qwen-image-edit-2511-lightning" and "flux1 stack's editor" in fast.note
    assert ModelsConfig().editor == STACKS[DEFAULT_STACK].editor == "flux2-klein-4b"  # the default stack's fast klein
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
    folder = tmp_path / "cache" / "tiny" / "tiny-qwen2-vl-v2"
    assert (folder / ".complete").exists() and (folder / "model.safetensors").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert vlm.params()["max_pixels"] == PRESETS["tiny-qwen2-vl"].settings["max_pixels"]  # preset default
    again = load_vlm("tiny-qwen2-vl", ModelsConfig(vlm_max_pixels=56 * 56))  # config beats preset
    assert again.params()["max_pixels"] == 56 * 56
    assert load_vlm("tiny", ModelsConfig(vlm_max_pixels=56 * 56), max_pixels=999).params()["max_pixels"] == 999
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_template_documents_every_models_key():
    """Every [models] key is in the template; the roles commented out, so that changing the stack changes them."""
    text = render_config_template("A", "fw_a")
    data = tomllib.loads(text)
    roles = {"captioner", "judge", "editor", "base"}
    assert set(data["models"]) == set(ModelsConfig.model_fields) - roles and data["models"]["stack"] == "klein4b"
    assert parse_config(data).models == ModelsConfig()
    section = text[text.index("\n[models]\n"):text.index("\n[enrich]\n")]
    uncommented = tomllib.loads(re.sub(r"(?m)^# ((captioner|judge|editor|base) = .*)$", r"\1", section))["models"]
    assert set(uncommented) == set(ModelsConfig.model_fields)
    assert parse_config({**data, "models": uncommented}).models == ModelsConfig()  # the comments show the stack's


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


def test_presets_carry_licence_size_and_vram_class():
    from flywheel.models.presets import VRAM_CLASSES

    classes = {f"{c} GB" for c in VRAM_CLASSES}
    for p in PRESETS.values():
        if p.tiny:
            assert p.licence is None and p.vram_class == "CPU"
            continue
        assert p.licence is not None and p.licence.url.startswith("https://") and p.disk_gb > 0, p.name
        assert p.vram_class in classes and p.vram_gib <= int(p.vram_class.split()[0]), p.name
    closed = {name for name, p in PRESETS.items() if p.licence and not p.licence.commercial}
    assert {"flux-dev", "flux-kontext-dev", "flux-kontext-dev-turbo", "qwen2.5-vl-3b"} <= closed
    assert not {"flux-schnell", "qwen2-vl-2b", "qwen3-vl-8b", "qwen-image-edit-2511-lightning"} & closed
    assert (PRESETS["qwen2-vl-2b"].vram_class, PRESETS["flux-dev"].vram_class) == ("8 GB", "48 GB")
    assert PRESETS["qwen-image-edit-2511-lightning"].vram_class == "80 GB"


def _cached_repo(cache, repo_id: str, files: dict[str, str]) -> None:
    """A repo in the HF cache layout `hf download` leaves: refs/main -> snapshots/<commit>/<files>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _table(output: str, first: str) -> dict[str, dict[str, str]]:
    """The plain-column table whose header starts with ``first``, cut at the header's column starts."""
    lines = output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(first + " "))
    header = lines[top]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 2:i] == "  ")]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
    rows = {}
    for line in lines[top + 1:]:
        if not line.strip() or line.startswith(('"', "VRAM:", "[models]")):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows[cells[0].split()[0]] = dict(zip(names, cells))
    return rows


def test_models_list_shows_licence_size_vram_and_what_the_hf_cache_holds(tmp_path, monkeypatch):
    """Downloaded = the main snapshot has every file the loader reads (and the preset's LoRA); read offline."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("FLYWHEEL_CACHE", str(tmp_path / "fw"))
    _cached_repo(cache, "Qwen/Qwen2-VL-2B-Instruct", {"config.json": "{}", "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}),
        "model-00001-of-00002.safetensors": "", "model-00002-of-00002.safetensors": ""})
    _cached_repo(cache, "Qwen/Qwen2-VL-7B-Instruct", {"config.json": "{}", "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}),
        "model-00001-of-00002.safetensors": ""})  # a download that stopped after the first shard
    index = {"transformer": ["diffusers", "FluxTransformer2DModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    _cached_repo(cache, "black-forest-labs/FLUX.1-dev", {
        "model_index.json": json.dumps(index), "transformer/config.json": "{}",
        "transformer/diffusion_pytorch_model.safetensors": "", "scheduler/scheduler_config.json": "{}",
        "text_encoder/config.json": "{}", "flux1-dev.safetensors": ""})  # the text encoder's weights are missing
    qwen_edit = {"model_index.json": json.dumps({"transformer": ["diffusers", "QwenImageTransformer2DModel"]}),
                 "transformer/config.json": "{}", "transformer/diffusion_pytorch_model.safetensors": ""}
    _cached_repo(cache, "Qwen/Qwen-Image-Edit-2511", qwen_edit)
    _cached_repo(cache, "lightx2v/Qwen-Image-Edit-2511-Lightning",
                 {"Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors": ""})  # the 4-step LoRA only
    listing = CliRunner().invoke(main, ["models", "list"])
    assert listing.exit_code == 0, listing.output
    presets, stacks = _table(listing.output, "preset"), _table(listing.output, "stack")
    assert {k: presets["qwen2-vl-2b"][k] for k in ("role", "family", "licence", "commercial", "on disk", "VRAM",
                                                   "downloaded", "hub id")} == \
        {"role": "vlm", "family": "qwen_vl", "licence": "Apache-2.0", "commercial": "yes", "on disk": "4.4 GB",
         "VRAM": "8 GB", "downloaded": "yes", "hub id": "Qwen/Qwen2-VL-2B-Instruct"}
    flux = presets["flux-dev"]
    assert (flux["licence"], flux["commercial"], flux["on disk"], flux["VRAM"], flux["smaller card"]) == \
        ("FLUX.1 [dev] Non-Commercial", "no", "33.7 GB", "48 GB", "24 GB with fp8 + cpu_offload")
    downloaded = {name: row["downloaded"] for name, row in presets.items()}
    assert downloaded["flux-dev"] == "partly" and downloaded["qwen2-vl-7b"] == "partly"
    assert downloaded["qwen-image-edit-2511"] == downloaded["qwen-image-edit-2511-lightning"] == "yes"
    assert downloaded["qwen-image-edit-2511-lightning-8step"] == "partly"  # its LoRA is not cached
    assert downloaded["flux-schnell"] == downloaded["tiny-flux"] == "no"
    assert set(PRESETS) == set(presets)
    assert {k: stacks["flux1"][k] for k in ("captioner", "editor", "base", "[enrich] backend", "commercial")} == \
        {"captioner": "qwen2-vl-2b", "editor": "qwen-image-edit-2511-lightning", "base": "flux-dev",
         "[enrich] backend": "qwen-image-edit", "commercial": "no: flux-dev"}
    assert stacks["flux1-kontext"]["commercial"] == "no: flux-dev, flux-kontext-dev"
