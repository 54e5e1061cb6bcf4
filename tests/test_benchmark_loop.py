"""benchmarks/loop.py --tiny --device cpu: the GPU benchmark's own code path (random-weight repos in a hub
cache layout, offline preset resolution, the CLI from init to the evaluation report), at CI size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loop.py"
SMALL = ["--tiny", "--device", "cpu", "--sources", "1", "--recipes", "1", "--train-steps", "2", "--generate", "1",
         "--eval-prompts", "1", "--stock-edits", "0"]


@pytest.mark.slow
def test_loop_benchmark_runs_the_default_presets_through_the_cli(tmp_path):
    for phase in ("edit", "rest"):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path), "--phase", phase, *SMALL],
                              capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "extrapolated default run" in out and "goal 25 edits < 60 s" in out
    rest = json.loads((tmp_path / "results-rest.json").read_text())["rest"]
    steps = [s["step"] for s in rest["steps"]]
    assert steps == ["ingest", "enrich", "caption", "judge", "train round 1", "generate round 1", "caption", "judge",
                     "train round 2", "evaluate"]
    loads = {s["step"]: [model for model, _ in s["loads"]] for s in rest["steps"]}
    # The presets resolved by hub id from the random-weight cache; evaluate: one base for both rounds + the judge.
    assert loads["caption"] == ["qwen2-vl-2b"] and loads["judge"] == []
    assert len(loads["evaluate"]) == 2 and "models--black-forest-labs--FLUX.1-dev" in loads["evaluate"][0]
    assert all(s["status"] == "ok" for s in rest["steps"])
    assert [t["steps"] for t in rest["train"]] == [2, 2]
    assert rest["report"] and Path(rest["report"][0]).is_file()
    edit = json.loads((tmp_path / "edit.json").read_text())
    assert edit["fast"]["n"] == 1


def test_a_loop_resumed_by_a_second_command_is_reported_as_one_run(monkeypatch):
    """A GPU command's 10-minute limit kills `flywheel run`; the same command resumes it. The report adds each
    step's two parts instead of listing (and extrapolating) the loop twice."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import loop

    def step(name, seconds, peak=None, loads=(), status="ok"):
        return {"step": name, "seconds": seconds, "gpu_peak_gib": peak, "loads": list(loads), "status": status}

    first = [step("ingest", 0.5), step("enrich", 0.0), step("caption", 40, 15.1, [("vlm", 14.6)]),
             step("judge", 100), step("train round 1", 120, 20.0, [("base", 2.0)], status="running")]
    second = [step("ingest", 0.4), step("enrich", 0.0), step("caption", 0.0), step("judge", 0.0),
              step("train round 1", 70, 21.5, [("base", 1.9)]), step("generate round 1", 9, 23.0)]
    merged = loop.merge_invocations(first + second)
    assert [s["step"] for s in merged] == ["ingest", "enrich", "caption", "judge", "train round 1", "generate round 1"]
    train = merged[4]
    assert train["seconds"] == 190 and train["gpu_peak_gib"] == 21.5 and train["status"] == "ok"
    assert train["loads"] == [("base", 2.0), ("base", 1.9)]
    assert merged[2]["seconds"] == 40 and merged[2]["gpu_peak_gib"] == 15.1
    assert loop.merge_invocations(first) == first


def test_the_extrapolation_scales_training_at_its_steady_rate_not_its_compile_inflated_mean(monkeypatch):
    """A 20-step loop round spends most of its step time compiling the blocks (once per run); scaling that mean
    to 1000 steps overstated the klein run 3.6x. The trainer records the median step and the extrapolation
    adds the remaining steps at that rate to what the round took."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import loop

    from flywheel.train import _timing

    timing = _timing([30.0, 9.0] + [0.2] * 18)
    assert timing["median_seconds_per_step"] == 0.2 and timing["steps"] == 20
    assert timing["warmup_seconds"] == pytest.approx(30.0 + 9.0 + 3.6 - 4.0)
    assert timing["seconds_per_step"] == pytest.approx(42.6 / 20, abs=1e-4)
    units = {s: {"n": 0} for s in ("enrich", "caption", "judge", "generate", "evaluate")}
    run = {"steps": [{"step": "train round 1", "seconds": 60.0, "gpu_peak_gib": 18.0, "loads": [], "status": "ok"}],
           "units": units, "train": [{"round": 1, **timing}]}
    text = loop.extrapolate(run, None)
    assert "train round 1 256 s" in text  # 60 s measured + 980 steps x 0.2 s


@pytest.mark.slow
def test_loop_benchmark_runs_the_24gb_example_on_the_default_klein_stack(tmp_path):
    """--phase 24gb: configs/examples/gpu-24gb.toml (the klein4b stack) through the CLI, its tiny twins."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path), "--phase", "24gb", *SMALL],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "24 GiB profile (configs/examples/gpu-24gb.toml)" in proc.stdout
    result = json.loads((tmp_path / "results-24gb.json").read_text())
    run = result["24gb"]
    loads = {s["step"]: [model for model, _ in s["loads"]] for s in run["steps"]}
    assert loads["caption"] == ["qwen3-vl-4b"] and loads["generate round 1"] == ["flux2-klein-4b"]
    assert "FLUX.2-klein-base-4B" in loads["train round 1"][0]
    assert all(s["status"] == "ok" for s in run["steps"]) and run["report"]
    assert [t["steps"] for t in run["train"]] == [2, 2] and all("median_seconds_per_step" in t for t in run["train"])
    assert result["24gb_edit"]["fast"]["n"] == 1
