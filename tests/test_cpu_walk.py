"""The CPU route of configs/examples/cpu-only.toml, walked as a user would: build and vet the set on CPU,
freeze it and export it, with no GPU, no model download and no error."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from flywheel.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "cpu-only.toml"

pytest.importorskip("mediapipe")  # the composite editor's person segmentation


@pytest.mark.slow  # about 10 s of CPU: 18 composite edits, judged
def test_cpu_only_example_from_ingest_to_export(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU, even where there is one
    root = tmp_path / "mascot"
    root.mkdir()
    shutil.copyfile(EXAMPLE, root / "flywheel.toml")
    # One small source keeps the walk to seconds; the config is the example's, unchanged.
    from flywheel.sample import astronaut

    astronaut().resize((256, 256), Image.Resampling.LANCZOS).save(tmp_path / "hero.png")
    runner = CliRunner()

    def flywheel(*args: str) -> str:
        r = runner.invoke(main, ["-C", str(root), *args])
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
        return r.output

    assert "ingest: 1 added, 0 skipped, 0 rejected" in flywheel("ingest", str(tmp_path / "hero.png"))
    out = flywheel("enrich")
    assert "enrich (composite): " in out and " 0 failed" not in out
    assert "from templates" in flywheel("caption")
    assert "judge: " in flywheel("judge")
    out = flywheel("freeze")
    assert out.startswith("dataset v1 (round 1): ") and "1 source" in out
    out = flywheel("export", str(tmp_path / "export"))
    assert "dataset v1: " in out

    from flywheel.project import open_project

    with open_project(root) as project:
        members = project.catalog.query("SELECT COUNT(*) FROM dataset_members")[0][0]
        enriched = project.catalog.query("SELECT COUNT(*) FROM images WHERE kind = 'enriched'")[0][0]
    folder = tmp_path / "export" / "10_zzmascot"
    pngs, txts = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert enriched > 0 and len(pngs) == len(txts) == members >= 1
    for png, txt in zip(pngs, txts):
        assert png.stem == txt.stem and "zzmascot" in txt.read_text(encoding="utf-8")
        with Image.open(png) as im:
            assert im.mode == "RGB"
    job = yaml.safe_load((tmp_path / "export" / "ai-toolkit.yaml").read_text(encoding="utf-8"))
    assert job["config"]["process"][0]["datasets"][0]["folder_path"] == str(folder.resolve())
    kohya = tomllib.loads((tmp_path / "export" / "kohya-dataset.toml").read_text(encoding="utf-8"))
    assert kohya["datasets"][0]["subsets"][0]["image_dir"] == str(folder.resolve())
