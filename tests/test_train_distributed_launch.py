"""What ``flywheel train --gpus N`` adds per step over the plain path must stay nothing: the steps of rank 0 send
the parent only their progress (no catalog round-trip, no log traffic), and the worker computes with the
parent's torch settings. A tiny step is CPU-bound, the regime where any such extra shows up in the step time
(docs/scaling.md)."""

from __future__ import annotations

import pytest
from test_train import add_source, pattern

from flywheel.config import TrainConfig


def report_settings(project, *, device, progress, ranks):
    """A ``launch`` target: this worker's torch settings."""
    from flywheel.training import process_settings

    return process_settings.capture()


@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_workers_compute_with_the_parents_torch_settings(project, api):
    """Whether the parent set its float32 precision through torch's legacy API or the per-backend one (after
    which the legacy flags cannot even be read), the worker ends up in the same state."""
    import torch

    from flywheel.training import process_settings
    from flywheel.training.launch import launch

    before = process_settings.capture()
    try:  # settings a user (or an earlier stage) set in the parent, none of them torch's default
        if api == "legacy":
            torch.set_float32_matmul_precision("high")
        else:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.enable_math_sdp(False)
        torch.set_num_threads(1)
        parent = process_settings.capture()
        worker = launch(project, "test_train_distributed_launch:report_settings", gpus=1, backend="gloo",
                        first_cuda=0, progress=lambda *a: None)
    finally:
        process_settings._set_all(torch, before["fp32_precision"])  # the new API first: it undoes a mixed state
        process_settings.apply(before, 1)
    after = process_settings.capture()  # this process is back as it was, for the tests that follow
    assert {k: v for k, v in after.items() if k != "fp32_precision"} == {
        k: v for k, v in before.items() if k != "fp32_precision"}
    assert parent != before
    assert (parent["legacy_precision"] is None) == (api == "fp32_precision")
    assert worker == parent


@pytest.mark.slow  # a worker process starts (spawn) and loads the tiny FLUX
def test_distributed_steps_send_the_parent_nothing_but_progress(project, tiny_flux_dir, monkeypatch):
    from flywheel.train import train
    from flywheel.training import launch

    for seed in range(2):
        add_source(project, pattern(64, 64, seed), f"fw_test pattern {seed}")
    cfg = TrainConfig(base_model=str(tiny_flux_dir), resolution=64, bucket_step=16, rank=4, alpha=8, steps=6,
                      gradient_checkpointing=False, compile=False, max_sequence_length=32, checkpoint_every=100,
                      sample_every=0, sample_prompts=[], gpus=1)
    received = []
    handle = launch._Server.handle
    monkeypatch.setattr(launch._Server, "handle", lambda self, conn, msg: (received.append(msg[0]),
                                                                           handle(self, conn, msg)))
    result = train(project, cfg, device="cpu", force=True)
    assert len(result.losses) == 6
    first, last = received.index("progress"), len(received) - 1 - received[::-1].index("progress")
    # Between the first and the last step's report: only the other steps' reports. A catalog call here would
    # be a synchronous round-trip to the parent in the loop; a log record, per-step traffic on rank 0's pipe.
    assert received[first:last + 1] == ["progress"] * 6
    assert "call" in received[last:]  # the outputs are recorded after the loop, through the parent
