"""`flywheel run DIR... / --queue FILE`: several characters, each with its own catalog, and one status table;
and what [compute] backend = "ray" says when Ray is not installed."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from flywheel.cli import main
from flywheel.compute.projects import queued_folders, run_projects
from flywheel.sample import write_sample

# Stops at the review gate ("all") after enrich, caption and judge: quick, and the gate is a status of its own.
CONFIG = """
[project]
name = "{name}"
trigger = "fw_{name}"
[loop]
sources = ["sources"]
review = "all"
[ingest]
detect_faces = false
[models]
judge = "none"
[enrich]
backend = "composite"
recipes = ["studio"]
[caption]
mode = "template"
"""


def _project(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "flywheel.toml").write_text(CONFIG.format(name=name), encoding="utf-8")
    write_sample(folder / "sources")
    for extra in sorted((folder / "sources").iterdir())[1:]:  # one source keeps it quick
        extra.unlink()
    return folder


def test_run_over_project_folders_prints_one_table_and_a_failed_project_does_not_stop_the_rest(tmp_path):
    a, b = _project(tmp_path, "alpha"), _project(tmp_path, "beta")
    missing = tmp_path / "nowhere"
    out = CliRunner().invoke(main, ["run", str(a), str(missing), str(b)], terminal_width=200)
    assert out.exit_code == 1, out.output  # one project failed: said in the table and the exit code
    table = out.output[out.output.index("flywheel run: projects"):]
    assert table.count("waiting for review") == 2 and table.count("failed") == 1 and "1 images" in table
    assert table.index("alpha") < table.index("nowhere") < table.index("beta")  # in the order given
    assert "no flywheel.toml in" in table
    for folder in (a, b):  # each project has its own catalog, with its own edit
        from flywheel.project import open_project

        with open_project(folder) as p:
            assert p.catalog.query("SELECT COUNT(*) FROM images WHERE kind = 'enriched'")[0][0] == 1
    assert not missing.exists()


def test_a_queue_file_is_read_again_after_each_project(tmp_path):
    a, b = _project(tmp_path, "alpha"), _project(tmp_path, "beta")
    queue = tmp_path / "queue.txt"
    queue.write_text(f"# characters to run\n{a}\n", encoding="utf-8")

    def appended(runs) -> None:  # while alpha runs, someone adds beta (and alpha again, which runs once)
        if len(runs) == 1 and runs[0].status != "running":
            queue.write_text(f"{a}\n{b}\n{a}\n", encoding="utf-8")

    runs = run_projects(queued_folders([], queue), on_update=appended)
    assert [(r.folder, r.status) for r in runs] == [(a, "waiting for review"), (b, "waiting for review")]


def test_the_ray_backend_without_ray_installed_is_one_line(monkeypatch):
    import sys

    import pytest

    from flywheel.compute.ray_pool import connect
    from flywheel.config_compute import ComputeConfig
    from flywheel.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(MissingExtraError, match=r"backend = \"ray\" needs the Python package 'ray'") as err:
        connect(ComputeConfig(backend="ray"))
    assert "character-flywheel[ray]" in err.value.hint
