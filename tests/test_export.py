"""Exporting a frozen dataset version as kohya / ai-toolkit folders and a Hugging Face imagefolder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from flywheel.dataset import freeze_dataset
from flywheel.errors import StageError
from flywheel.export import export_dataset


@pytest.fixture
def frozen(project):
    for i, color in enumerate([(200, 0, 0), (0, 200, 0)]):
        sha, _ = project.store.put_image(Image.new("RGB", (64, 32), color))
        image_id = project.catalog.insert("images", {"sha256": sha, "pixel_sha256": sha, "phash": "0" * 16,
                                                     "width": 64, "height": 32, "kind": "source", "round": 0})
        if i == 0:
            project.catalog.insert("captions", {"image_id": image_id, "text": "fw_test, red, café", "source": "human"})
    freeze_dataset(project, 1)
    return project


def test_kohya_layout_pairs_images_with_captions(frozen, tmp_path):
    res = export_dataset(frozen, tmp_path / "out", fmt="kohya", repeats=5)
    assert res.folder == (tmp_path / "out" / "5_fw_test").resolve() and res.images == 2
    assert sorted(p.name for p in res.folder.iterdir()) == ["0001.png", "0001.txt", "0002.png", "0002.txt"]
    assert (res.folder / "0001.txt").read_text(encoding="utf-8") == "fw_test, red, café\n"
    assert (res.folder / "0002.txt").read_text(encoding="utf-8") == "fw_test\n"  # no caption: the trigger
    with Image.open(res.folder / "0001.png") as im:
        assert im.size == (64, 32) and im.getpixel((0, 0)) == (200, 0, 0)
    flat = export_dataset(frozen, tmp_path / "flat", fmt="ai-toolkit")
    assert (flat.folder / "0001.txt").is_file() and flat.folder == (tmp_path / "flat").resolve()


def test_imagefolder_metadata_and_safe_destination(frozen, tmp_path):
    res = export_dataset(frozen, tmp_path / "hf", fmt="imagefolder")
    rows = [json.loads(line) for line in (res.folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["file_name"], r["text"]) for r in rows] == [("0001.png", "fw_test, red, café"), ("0002.png", "fw_test")]
    assert all((res.folder / r["file_name"]).is_file() for r in rows)
    with pytest.raises(StageError, match="not empty"):
        export_dataset(frozen, tmp_path / "hf", fmt="imagefolder")
    export_dataset(frozen, tmp_path / "hf", fmt="kohya", overwrite=True)
    assert not (tmp_path / "hf" / "metadata.jsonl").exists()
    with pytest.raises(StageError, match="unknown export format"):
        export_dataset(frozen, tmp_path / "x", fmt="zip")
    with pytest.raises(StageError, match="v9"):
        export_dataset(frozen, tmp_path / "y", version=9)


def test_cli_export(frozen, tmp_path):
    from click.testing import CliRunner

    from flywheel.cli import main

    out = tmp_path / "cli-out"
    r = CliRunner().invoke(main, ["-C", str(frozen.root), "export", str(out), "--format", "imagefolder"])
    assert r.exit_code == 0, r.output
    assert "2 images" in r.output and (out / "metadata.jsonl").is_file()
    r = CliRunner().invoke(main, ["-C", str(frozen.root), "export", str(out)])
    assert r.exit_code == 1 and "not empty" in r.output and "--overwrite" in r.output
