"""Catalog: migrations on a blank DB and on older schemas, atomic failure, operation rows, store safety."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from flywheel.catalog import open_catalog
from flywheel.catalog.db import MIGRATIONS_TABLE, connect, migrate
from flywheel.catalog.migrations import MIGRATIONS
from flywheel.catalog.store import ImageStore
from flywheel.errors import CatalogError

FIXTURES = Path(__file__).parent / "data"
LOOP_TABLES = {"images", "image_parents", "faces", "operations", "captions", "scores", "verdicts", "reviews",
               "dataset_versions", "dataset_members", "lora_runs", "artifacts", "evaluations"}


def _schema(conn: sqlite3.Connection) -> dict[str, str]:
    return {r[0]: r[1] for r in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY name")}


def test_blank_catalog_has_every_table_in_wal_mode(tmp_path):
    cat = open_catalog(tmp_path / "c.sqlite")
    tables = {r[0] for r in cat.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert LOOP_TABLES <= tables
    assert cat.query("PRAGMA journal_mode")[0][0] == "wal"
    assert cat.query("PRAGMA foreign_keys")[0][0] == 1
    assert [r[0] for r in cat.query(f"SELECT name FROM {MIGRATIONS_TABLE}")] == [n for n, _ in MIGRATIONS]
    cat.close()
    # Re-opening applies nothing.
    conn = connect(tmp_path / "c.sqlite")
    assert migrate(conn) == []


@pytest.mark.parametrize("applied", range(len(MIGRATIONS)))
def test_upgrading_any_older_schema_reaches_the_blank_schema(tmp_path, applied):
    blank = connect(tmp_path / "blank.sqlite")
    migrate(blank)
    old = connect(tmp_path / "old.sqlite")
    migrate(old, MIGRATIONS[:applied])
    assert migrate(old) == [n for n, _ in MIGRATIONS[applied:]]
    assert _schema(old) == _schema(blank)


def test_upgrade_of_a_shipped_v1_catalog_keeps_its_rows(tmp_path):
    """tests/data/catalog_m001.sqlite was written by the first release's schema, with rows in it."""
    path = tmp_path / "c.sqlite"
    path.write_bytes((FIXTURES / "catalog_m001.sqlite").read_bytes())
    cat = open_catalog(path)
    assert cat.query("SELECT original_name FROM images")[0][0] == "hero.png"
    assert cat.query("SELECT verdict FROM verdicts")[0][0] == "accepted"
    assert cat.query("SELECT decision FROM reviews")[0][0] == "rejected"
    assert cat.query("SELECT purpose FROM images")[0][0] == "train"  # m002 default for old rows
    assert [r[0] for r in cat.query(f"SELECT name FROM {MIGRATIONS_TABLE}")] == [n for n, _ in MIGRATIONS]


def test_catalog_from_a_newer_flywheel_is_refused(tmp_path):
    cat = open_catalog(tmp_path / "c.sqlite")
    cat.execute(f"INSERT INTO {MIGRATIONS_TABLE} VALUES ('m999_future', 'x')")
    cat.close()
    with pytest.raises(CatalogError, match="newer Flywheel") as err:
        open_catalog(tmp_path / "c.sqlite")
    assert "pip install -U" in err.value.hint


def test_a_failing_migration_leaves_the_catalog_unchanged(tmp_path):
    conn = connect(tmp_path / "c.sqlite")
    migrate(conn)
    before = _schema(conn)
    bad = MIGRATIONS + [("m900_bad", "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);")]
    with pytest.raises(CatalogError, match="m900_bad failed and was rolled back"):
        migrate(conn, bad)
    assert _schema(conn) == before
    assert "m900_bad" not in [r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")]


def test_not_a_database_gives_an_actionable_error(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="cannot open the catalog"):
        open_catalog(path)


def test_operation_rows_record_duration_and_failure(tmp_path):
    cat = open_catalog(tmp_path / "c.sqlite")
    with cat.operation("caption", model="tiny", params={"prompt": "hi"}, seed=3) as op:
        pass
    with pytest.raises(ValueError):
        with cat.operation("judge", model="tiny") as failed:
            raise ValueError("model exploded")
    rows = {r["id"]: r for r in cat.query("SELECT * FROM operations")}
    assert rows[op]["status"] == "ok" and rows[op]["seed"] == 3 and rows[op]["duration_ms"] >= 0
    assert rows[op]["params_json"] == '{"prompt": "hi"}'
    assert rows[failed]["status"] == "failed" and rows[failed]["error"] == "ValueError: model exploded"


def test_transaction_rolls_back_everything_on_error(tmp_path):
    cat = open_catalog(tmp_path / "c.sqlite")
    with pytest.raises(RuntimeError):
        with cat.transaction():
            cat.insert("operations", {"stage": "x", "kind": "stage_run"})
            with cat.transaction():  # nested joins the outer transaction
                cat.insert("operations", {"stage": "y", "kind": "stage_run"})
            raise RuntimeError("killed")
    assert cat.query("SELECT COUNT(*) FROM operations")[0][0] == 0


def test_store_is_content_addressed_and_refuses_non_hash_names(tmp_path):
    store = ImageStore(tmp_path / "store")
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    sha1, path1 = store.put_image(img)
    sha2, path2 = store.put_image(img.copy())
    assert sha1 == sha2 and path1 == path2 and len(list((tmp_path / "store").rglob("*.png"))) == 1
    assert store.open_image(sha1).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(CatalogError, match="not a content hash"):
        store.image_path("../../etc/passwd")


def test_documented_schema_is_current():
    from flywheel.catalog.schema_doc import render

    doc = (Path(__file__).parents[1] / "docs" / "catalog.md").read_text(encoding="utf-8")
    assert render(doc) == doc, "docs/catalog.md is stale: run python -m flywheel.catalog.schema_doc docs/catalog.md"


def test_a_killed_units_row_is_taken_over_not_duplicated(tmp_path):
    cat = open_catalog(tmp_path / "c.sqlite")
    first = cat.start_operation("generate", model="m", params={"try": 1}, work_key="generate:abc")
    # (the process was killed here: the row stays 'running')
    again = cat.start_operation("generate", model="m", params={"try": 2}, work_key="generate:abc")
    assert again == first
    row = cat.query("SELECT status, params_json FROM operations WHERE id = ?", (first,))[0]
    assert (row["status"], row["params_json"]) == ("running", '{"try": 2}')
    cat.finish_operation(first, "ok", 5)
    with pytest.raises(CatalogError, match="already done"):
        cat.start_operation("generate", model="m", work_key="generate:abc")
    assert cat.query("SELECT COUNT(*) FROM operations")[0][0] == 1
