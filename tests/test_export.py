"""Exporting a frozen dataset version as kohya / ai-toolkit folders and a Hugging Face imagefolder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from flywheel.dataset import freeze_dataset
from flywheel.errors import StageError
from flywheel.export import export_dataset


@pytest.fixture
def frozen(project):
    for i, color in enumerate([(200, 0, 0), (0, 200, 0)]):
        sha, _ = project.store.put_image(Image.new("RGB", (64, 32), color))
        image_id = project.catalog.insert("images", {"sha256": sha, "pixel_sha256": sha, "phash": "0" * 16,
                                                     "width": 64, "height": 32, "kind": "source", "round": 0})
        if i == 0:
            project.catalog.insert("captions", {"image_id": image_id, "text": "fw_test, red, café", "source": "human"})
    freeze_dataset(project, 1)
    return project


def test_kohya_layout_pairs_images_with_captions(frozen, tmp_path):
    res = export_dataset(frozen, tmp_path / "out", fmt="kohya", repeats=5)
    assert res.folder == (tmp_path / "out" / "5_fw_test").resolve() and res.images == 2
    assert sorted(p.name for p in res.folder.iterdir()) == ["0001.png", "0001.txt", "0002.png", "0002.txt"]
    assert (res.folder / "0001.txt").read_text(encoding="utf-8") == "fw_test, red, café\n"
    assert (res.folder / "0002.txt").read_text(encoding="utf-8") == "fw_test\n"  # no caption: the trigger
    with Image.open(res.folder / "0001.png") as im:
        assert im.size == (64, 32) and im.getpixel((0, 0)) == (200, 0, 0)
    flat = export_dataset(frozen, tmp_path / "flat", fmt="ai-toolkit")
    assert (flat.folder / "0001.txt").is_file() and flat.folder == (tmp_path / "flat").resolve()


def test_imagefolder_metadata_and_safe_destination(frozen, tmp_path):
    res = export_dataset(frozen, tmp_path / "hf", fmt="imagefolder")
    rows = [json.loads(line) for line in (res.folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["file_name"], r["text"]) for r in rows] == [("0001.png", "fw_test, red, café"), ("0002.png", "fw_test")]
    assert all((res.folder / r["file_name"]).is_file() for r in rows)
    with pytest.raises(StageError, match="not empty"):
        export_dataset(frozen, tmp_path / "hf", fmt="imagefolder")
    export_dataset(frozen, tmp_path / "hf", fmt="kohya", overwrite=True)
    assert not (tmp_path / "hf" / "metadata.jsonl").exists()
    with pytest.raises(StageError, match="unknown export format"):
        export_dataset(frozen, tmp_path / "x", fmt="zip")
    with pytest.raises(StageError, match="v9"):
        export_dataset(frozen, tmp_path / "y", version=9)


def test_cli_export(frozen, tmp_path):
    from click.testing import CliRunner

    from flywheel.cli import main

    out = tmp_path / "cli-out"
    r = CliRunner().invoke(main, ["-C", str(frozen.root), "export", str(out), "--format", "imagefolder"])
    assert r.exit_code == 0, r.output
    assert "2 images" in r.output and (out / "metadata.jsonl").is_file()
    r = CliRunner().invoke(main, ["-C", str(frozen.root), "export", str(out)])
    assert r.exit_code == 1 and "not empty" in r.output and "--overwrite" in r.output


# Keys each trainer documents; every key the exported configs use must be one of them.
# ai-toolkit: config/examples/train_lora_flux_24gb.yaml and toolkit/config_modules.py (DatasetConfig).
AI_TOOLKIT_KEYS = {
    "job": None, "meta": {"name", "version"},
    "config": {"name", "process"},
    "process": {"type", "training_folder", "device", "trigger_word", "network", "save", "datasets", "train", "model",
                "sample"},
    "network": {"type", "linear", "linear_alpha"},
    "save": {"dtype", "save_every", "max_step_saves_to_keep", "push_to_hub"},
    "datasets": {"folder_path", "caption_ext", "caption_dropout_rate", "shuffle_tokens", "cache_latents_to_disk",
                 "resolution", "default_caption", "trigger_word", "num_repeats", "use_short_captions"},
    "train": {"batch_size", "steps", "gradient_accumulation_steps", "train_unet", "train_text_encoder",
              "gradient_checkpointing", "noise_scheduler", "optimizer", "lr", "dtype", "ema_config"},
    "model": {"name_or_path", "is_flux", "arch", "quantize", "low_vram"},  # arch: ModelConfig, FLUX.2 klein
    "sample": {"sampler", "sample_every", "width", "height", "prompts", "neg", "seed", "walk_seed", "guidance_scale",
               "sample_steps"},
}
# kohya sd-scripts docs/config_README-en.md: where each option may be registered.
KOHYA_GENERAL = {"shuffle_caption", "caption_extension", "keep_tokens", "enable_bucket", "bucket_no_upscale",
                 "bucket_reso_steps", "resolution", "batch_size", "caption_dropout_rate", "num_repeats"}
KOHYA_DATASET = {"batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                 "min_bucket_reso", "resolution", "skip_image_resolution"}
KOHYA_SUBSET = {"image_dir", "caption_extension", "class_tokens", "cache_info", "is_reg", "num_repeats", "keep_tokens",
                "shuffle_caption", "flip_aug", "color_aug", "caption_prefix", "caption_suffix", "caption_dropout_rate",
                "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "random_crop"}


def _ai_toolkit(path):
    import yaml

    job = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(job) == {"job", "config", "meta"} and job["job"] == "extension"
    assert set(job["meta"]) <= AI_TOOLKIT_KEYS["meta"] and set(job["config"]) <= AI_TOOLKIT_KEYS["config"]
    (process,) = job["config"]["process"]
    assert set(process) <= AI_TOOLKIT_KEYS["process"] and process["type"] == "sd_trainer"
    for key in ("network", "save", "train", "model", "sample"):
        assert set(process[key]) <= AI_TOOLKIT_KEYS[key], key
    for ds in process["datasets"]:
        assert set(ds) <= AI_TOOLKIT_KEYS["datasets"]
    return process


def _kohya(path):
    import tomllib

    cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    assert set(cfg) == {"general", "datasets"} and set(cfg["general"]) <= KOHYA_GENERAL
    for ds in cfg["datasets"]:
        assert set(ds) - {"subsets"} <= KOHYA_DATASET
        for sub in ds["subsets"]:
            assert set(sub) <= KOHYA_SUBSET and "image_dir" in sub
    return cfg


def test_configs_beside_the_data_point_at_it_and_parse(frozen, tmp_path):
    frozen.config.train.rank, frozen.config.train.steps = 8, 1500
    res = export_dataset(frozen, tmp_path / "out", fmt="kohya", repeats=5)
    yaml_path, toml_path = res.configs
    assert (yaml_path, toml_path) == ((tmp_path / "out" / "ai-toolkit.yaml").resolve(),
                                      (tmp_path / "out" / "kohya-dataset.toml").resolve())
    process = _ai_toolkit(yaml_path)
    (dataset,) = process["datasets"]
    assert dataset["folder_path"] == str(res.folder) and dataset["caption_ext"] == "txt"
    assert process["trigger_word"] == "fw_test" and process["network"] == {"type": "lora", "linear": 8, "linear_alpha": 16.0}
    assert process["train"]["steps"] == 1500  # the default stack's base, as ai-toolkit names the architecture
    assert process["model"] == {"name_or_path": "black-forest-labs/FLUX.2-klein-base-4B", "arch": "flux2_klein_4b",
                                "quantize": False}
    assert process["sample"]["prompts"][0] == "a photo of [trigger], portrait, soft window light"
    (ds,) = _kohya(toml_path)["datasets"]
    (sub,) = ds["subsets"]
    assert sub == {"image_dir": str(res.folder), "caption_extension": ".txt", "num_repeats": 5,
                   "class_tokens": "fw_test", "caption_dropout_rate": 0.05}
    assert ds["resolution"] == 1024 and ds["bucket_no_upscale"] is True
    hf = export_dataset(frozen, tmp_path / "hf", fmt="imagefolder")
    assert hf.configs == [] and not (tmp_path / "hf" / "ai-toolkit.yaml").exists()  # imagefolder: no pairs to train


def test_class_word_and_short_captions(frozen, tmp_path):
    image_id = frozen.catalog.query("SELECT image_id FROM captions")[0][0]
    frozen.catalog.insert("captions", {"image_id": image_id, "source": "human",
                                       "text": "fw_test in a red room. Soft light falls from the left."})
    freeze_dataset(frozen, 1)
    res = export_dataset(frozen, tmp_path / "out", fmt="ai-toolkit", class_word="woman", short_captions=True)
    assert (res.folder / "0001.txt").read_text(encoding="utf-8") == (
        "fw_test woman in a red room. Soft light falls from the left.\n")
    assert (res.folder / "0001.short.txt").read_text(encoding="utf-8") == "fw_test woman in a red room.\n"
    assert (res.folder / "0002.txt").read_text(encoding="utf-8") == "fw_test woman\n"
    process = _ai_toolkit(res.configs[0])
    assert process["trigger_word"] == "fw_test woman"
    assert [d["caption_ext"] for d in process["datasets"]] == ["txt", "short.txt"]
    datasets = _kohya(res.configs[1])["datasets"]
    assert [d["subsets"][0]["caption_extension"] for d in datasets] == [".txt", ".short.txt"]
    assert {d["subsets"][0]["class_tokens"] for d in datasets} == {"fw_test woman"}
    hf = export_dataset(frozen, tmp_path / "hf", fmt="imagefolder", short_captions=True)
    row = json.loads((hf.folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert (row["text"], row["text_short"]) == ("fw_test in a red room. Soft light falls from the left.",
                                                "fw_test in a red room.")
    with pytest.raises(StageError, match="not a word or two"):
        export_dataset(frozen, tmp_path / "bad", class_word="wo\nman; rm")
    with pytest.raises(StageError, match="holds the project itself"):
        export_dataset(frozen, frozen.root.parent, overwrite=True)
    assert (frozen.workspace / "catalog.sqlite").is_file()


def test_cli_freeze_then_export_with_freeze(project, tmp_path):
    from click.testing import CliRunner

    from flywheel.cli import main

    def add(kind, color, verdict=None, caption=None):
        sha, _ = project.store.put_image(Image.new("RGB", (64, 64), color))
        image_id = project.catalog.insert("images", {"sha256": sha, "pixel_sha256": sha, "phash": "0" * 16,
                                                     "width": 64, "height": 64, "kind": kind, "round": 0})
        if verdict:
            project.catalog.insert("verdicts", {"image_id": image_id, "verdict": verdict, "reason": "test"})
        if caption:
            project.catalog.insert("captions", {"image_id": image_id, "text": caption, "source": "template"})
        return image_id

    add("source", (1, 1, 1), caption="a photo of fw_test")
    add("source", (2, 2, 2))
    add("enriched", (3, 3, 3), "accepted", "fw_test in a forest")
    mine = add("enriched", (4, 4, 4), "needs_review", "fw_test at night")
    project.catalog.insert("reviews", {"image_id": mine, "decision": "accepted", "reviewer": "me"})
    add("enriched", (5, 5, 5), "needs_review")
    add("enriched", (6, 6, 6), "rejected")
    add("enriched", (7, 7, 7))
    r = CliRunner().invoke(main, ["-C", str(project.root), "freeze"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == (
        "dataset v1 (round 1): 4 images (2 source, 2 enriched); 3 captioned, 1 uncaptioned; "
        "accepted: 1 by you, 1 by the judge; left out: 1 rejected, 1 need review, 1 not judged")
    assert ("Not ready to train: 1 uncaptioned; 1 not judged; 1 waiting for your review. "
            "Run `flywheel caption`, `flywheel judge`, `flywheel review`, then freeze again.") in r.output
    assert "Next: flywheel export DEST --dataset 1, or flywheel train --dataset 1" in r.output

    out = tmp_path / "cli-out"
    r = CliRunner().invoke(main, ["-C", str(project.root), "export", str(out), "--freeze", "--class-word", "robot"])
    assert r.exit_code == 0, r.output
    assert "froze dataset v2 (round 1): 4 images" in r.output and "dataset v2: 4 images ->" in r.output
    assert f"ai-toolkit job: {(out / 'ai-toolkit.yaml').resolve()}" in r.output
    assert f"kohya dataset config: {(out / 'kohya-dataset.toml').resolve()}" in r.output
    assert (out / "10_fw_test" / "0003.txt").read_text(encoding="utf-8") == "fw_test robot in a forest\n"
    assert project.catalog.query("SELECT COUNT(*) FROM dataset_versions")[0][0] == 2
    r = CliRunner().invoke(main, ["-C", str(project.root), "export", str(tmp_path / "x"), "--freeze", "--dataset", "1"])
    assert r.exit_code == 1 and "Error: --freeze makes a new version" in r.output
    assert project.catalog.query("SELECT COUNT(*) FROM dataset_versions")[0][0] == 2


def test_configs_quote_any_folder_name(frozen, tmp_path):
    dest = tmp_path / 'my "set" \\ été\tv1'
    res = export_dataset(frozen, dest, fmt="ai-toolkit")
    assert _ai_toolkit(res.configs[0])["datasets"][0]["folder_path"] == str(res.folder)
    assert _kohya(res.configs[1])["datasets"][0]["subsets"][0]["image_dir"] == str(res.folder)
