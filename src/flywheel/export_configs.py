"""Ready-to-run trainer configs written next to an exported dataset (``flywheel export``).

- ``ai-toolkit.yaml``: an ostris/ai-toolkit job (``python run.py ai-toolkit.yaml``), laid out like its
  ``config/examples/train_lora_flux_24gb.yaml``: one ``sd_trainer`` process with the dataset folder, the
  trigger word, and the network, train, model and sample settings taken from ``[train]``; a klein base
  names its ai-toolkit model class (``arch: flux2_klein_4b`` / ``flux2_klein_9b``) instead of ``is_flux``.
- ``kohya-dataset.toml``: a kohya sd-scripts dataset config (``flux_train_network.py --dataset_config``)
  with the keys of its ``docs/config_README-en.md``: one DreamBooth-style subset on the folder, its repeats,
  the class tokens (used only for an image without a caption file) and the caption dropout.
With short captions exported as well (``NNNN.short.txt``), each file gets a second dataset on the same
folder reading them, so every image trains with both its long and its short caption.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

AI_TOOLKIT_FILE = "ai-toolkit.yaml"
KOHYA_FILE = "kohya-dataset.toml"
SHORT_SUFFIX = ".short.txt"
DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"  # when the project trains a tiny test stand-in
KLEIN_BASE_4B, KLEIN_BASE_9B = "black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-base-9B"
TINY_BASES = {"tiny-flux2-klein-base": KLEIN_BASE_4B}  # a tiny twin exports as the base it stands in for
# ai-toolkit's model classes for the klein bases (`arch` of its Flux2Klein4BModel / Flux2Klein9BModel);
# FLUX.1 is its default model (`is_flux`).
AI_TOOLKIT_ARCH = {KLEIN_BASE_4B: "flux2_klein_4b", KLEIN_BASE_9B: "flux2_klein_9b"}


def trainer_base(project) -> str:
    """The base other trainers should load: the preset's hub id, or the folder / hub id as configured."""
    from flywheel.models.presets import get_preset

    spec = project.config.train.base_model or project.config.models.base
    preset = get_preset(spec, role="text_to_image")
    if preset is not None:  # a tiny preset has no hub id: it exists only in tests and the demo
        return preset.hub_id or TINY_BASES.get(preset.name, DEFAULT_BASE)
    return spec


def write_ai_toolkit(path: Path, project, folder: Path, *, trigger_phrase: str, version: int, images: int,
                     short_captions: bool) -> Path:
    import yaml

    cfg = project.config.train
    resolutions = sorted({r for r in (512, 768, 1024) if r < cfg.resolution} | {cfg.resolution})
    base = trainer_base(project)
    arch = AI_TOOLKIT_ARCH.get(base)
    model = ({"name_or_path": base, "arch": arch} if arch else {"name_or_path": base, "is_flux": True})
    dataset = {"folder_path": str(folder), "caption_ext": "txt", "caption_dropout_rate": cfg.caption_dropout,
               "shuffle_tokens": False, "cache_latents_to_disk": True, "resolution": resolutions}
    datasets = [dataset]
    if short_captions:
        datasets.append({**dataset, "caption_ext": SHORT_SUFFIX.lstrip(".")})
    prompts = [p.replace("{trigger}", "[trigger]") for p in cfg.sample_prompts]  # ai-toolkit fills in [trigger]
    job = {
        "job": "extension",
        "config": {
            "name": f"{project.config.project.trigger}_v{version}",
            "process": [{
                "type": "sd_trainer",
                "training_folder": "output",
                "device": "cuda:0",
                "trigger_word": trigger_phrase,
                "network": {"type": "lora", "linear": cfg.rank, "linear_alpha": cfg.alpha},
                "save": {"dtype": "float16", "save_every": cfg.checkpoint_every,
                         "max_step_saves_to_keep": cfg.keep_checkpoints},
                "datasets": datasets,
                "train": {"batch_size": cfg.batch_size, "steps": cfg.steps, "gradient_accumulation_steps": 1,
                          "train_unet": True, "train_text_encoder": False,
                          "gradient_checkpointing": cfg.gradient_checkpointing, "noise_scheduler": "flowmatch",
                          "optimizer": "adamw8bit" if cfg.optimizer == "adamw8bit" else "adamw",
                          "lr": cfg.learning_rate, "dtype": "bf16"},
                "model": {**model, "quantize": cfg.quantize_base != "none"},
                "sample": {"sampler": "flowmatch", "sample_every": cfg.sample_every or cfg.steps,
                           "width": cfg.sample_size, "height": cfg.sample_size, "prompts": prompts, "neg": "",
                           "seed": cfg.sample_seeds[0] if cfg.sample_seeds else 42, "walk_seed": True,
                           "guidance_scale": 4.0 if arch else 3.5, "sample_steps": cfg.sample_steps},
            }],
        },
        "meta": {"name": "[name]", "version": "1.0"},
    }
    header = (f"# ai-toolkit (ostris/ai-toolkit) job written by `flywheel export`: dataset v{version}, {images} images.\n"
              f"# Run from the ai-toolkit folder: python run.py {json.dumps(str(path))}\n"
              "# Network, steps, learning rate and samples come from [train] in flywheel.toml; edit freely.\n")
    path.write_text(header + yaml.safe_dump(job, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")
    return path


def write_kohya(path: Path, project, folder: Path, *, trigger_phrase: str, repeats: int, version: int, images: int,
                short_captions: bool) -> Path:
    cfg = project.config.train
    lines = [
        f"# kohya sd-scripts dataset config written by `flywheel export`: dataset v{version}, {images} images.",
        f"# accelerate launch flux_train_network.py --dataset_config {json.dumps(str(path))} ...",
        "# (the model, network and optimizer options stay on the command line; docs/config_README-en.md)",
        "[general]",
        f"caption_extension = {_toml('.txt')}",
        "shuffle_caption = false",
    ]
    for ext in [".txt", SHORT_SUFFIX] if short_captions else [".txt"]:
        lines += [
            "",
            "[[datasets]]",
            f"resolution = {cfg.resolution}",
            f"batch_size = {cfg.batch_size}",
            "enable_bucket = true",
            "bucket_no_upscale = true  # as flywheel trains: a small image is never upscaled",
            f"bucket_reso_steps = {cfg.bucket_step}",
            "",
            "  [[datasets.subsets]]",
            f"  image_dir = {_toml(str(folder))}",
            f"  caption_extension = {_toml(ext)}",
            f"  num_repeats = {repeats}",
            f"  class_tokens = {_toml(trigger_phrase)}",
            f"  caption_dropout_rate = {_toml(cfg.caption_dropout)}",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    """A TOML literal for a string, number or bool. JSON's string escapes are TOML's, except DEL (U+007F),
    which TOML also wants escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
