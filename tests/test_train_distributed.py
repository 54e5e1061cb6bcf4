"""``flywheel train --gpus N``: N processes (gloo on the CPU here) train the LoRA one process trains with N x the
batch, resume bit for bit, and only rank 0 writes (the parent process records everything in the catalog).

Tolerance: N ranks each run the forward on their slice of the batch and the gradients are summed across
ranks, so matmul blocking and the order of float additions differ from one process on the whole batch;
everything drawn (data order, caption dropout, t, noise) is identical. On the tiny FLUX over 4 steps the
differences stay below 1e-4 relative on the losses and 1e-4 absolute on the LoRA weights (measured on a 2-core
x86 CPU: usually 9e-8 and 1.4e-7, the LoRA weights being up to 0.85). Once, in a full CI run on a loaded
machine, one LoRA element of 128 was 2.0e-5 apart: AdamW divides each gradient by its own running size, so an
element whose gradient is near AdamW's eps (LoRA A's, which starts from a zero B) turns a rounding difference
in the gradient into a visible one in the update. 1e-4 stays 50x below one step of the learning rate (5e-3),
which any real difference (another slice, other noise, a gradient counted twice) moves the weights by.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_train import add_source, pattern

from flywheel.config import TrainConfig

LOSS_RTOL, LORA_ATOL = 1e-4, 1e-4


def train(project, *args, **kwargs):
    from flywheel.train import train as run_train

    return run_train(project, *args, force=True, **kwargs)


@pytest.fixture
def cfg(tiny_flux_dir) -> TrainConfig:
    return TrainConfig(
        base_model=str(tiny_flux_dir), resolution=64, bucket_step=16, rank=4, alpha=8, steps=4, learning_rate=5e-3,
        caption_dropout=0.3, gradient_checkpointing=False, compile=False, max_sequence_length=32, checkpoint_every=2,
        sample_every=2, sample_prompts=["a photo of {trigger}"], sample_seeds=[0], sample_steps=1, sample_size=64,
    )


@pytest.fixture
def four_and_one(project):
    """Four 64x64 images (full global batches) and one 96x64 (a last batch split unevenly: one rank idles)."""
    for seed in range(4):
        add_source(project, pattern(64, 64, seed), f"fw_test pattern {seed}")
    add_source(project, pattern(96, 64, 9), "fw_test on a beach, wide shot")
    return project


def lora(result) -> dict:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(result.lora_path)).items()}


def outputs(project, result) -> tuple[Counter, list[str]]:
    """Artifact kinds in the catalog, and the run folder's files (names relative to the run folder)."""
    kinds = Counter(r["kind"] for r in project.catalog.query("SELECT kind FROM artifacts WHERE lora_run_id = ?",
                                                              (result.run_id,)))
    return kinds, sorted(str(p.relative_to(result.run_dir)) for p in result.run_dir.rglob("*") if p.is_file())


@pytest.mark.slow  # worker processes start (spawn) and load the tiny FLUX each
def test_two_processes_train_what_one_process_trains_with_twice_the_batch_and_resume_bit_exact(four_and_one, cfg):
    one = train(four_and_one, cfg.model_copy(update={"batch_size": 2, "gradient_accumulation": 2}))
    two_cfg = cfg.model_copy(update={"gpus": 2, "batch_size": 1, "gradient_accumulation": 2})
    two = train(four_and_one, two_cfg, dataset_version=one.dataset_version, device="cpu")
    assert len(two.losses) == cfg.steps
    np.testing.assert_allclose(two.losses, one.losses, rtol=LOSS_RTOL)
    a, b = lora(one), lora(two)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=LORA_ATOL, rtol=0)

    # The effective batch is stated; rank 0 alone wrote the same files and catalog rows as the one process.
    batch = json.loads((two.run_dir / "config.json").read_text())["batch"]
    assert batch == {"gpus": 2, "processes": 2, "batch_size_per_process": 1, "gradient_accumulation": 2,
                     "effective_batch": 4, "path": "distributed"}
    assert outputs(four_and_one, two) == outputs(four_and_one, one)
    assert outputs(four_and_one, two)[0]["sample"] == 2  # step 2 and the end, rendered once (by rank 0)
    assert four_and_one.catalog.query("SELECT status FROM lora_runs WHERE id = ?", (two.run_id,))[0][0] == "ok"
    loads = four_and_one.catalog.query("SELECT COUNT(*) FROM operations WHERE stage = 'train' "
                                       "AND json_extract(params_json, '$.action') = 'load'")[0][0]
    assert loads == 2  # one base load per run: rank 1's is not recorded

    # Killed after step 3 (checkpoint at 2), then resumed with the run's own settings: the same losses and
    # LoRA as the uninterrupted two-process run, bit for bit.
    class Killed(Exception):
        pass

    def kill_at_step_3(done: int, total: int, label: str = "") -> None:
        if done == 3:
            raise Killed

    with pytest.raises(Killed):
        train(four_and_one, two_cfg, dataset_version=one.dataset_version, device="cpu", progress=kill_at_step_3)
    assert four_and_one.catalog.query("SELECT status FROM lora_runs ORDER BY id DESC LIMIT 1")[0][0] == "failed"
    resumed = train(four_and_one, resume=True, device="cpu")
    assert resumed.losses == two.losses
    c = lora(resumed)
    assert all(np.array_equal(b[k], c[k]) for k in b)


