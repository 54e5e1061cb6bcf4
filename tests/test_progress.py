"""Progress a user can plan with: done/total, rate and time left per stage; what is loading; no third-party
progress bars unless -v."""

from __future__ import annotations

import io
import re

from click.testing import CliRunner
from rich.console import Console

from flywheel.cli import main
from flywheel.progress_display import rich_progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _final_line(steps) -> str:
    """Drive a bar with (seconds, done, total, label) steps on a fake clock; the line it leaves behind."""
    out, clock = io.StringIO(), Clock()
    with rich_progress("enrich", Console(file=out, width=160, force_terminal=False), get_time=clock) as progress:
        for seconds, done, total, label in steps:
            clock.now += seconds
            progress(done, total, label)
    return " ".join(out.getvalue().split())


def test_the_bar_shows_done_total_rate_and_time_left():
    # 3 of 10 edits in 15 s: 5 s each, 7 left -> 35 s.
    line = _final_line([(0, 0, 10, "edits"), (5, 1, 10, "edits"), (5, 2, 10, "edits"), (5, 3, 10, "edits")])
    assert re.fullmatch(r"enrich ━+ 3/10 5\.0 s/it ETA 0:35 0:00:15 edits", line), line
    # Fast units read as a rate; a finished stage says so.
    line = _final_line([(0, 0, 40, "captions"), (2, 20, 40, "captions"), (2, 40, 40, "captions")])
    assert re.fullmatch(r"enrich ━+ 40/40 10\.00/s done 0:00:04 captions", line), line
    # Before the first unit there is no rate to go by.
    assert "-/s ETA ?" in _final_line([(0, 0, 10, "images"), (30, 0, 10, "images")])


def test_a_new_stage_starts_its_own_rate_and_eta():
    """`flywheel run` feeds every stage through one bar: the rate of the next stage is not the last one's,
    and work already done when a stage resumes does not count as done in no time."""
    line = _final_line([(0, 0, 25, "edits"), (100, 25, 25, "edits"),  # enrich: 4 s per edit
                        (0, 0, 1000, "loss"), (1, 1, 1000, "loss"), (1, 2, 1000, "loss")])  # train: 1 step/s
    assert re.fullmatch(r"enrich (━+ )?2/1000 1\.00/s ETA 16:38 0:00:02 loss", line), line
    resumed = _final_line([(0, 20, 25, "edits"), (10, 21, 25, "edits")])  # 20 done before this run
    assert "21/25 10.0 s/it ETA 0:40" in resumed, resumed


def _sample_project(tmp_path, check=None):
    """`flywheel init` + `flywheel ingest` of the five sample photos (no face detection: faster)."""
    from flywheel.sample import write_sample

    runner, root = CliRunner(), tmp_path / "p"
    assert runner.invoke(main, ["init", str(root), "--name", "A", "--trigger", "fw_a"]).exit_code == 0
    toml = root / "flywheel.toml"
    toml.write_text(toml.read_text().replace("detect_faces = true", "detect_faces = false", 1))
    res = runner.invoke(main, ["-C", str(root), "ingest", *map(str, write_sample(tmp_path / "in"))])
    assert res.exit_code == 0, res.output
    if check:
        check(res.output)
    return root


def test_cli_stages_show_the_rate_and_eta_columns(tmp_path):
    def check(output: str) -> None:
        bar = next(line for line in output.splitlines() if line.startswith("ingest "))
        assert re.search(r" 5/5 (\d+\.\d\d/s|\d+\.\d s/it) done \d:\d\d:\d\d", bar), bar

    _sample_project(tmp_path, check)


def test_no_third_party_progress_bars_unless_verbose(tmp_path, tiny_flux_dir):
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars stay out of the
    output at the default verbosity; -v shows them (and the rest of the libraries' output)."""
    runner = CliRunner()
    quiet = runner.invoke(main, ["-C", str(tmp_path), "models", "info", str(tiny_flux_dir)])
    assert quiet.exit_code == 0, quiet.output
    assert "Loading" not in quiet.output and "it/s]" not in quiet.output and "%|" not in quiet.output
    loud = runner.invoke(main, ["-C", str(tmp_path), "-v", "models", "info", str(tiny_flux_dir)])
    assert loud.exit_code == 0, loud.output
    assert "Loading pipeline components" in loud.output and "%|" in loud.output
    again = runner.invoke(main, ["-C", str(tmp_path), "models", "info", str(tiny_flux_dir)])
    assert "%|" not in again.output  # the switch goes both ways in one process


def test_loading_a_model_is_shown_at_the_default_verbosity(tmp_path):
    """The model pool logs what it loads on flywheel.models.pool at INFO; the CLI shows those lines without
    -v (and no other INFO line)."""
    root = _sample_project(tmp_path)
    toml = root / "flywheel.toml"
    toml.write_text(toml.read_text().replace('# captioner = "qwen3-vl-4b"', 'captioner = "tiny"', 1))
    res = CliRunner().invoke(main, ["-C", str(root), "caption"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "INFO loading tiny for caption ..." in text and "INFO loaded tiny-qwen2-vl in " in text
    assert "INFO" not in text.replace("INFO loading", "").replace("INFO loaded", "").replace("INFO released", "")
