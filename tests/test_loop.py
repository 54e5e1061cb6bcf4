"""`flywheel run`: the whole loop on tiny models; the review gate; a kill at any point loses nothing.

The kill test runs the real CLI in a subprocess, SIGKILLs it at several points (mid-enrich, mid-training,
mid-generation), re-runs it to completion, and compares the catalog and the LoRA files with an
uninterrupted run: every stage is deterministic, so a correct resume gives the very same bytes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.loop import pending_reviews, run_loop
from flywheel.project import open_project
from flywheel.sample import write_sample

# A small loop: 2 sources x 2 recipes, 6 training steps, 2 generated and 2 held-out prompts.
SMALL = """
[project]
name = "Astronaut"
trigger = "fw_astro"
[loop]
rounds = 2
sources = ["sources"]
review = "{review}"
[models]
captioner = "tiny"
judge = "none"
base = "tiny"
device = "cpu"
[enrich]
backend = "composite"
recipes = ["forest", "sunset"]
[caption]
mode = "template"
[judge]
no_face = "needs_review"
[train]
resolution = 64
bucket_step = 16
rank = 4
alpha = 4
steps = 6
learning_rate = 0.005
gradient_checkpointing = false
max_sequence_length = 32
checkpoint_every = 2
sample_every = 0
sample_steps = 1
sample_size = 64
[generate]
prompts = 2
seeds_per_prompt = 1
width = 64
height = 64
steps = 2
max_sequence_length = 32
[evaluate]
prompts = ["a photo of {{trigger}} in a library", "{{trigger}} on a beach at noon"]
seeds_per_prompt = 1
"""


def make_project(root: Path, review: str = "auto") -> Path:
    root.mkdir(parents=True)
    (root / "flywheel.toml").write_text(SMALL.format(review=review))
    write_sample(root / "sources")
    for extra in sorted((root / "sources").iterdir())[2:]:  # two sources keep it quick
        extra.unlink()
    return root


def snapshot(root: Path) -> dict:
    """What a correct run leaves behind, independent of row ids and timings."""
    db = sqlite3.connect(root / ".flywheel" / "catalog.sqlite")
    q = lambda sql: sorted(tuple(r) for r in db.execute(sql))  # noqa: E731
    snap = {
        "images": q("SELECT kind, round, purpose, sha256 FROM images"),
        "datasets": q("SELECT d.version, d.round, i.sha256 FROM dataset_members m JOIN dataset_versions d "
                      "ON d.id = m.dataset_id JOIN images i ON i.id = m.image_id"),
        "runs": q("SELECT round, status FROM lora_runs"),
        "work": q("SELECT stage, work_key FROM operations WHERE work_key IS NOT NULL AND status IN ('ok', 'skipped')"),
        "evaluations": q("SELECT verdict FROM evaluations"),
        "captions": q("SELECT i.sha256, c.text FROM captions c JOIN images i ON i.id = c.image_id"),
    }
    runs = sorted((root / ".flywheel" / "runs").glob("run-*/pytorch_lora_weights.safetensors"))
    snap["loras"] = [hashlib.sha256(p.read_bytes()).hexdigest() for p in runs]
    db.close()
    return snap


def cli(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flywheel", "-C", str(root), "run"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())


def count(root: Path, sql: str) -> int:
    path = root / ".flywheel" / "catalog.sqlite"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        return db.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # the schema is being created
        return 0


def kill_when(root: Path, sql: str, timeout: float = 300) -> bool:
    """Start `flywheel run`, SIGKILL it once ``sql`` counts > 0. False if it finished first."""
    proc = cli(root)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if count(root, sql) > 0:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    out = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == 0, out
    return False


@pytest.mark.slow
def test_killed_runs_resume_to_exactly_the_uninterrupted_result(tmp_path):
    reference = make_project(tmp_path / "reference")
    done = cli(reference)
    out = done.communicate(timeout=600)[0].decode(errors="replace")
    assert done.returncode == 0, out
    assert "Done. Evaluation:" in out
    expected = snapshot(reference)
    assert expected["runs"] == [(1, "ok"), (2, "ok")] and len(expected["evaluations"]) == 1

    crashed = make_project(tmp_path / "crashed")
    kills = [
        "SELECT COUNT(*) FROM operations WHERE stage = 'enrich' AND status = 'ok' AND work_key IS NOT NULL",
        "SELECT COUNT(*) FROM artifacts WHERE kind = 'checkpoint'",
        "SELECT COUNT(*) FROM operations WHERE stage = 'generate' AND status = 'ok' AND work_key IS NOT NULL",
        "SELECT COUNT(*) FROM operations WHERE stage = 'evaluate' AND status = 'ok' AND work_key IS NOT NULL",
    ]
    killed = sum(kill_when(crashed, sql) for sql in kills)
    assert killed >= 3, "the run finished before most kill points: the test no longer kills anything"
    final = cli(crashed)
    out = final.communicate(timeout=600)[0].decode(errors="replace")
    assert final.returncode == 0, out
    assert snapshot(crashed) == expected


def test_review_gate_waits_for_humans_then_continues(tmp_path):
    root = make_project(tmp_path / "gated", review="all")
    with open_project(root) as project:
        result = run_loop(project)
        candidates = [r[0] for r in project.catalog.query("SELECT id FROM images WHERE kind = 'enriched' ORDER BY id")]
        assert result.waiting_for_review == pending_reviews(project, "all") == len(candidates) == 4
        assert result.steps[-1] == "waiting for review (4 images)" and not result.finished
        assert project.catalog.query("SELECT COUNT(*) FROM lora_runs")[0][0] == 0  # nothing trained yet

        from flywheel.review import record_review

        record_review(project, candidates[:2], "accepted", reviewer="tester")
        assert run_loop(project).waiting_for_review == 2  # still two without a decision
        record_review(project, candidates[2:], "rejected", reviewer="tester")
        project.config.loop.rounds = 1  # one round is enough to see the gate open
        result = run_loop(project)
        assert result.finished and result.steps[-1] == "train round 1"
        members = {r[0] for r in project.catalog.query("SELECT image_id FROM dataset_members")}
        assert set(candidates[:2]) <= members and not set(candidates[2:]) & members
