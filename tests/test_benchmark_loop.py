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
