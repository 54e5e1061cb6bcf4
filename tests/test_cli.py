"""The CLI is thin: these check wiring, output format and exit codes, not stage logic."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.sample import write_sample


def test_init_ingest_status_roundtrip(tmp_path):
    runner = CliRunner()
    proj = tmp_path / "proj"
    res = runner.invoke(main, ["init", str(proj), "--name", "Astro", "--trigger", "fw_astro"])
    assert res.exit_code == 0, res.output
    sources = write_sample(tmp_path / "src")
    (tmp_path / "src" / "broken.png").write_bytes(b"")

    res = runner.invoke(main, ["-C", str(proj), "ingest", str(tmp_path / "src")])
    assert res.exit_code == 0, res.output
    assert f"rejected  {tmp_path / 'src' / 'broken.png'}: empty file (0 bytes)" in res.output
    assert f"ingest: {len(sources)} added, 0 skipped, 1 rejected" in res.output

    res = runner.invoke(main, ["-C", str(proj), "status"])
    assert res.exit_code == 0, res.output
    assert "source" in res.output and "fw_astro" in res.output


def test_errors_are_one_message_and_a_hint_without_traceback(tmp_path):
    res = CliRunner().invoke(main, ["-C", str(tmp_path), "status"])
    assert res.exit_code == 1
    assert "Error: no flywheel.toml" in res.output and "Hint: run `flywheel init" in res.output
    assert "Traceback" not in res.output


def test_bad_config_points_at_the_key(tmp_path):
    runner = CliRunner()
    runner.invoke(main, ["init", str(tmp_path / "p"), "--name", "A", "--trigger", "fw_a"])
    cfg = tmp_path / "p" / "flywheel.toml"
    cfg.write_text(cfg.read_text().replace("min_side = 256", "min_size = 256"))
    res = runner.invoke(main, ["-C", str(tmp_path / "p"), "status"])
    assert res.exit_code == 1
    assert "ingest.min_size: unknown key (did you mean 'min_side'?)" in res.output


def test_demo_runs_the_whole_loop_and_a_rerun_adds_nothing(tmp_path):
    import sqlite3

    runner = CliRunner()
    res = runner.invoke(main, ["demo", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    for step in ("» ingest", "» enrich", "» caption", "» judge", "» train round 1", "» generate round 1",
                 "» train round 2", "» evaluate"):
        assert step in res.output
    assert "Evaluation: round 2 vs round 1:" in res.output and "Tiny stand-ins:" in res.output
    report = tmp_path / "demo" / ".flywheel" / "reports" / "eval-run1-vs-run2"
    page = (report / "index.html").read_text()
    # The report says what changed (the judge rejects the tiny model's noise) and shows each run's training.
    assert "v2 added 0 synthetic images of the 4 that LoRA round 1 generated: all 4 rejected, 4 for quality." in page
    for run in (1, 2):
        assert f"src='training/run-{run}/loss.png'" in page and (report / f"training/run-{run}/loss.png").is_file()
        assert f"training/run-{run}/step000008-00.jpg" in page and f"training/run-{run}/step000016-01.jpg" in page
    json.loads((report / "metrics.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    def counts():
        db = sqlite3.connect(tmp_path / "demo" / ".flywheel" / "catalog.sqlite")
        tables = ("images", "captions", "verdicts", "dataset_versions", "lora_runs", "evaluations")
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}

    before = counts()
    assert before["lora_runs"] == 2 and before["evaluations"] == 1 and before["images"] > 30
    res = runner.invoke(main, ["demo", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert counts() == before

    # An explicit evaluate recomputes (the held-out renders are reused, not regenerated).
    res = runner.invoke(main, ["-C", str(tmp_path / "demo"), "evaluate", "--baseline", "1", "--candidate", "2"])
    assert res.exit_code == 0, res.output
    assert "Run 2 vs run 1: no significant change on recognisable" in res.output and "Report: " in res.output
    assert counts() == {**before, "evaluations": 2}
    res = runner.invoke(main, ["-C", str(tmp_path / "demo"), "evaluate", "--baseline", "7"])
    assert res.exit_code == 1 and "LoRA run 7 is not a finished run" in res.output
