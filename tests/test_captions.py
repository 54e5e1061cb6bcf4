"""Captions a human owns: cleaning, the trigger word, history (never overwriting), the CLI, ingest sidecars,
short/long variants, and that a dataset trains on the human caption."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flywheel import captions
from flywheel.errors import CaptionError

TRIGGER = "fw_test"


def _captions(project, image_id) -> list[tuple[str, str]]:
    return [tuple(r) for r in project.catalog.query(
        "SELECT source, text FROM captions WHERE image_id = ? ORDER BY id", (image_id,))]


# --- cleaning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, text, notes", [
    ("fw_test in a forest", "fw_test in a forest", []),
    # NUL, C0 and C1 controls, zero-width space/joiner, BOM, bidi override and isolate, a soft hyphen
    ("fw_test\x00 in a\x07 for\u200best\ufeff at \u202enight\u2066\x9b\u00ad", "fw_test in a forest at night",
     ["removed 8 control or invisible character(s)"]),
    # Line breaks of every kind become one space; runs of whitespace collapse.
    ("fw_test on a\r\nbeach,\n\n  golden\u2028light\t\x85wide shot ", "fw_test on a beach, golden light wide shot",
     ["joined the lines into one"]),
    ("  A woman reading in a café  ", "fw_test, A woman reading in a café",
     ["added the trigger word 'fw_test' at the start"]),
    ("fw_tester in a forest", "fw_test, fw_tester in a forest",  # a longer word is not the trigger
     ["added the trigger word 'fw_test' at the start"]),
    ("cafe\u0301 terrace, fw_test", "café terrace, fw_test", []),  # NFC: a combining accent is kept, composed
])
def test_clean_text_makes_one_clean_line_with_the_trigger(raw, text, notes):
    cleaned = captions.clean_text(raw, TRIGGER)
    assert (cleaned.text, cleaned.notes) == (text, notes)


@pytest.mark.parametrize("raw, message", [
    ("", "the caption is empty after cleaning"),
    (" \n\t\u200b\x00\u202e ", "the caption is empty after cleaning"),
    ("x" * 2001, "the caption is 2001 characters long (at most 2000)"),
])
def test_unusable_captions_are_refused_with_one_line(raw, message):
    with pytest.raises(CaptionError) as err:
        captions.clean_text(raw, TRIGGER)
    assert err.value.args[0] == message and err.value.hint


def test_variants_give_the_first_sentence_and_the_whole_caption():
    assert captions.variants("fw_test, a woman in a forest. Soft light,  wide shot.", TRIGGER) == {
        "short": "fw_test, a woman in a forest.", "long": "fw_test, a woman in a forest. Soft light, wide shot."}
    assert captions.variants("A woman on a pier. fw_test at dusk", TRIGGER)["short"] == "fw_test, A woman on a pier."
    tags = "fw_test, forest, soft light, f/1.8"  # no sentence break: the short form is the whole caption
    assert captions.variants(tags, TRIGGER) == {"short": tags, "long": tags}


# --- set_caption: every edit a new row, machine captions kept --------------------------------------------
def test_set_caption_appends_a_human_row_and_keeps_history(review_project):
    project, ids = review_project
    image = ids["forest0"]
    edit = captions.set_caption(project, image, "standing in a pine forest,\nmorning fog", author="ann", via="cli")
    assert edit.changed and edit.previous == "fw_test in a forest"
    assert edit.text == "fw_test, standing in a pine forest, morning fog"
    assert edit.notes == ["joined the lines into one", "added the trigger word 'fw_test' at the start"]
    again = captions.set_caption(project, image, "fw_test, standing in a pine forest, morning fog", author="ann")
    assert not again.changed and again.caption_id == edit.caption_id  # the same text is not a new edit
    captions.set_caption(project, image, "fw_test in a pine forest", author="bob", via="review")
    assert _captions(project, image) == [("template", "fw_test in a forest"),
                                         ("human", "fw_test, standing in a pine forest, morning fog"),
                                         ("human", "fw_test in a pine forest")]
    history = captions.history(project, image)
    assert [(h["source"], h["author"], h["via"]) for h in history] == [
        ("template", None, None), ("human", "ann", "cli"), ("human", "bob", "review")]
    op = project.catalog.query("SELECT stage, status, params_json FROM operations WHERE id = "
                               "(SELECT operation_id FROM captions WHERE id = ?)", (edit.caption_id,))[0]
    assert (op["stage"], op["status"]) == ("caption", "ok")
    assert json.loads(op["params_json"])["notes"] == edit.notes  # who wrote it and how it was cleaned


@pytest.mark.parametrize("image_id, message", [
    (999_999, "no image with id 999999 in the catalog"),
    ("9" * 5000, "not an image id: '" + "9" * 39 + "…"),  # cut short: the error stays one readable line
    (-3, "not an image id: -3"),
    (1.5, "not an image id: 1.5"),
    ("12; DROP TABLE captions", "not an image id: '12; DROP TABLE captions'"),
])
def test_set_caption_refuses_unknown_and_absurd_ids(review_project, image_id, message):
    project, _ = review_project
    before = project.catalog.query("SELECT COUNT(*) FROM captions")[0][0]
    with pytest.raises(CaptionError) as err:
        captions.set_caption(project, image_id, "fw_test in a forest")
    assert err.value.args[0] == message
    assert project.catalog.query("SELECT COUNT(*) FROM captions")[0][0] == before


def test_the_caption_stage_never_replaces_a_human_caption_and_a_dataset_uses_it(review_project):
    from flywheel.caption import caption
    from flywheel.dataset import freeze_dataset

    project, ids = review_project
    mine = captions.set_caption(project, ids["forest0"], "fw_test under tall pines", author="ann")
    cfg = project.config.model_copy(update={"caption": project.config.caption.model_copy(update={"mode": "template"})})
    result = caption(project, cfg)
    assert ids["forest0"] not in [i for i, _ in result.written] and ids["sunset0"] in [i for i, _ in result.written]
    assert _captions(project, ids["forest0"])[-1] == ("human", "fw_test under tall pines")
    members = {m.image_id: m for m in freeze_dataset(project, 1).members}
    assert members[ids["forest0"]].caption == "fw_test under tall pines"
    assert members[ids["forest0"]].caption_id == mine.caption_id


# --- the CLI -----------------------------------------------------------------------------------------
def test_cli_sets_and_shows_a_caption(review_project):
    from flywheel.cli import main

    project, ids = review_project
    image = str(ids["sunset0"])
    runner = CliRunner()
    res = runner.invoke(main, ["-C", str(project.root), "caption", "--set", image, "on a pier\tat\u200b dusk"])
    assert res.exit_code == 0, res.output
    assert f"image {image}: fw_test, on a pier at dusk" in res.output
    assert "note: added the trigger word 'fw_test' at the start" in res.output
    res = runner.invoke(main, ["-C", str(project.root), "caption", "--set", image, "-"], input="fw_test on a pier\n")
    assert res.exit_code == 0 and f"image {image}: fw_test on a pier" in res.output
    assert _captions(project, ids["sunset0"])[-2:] == [("human", "fw_test, on a pier at dusk"),
                                                       ("human", "fw_test on a pier")]
    res = runner.invoke(main, ["-C", str(project.root), "caption", "--show", image])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 0 and len(lines) == 3
    assert lines[0].endswith("template: fw_test in a sunset")
    assert " human by " in lines[2] and lines[2].endswith(" via cli: fw_test on a pier  <- current")


@pytest.mark.parametrize("args, message", [
    (["--set", "{sunset0}", " \u200b\n"], "Error: the caption is empty after cleaning"),
    (["--set", "99999", "fw_test"], "Error: no image with id 99999 in the catalog"),
    (["--set", "-1", "fw_test"], "Error: not an image id: '-1'"),
])
def test_cli_caption_errors_are_one_line_and_write_nothing(review_project, args, message):
    from flywheel.cli import main

    project, ids = review_project
    before = project.catalog.query("SELECT COUNT(*) FROM captions")[0][0]
    args = [a.format(**ids) for a in args]
    res = CliRunner().invoke(main, ["-C", str(project.root), "caption", *args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert project.catalog.query("SELECT COUNT(*) FROM captions")[0][0] == before


# --- ingest: .txt sidecars --------------------------------------------------------------------------
def test_ingest_imports_txt_sidecars_as_human_captions(project, tmp_path):
    from flywheel.ingest import ingest
    from flywheel.sample import write_sample

    project.config.ingest.detect_faces = False
    paths = write_sample(tmp_path / "in")
    good, bad, empty = paths[0], paths[1], paths[2]
    good.with_suffix(".txt").write_text("\ufeffA woman in an orange suit,\r\nstudio light\n", encoding="utf-8")
    bad.with_suffix(".txt").write_bytes(b"caf\xe9 terrace")  # Latin-1, not UTF-8
    empty.with_suffix(".txt").write_text("\u200b \n")
    (tmp_path / "in" / "notes.txt").write_text("not a caption: no image called notes.*")
    before = sorted(p.name for p in (tmp_path / "in").iterdir())

    result = ingest(project, [str(tmp_path / "in")])
    added = {r.path: r for r in result.added}
    assert len(added) == len(paths)
    assert added[str(good)].reason.endswith(
        f"caption from {good.stem}.txt (joined the lines into one; added the trigger word 'fw_test' at the start)")
    assert added[str(bad)].reason.endswith(f"caption file {bad.stem}.txt ignored: not UTF-8 text")
    assert added[str(empty)].reason.endswith(f"caption file {empty.stem}.txt ignored: the caption is empty after cleaning")
    # Sidecars are not "skipped files"; a .txt that belongs to no image still is.
    assert [(s.path.rsplit("/", 1)[-1], s.reason) for s in result.skipped] == [
        ("notes.txt", "not an image file extension (.txt)")]
    rows = project.catalog.query("SELECT image_id, source, text, operation_id FROM captions ORDER BY id")
    assert [(r["image_id"], r["source"], r["text"]) for r in rows] == [
        (added[str(good)].image_id, "human", "fw_test, A woman in an orange suit, studio light")]
    assert project.catalog.query("SELECT stage FROM operations WHERE id = ?", (rows[0]["operation_id"],))[0][0] == "ingest"
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == before  # the user's folder is only read