@pytest.mark.slow  # worker processes start (spawn) and load the tiny FLUX each
def test_one_process_through_the_distributed_path_trains_exactly_like_the_plain_path(four_and_one, cfg):
    plain = train(four_and_one, cfg.model_copy(update={"batch_size": 2}))
    dist1 = train(four_and_one, cfg.model_copy(update={"batch_size": 2, "gpus": 1}),
                  dataset_version=plain.dataset_version, device="cpu")
    assert dist1.losses == plain.losses
    a, b = lora(plain), lora(dist1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert outputs(four_and_one, dist1) == outputs(four_and_one, plain)


def test_gpus_without_cuda_is_one_line_and_records_nothing(four_and_one, cfg, monkeypatch):
    import torch

    from flywheel.errors import ConfigError, NoGPUError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGPUError) as err:
        train(four_and_one, cfg.model_copy(update={"gpus": 2}))
    assert err.value.args[0] == "[train] gpus = 2 (--gpus 2) needs 2 CUDA GPU(s), but PyTorch sees none"
    assert "--gpus 2 --device cpu" in err.value.hint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    with pytest.raises(ConfigError) as err:
        train(four_and_one, cfg.model_copy(update={"gpus": 2}), device="cuda")
    assert err.value.args[0] == ("[train] gpus = 2 (--gpus 2) asks for more GPUs than are visible "
                                 "(1 from cuda:0; 0: NVIDIA H200)")
    assert err.value.hint.startswith("use --gpus 1 or fewer")
    assert four_and_one.catalog.query("SELECT COUNT(*) FROM lora_runs")[0][0] == 0
    assert four_and_one.catalog.query("SELECT COUNT(*) FROM dataset_versions")[0][0] == 0


def test_cli_gpus_flag_says_what_to_do_without_a_gpu(four_and_one, cfg, monkeypatch):
    import torch
    from click.testing import CliRunner

    from flywheel.cli import main

    toml = f'[project]\nname = "Test"\ntrigger = "fw_test"\n[train]\nbase_model = {json.dumps(cfg.base_model)}\n'
    (four_and_one.root / "flywheel.toml").write_text(toml, encoding="utf-8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(main, ["-C", str(four_and_one.root), "train", "--gpus", "2", "--force"])
    assert res.exit_code == 1
    assert "Error: [train] gpus = 2 (--gpus 2) needs 2 CUDA GPU(s), but PyTorch sees none" in res.output
    assert "Traceback" not in res.output


def test_only_rank_0_may_touch_the_catalog():
    from flywheel.errors import StageError
    from flywheel.training.distributed import Ranks
    from flywheel.training.launch import NoCatalog

    with pytest.raises(StageError, match="training rank 1 tried to use the catalog .insert."):
        NoCatalog(1).insert("artifacts", {})
    parts = [Ranks(rank=r, world=2).part(n) for n in (4, 3, 1) for r in (0, 1)]
    assert parts == [slice(0, 2), slice(2, 4), slice(0, 1), slice(1, 3), slice(0, 0), slice(0, 1)]
