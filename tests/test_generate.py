"""Round-k synthetic images: prompt bank x seeds with LoRA round k, each recorded with how it was made."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flywheel.config import GenerateConfig, TrainConfig
from flywheel.errors import ConfigError, StageError
from flywheel.generate import generate, prompt_bank


def _trained_project(project, tiny_flux_dir):
    from flywheel.train import train

    rng = np.random.default_rng(0)
    sha, _ = project.store.put_image(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    project.catalog.insert("images", {"sha256": sha, "pixel_sha256": sha, "phash": "0" * 16, "width": 64,
                                      "height": 64, "kind": "source", "round": 0})
    cfg = TrainConfig(base_model=str(tiny_flux_dir), resolution=64, bucket_step=16, rank=4, alpha=4, steps=2,
                      learning_rate=5e-2, gradient_checkpointing=False, max_sequence_length=32, sample_every=0,
                      sample_prompts=[], sample_steps=1, sample_size=64)
    return train(project, cfg, force=True)  # sources only: past train's readiness check


def test_prompt_bank_is_diverse_and_user_extendable():
    bank = prompt_bank("fw_x", GenerateConfig())
    assert len(bank) >= 20 and all("fw_x" in p for p in bank) and len(set(bank)) == len(bank)
    for framing in ("close-up", "full body", "wide shot", "low angle"):
        assert any(framing in p for p in bank)
    mine = prompt_bank("fw_x", GenerateConfig(use_shipped_prompts=False, extra_prompts=["{trigger} on the moon"]))
    assert mine == ["fw_x on the moon"]
    with pytest.raises(ConfigError, match="trigger"):
        prompt_bank("fw_x", GenerateConfig(extra_prompts=["a moon without the character"]))


def test_generate_records_each_image_and_resumes(project, tiny_flux_dir):
    with pytest.raises(StageError, match="no finished LoRA run"):
        generate(project, GenerateConfig())
    run = _trained_project(project, tiny_flux_dir)
    cfg = GenerateConfig(prompts=2, seeds_per_prompt=2, width=64, height=48, steps=2, max_sequence_length=32,
                         batch_size=3, extra_prompts=["{trigger} in a test scene"])
    result = generate(project, cfg)
    assert result.round == 1 and result.lora_run_id == run.run_id and len(result.image_ids) == 4
    rows = project.catalog.query(
        "SELECT i.*, o.params_json, o.seed AS op_seed, o.status, o.parent_id FROM images i "
        "JOIN operations o ON o.id = i.operation_id WHERE i.kind = 'synthetic' ORDER BY i.id")
    assert len(rows) == 4 and {r["round"] for r in rows} == {1} and {r["status"] for r in rows} == {"ok"}
    params = [json.loads(r["params_json"]) for r in rows]
    assert [(p["prompt"], p["seed"]) for p in params] == [
        (prompt, seed) for prompt in prompt_bank("fw_test", cfg) for seed in (0, 1)]
    for p, r in zip(params, rows):
        assert p["lora_run_id"] == run.run_id and p["lora_path"].endswith("pytorch_lora_weights.safetensors")
        assert (p["num_inference_steps"], p["guidance_scale"], p["width"], p["height"]) == (2, 3.5, 64, 48)
        assert r["op_seed"] == p["seed"] and r["parent_id"] is not None and (r["width"], r["height"]) == (64, 48)
    assert len({r["sha256"] for r in rows}) == 4  # different seeds, different images
    again = generate(project, cfg)  # everything is done already: nothing is redone
    assert again.image_ids == [] and again.skipped == 4


def test_a_run_killed_mid_batch_resumes_to_the_same_pixels(tmp_path, tiny_flux_dir):
    """The batch is re-rendered whole on resume: a smaller batch would change the last bits of the pixels."""
    from flywheel.project import init_project, open_project

    cfg = GenerateConfig(prompts=3, seeds_per_prompt=1, width=64, height=64, steps=2, max_sequence_length=32,
                         batch_size=3)

    def synthetic(project):
        return sorted(r[0] for r in project.catalog.query("SELECT sha256 FROM images WHERE kind = 'synthetic'"))

    init_project(tmp_path / "a", name="A", trigger="fw_test")
    with open_project(tmp_path / "a") as project:
        _trained_project(project, tiny_flux_dir)
        generate(project, cfg)
        expected = synthetic(project)
    init_project(tmp_path / "b", name="B", trigger="fw_test")
    with open_project(tmp_path / "b") as project:
        _trained_project(project, tiny_flux_dir)
        real_finish, calls = project.catalog.finish_operation, []

        def killed_after_first_image(op_id, status, *args, **kwargs):
            if kwargs.get("output_image_id") is not None:  # an image being recorded (not the model-load row)
                calls.append(op_id)
            if len(calls) == 2:  # the second image of the batch is being recorded: the process dies
                raise KeyboardInterrupt
            return real_finish(op_id, status, *args, **kwargs)

        project.catalog.finish_operation = killed_after_first_image
        with pytest.raises(KeyboardInterrupt):
            generate(project, cfg)
        project.catalog.finish_operation = real_finish
        assert len(synthetic(project)) == 1
        resumed = generate(project, cfg)
        assert (len(resumed.image_ids), resumed.skipped) == (2, 1)
        assert synthetic(project) == expected
