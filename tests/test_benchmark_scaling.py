"""benchmarks/scaling.py: which repos a stack needs (built only when missing from the cache) and the driver
time breakdown it prints when a stage scales below the goal, on a local Ray cluster."""

from __future__ import annotations

import importlib.util
import time
from collections import defaultdict
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_stack_has_builders_for_its_roles_and_a_tiny_twin(scaling):
    from flywheel.models.stacks import DEFAULT_STACK, STACKS

    full = [s for name, s in STACKS.items() if not name.startswith("tiny")]
    assert DEFAULT_STACK in {s.name for s in full}
    for stack in full:
        for preset in (stack.editor, stack.captioner, stack.base):
            assert preset in scaling.builders(), f"{stack.name}: no random-weight builder for {preset}"
        assert scaling.TINY[stack.name] in STACKS
    assert scaling.TINY["klein4b"] == "tiny-klein"


def test_ensure_reuses_a_complete_repo_and_builds_a_missing_one(scaling, tmp_path, monkeypatch, capsys):
    from argparse import Namespace

    fullsize = scaling.fullsize
    built = []
    monkeypatch.setattr(scaling, "builders", lambda: {
        "flux2-klein-4b": (fullsize.KLEIN_4B, lambda cache, *, tiny, device: built.append((cache, tiny, device))),
        "qwen3-vl-4b": (fullsize.QWEN3_VL_4B, lambda cache, *, tiny, device: built.append((cache, tiny, device)))})
    (fullsize.snapshot_dir(tmp_path, fullsize.QWEN3_VL_4B) / ".complete").write_text("built by loop.py")
    args = Namespace(tiny=False, build_device="cuda")
    scaling.ensure("qwen3-vl-4b", tmp_path, args)
    scaling.ensure("flux2-klein-4b", tmp_path, args)
    assert built == [(tmp_path, False, "cuda")]
    assert f"reusing {fullsize.QWEN3_VL_4B} from {tmp_path}" in capsys.readouterr().out
    scaling.ensure("flux2-klein-4b", tmp_path, Namespace(tiny=True, build_device="cpu"))  # tiny presets: nothing
    assert len(built) == 1


def test_profile_splits_the_driver_time_of_a_stage_on_replicas(scaling):
    ray = pytest.importorskip("ray")
    from flywheel.compute import map_calls
    from flywheel.compute.ray_pool import RemoteModel
    from flywheel.config_compute import ComputeConfig

    class Slow:  # defined here: Ray ships it to the replicas by value
        def work(self, x):
            time.sleep(0.2)
            return x * 2

    def items():
        for i in range(6):
            time.sleep(0.05)  # the stage reading a unit's inputs
            yield i, (i,)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        model = RemoteModel(ComputeConfig(backend="ray", actors=2, gpus_per_actor=0, cpus_per_actor=1), Slow, "slow")
        try:
            with scaling.profile(defaultdict(float)) as totals:
                t0 = time.perf_counter()
                values = []
                for out in map_calls(model, "work", items()):
                    values.append(out.value)
                    time.sleep(0.1)  # the stage recording the result
                stage = time.perf_counter() - t0
        finally:
            model.close()
    finally:
        if started:
            ray.shutdown()
    assert values == [0, 2, 4, 6, 8, 10]
    assert totals["prepare"] == pytest.approx(0.3, abs=0.1)
    assert totals["record"] == pytest.approx(0.6, abs=0.15)
    assert totals["busy"] == pytest.approx(1.2, abs=0.2)
    assert totals["wait"] > 0 and totals["send"] > 0
    assert totals["in_map"] + totals["record"] == pytest.approx(stage, abs=0.05)
    assert RemoteModel.map_remote.__name__ == "map_remote"  # unwrapped again after the stage
    text = scaling.breakdown({"profile": dict(totals), "stage_s": stage, "replicas": 2})
    assert "record results" in text and "replicas busy 1." in text and f"of 2 x {stage:.2f} s" in text
