"""Bad input gets one line and no traceback, and loses nothing: a full disk, a read-only project, two ingests
of the same folder at once, a flywheel.toml that is not UTF-8, special files and control characters in names."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import flywheel.catalog.db as db
from flywheel.cli import main
from flywheel.ingest import ingest

FULL_HINT = ("Hint: free some space on that disk, then run the same command again: what finished is kept and nothing "
             "half-written was recorded")
READ_ONLY_HINT = ("Hint: make the project folder writable (its permissions, or a read-only mount), or copy it somewhere "
                  "writable; nothing was changed")


@pytest.fixture
def root(project) -> Path:
    """The project folder, face detection off (dlib is not what these tests are about), catalog closed."""
    cfg = project.root / "flywheel.toml"
    cfg.write_text(cfg.read_text(encoding="utf-8").replace("detect_faces = true", "detect_faces = false"),
                   encoding="utf-8")
    project.close()
    return project.root


def photos(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        paths.append(folder / f"{chr(97 + i)}.png")
        Image.fromarray(small).resize((300, 300), Image.Resampling.BICUBIC).save(paths[-1])
    return paths


def run(root: Path, *args: str):
    return CliRunner().invoke(main, ["-C", str(root), *args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("Error:", "Hint:"))]


def count(root: Path, sql: str) -> int:
    conn = sqlite3.connect(root / ".flywheel" / "catalog.sqlite")
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def test_disk_full_while_ingest_writes_the_store(root, tmp_path, monkeypatch):
    files = photos(tmp_path / "in", 4)
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # each added file is two store writes (original, normalised PNG): the 5th is c.png's original
        calls.append(fd)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = run(root, "ingest", str(tmp_path / "in"))
    sha = hashlib.sha256(files[2].read_bytes()).hexdigest()
    stuck = root / ".flywheel" / "store" / "originals" / sha[:2] / f"{sha}.png"
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert error_lines(r.output) == [
        f"Error: disk full: cannot write {stuck} (ingest stopped at c.png; the 2 file(s) added before it are kept)",
        FULL_HINT]
    # Nothing lost, nothing half-written: the first two are in, no temporary file is left, c.png has no row.
    assert count(root, "SELECT COUNT(*) FROM images") == 2 and not stuck.exists()
    assert list((root / ".flywheel" / "store").rglob(".tmp-*")) == []
    assert count(root, "SELECT status FROM operations WHERE stage = 'ingest'") == "failed"
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the same command finishes the job
    r = run(root, "ingest", str(tmp_path / "in"))
    assert r.exit_code == 0 and "ingest: 2 added, 2 skipped, 0 rejected" in r.output
    assert count(root, "SELECT COUNT(*) FROM images") == 4


def test_disk_full_while_the_catalog_grows_during_an_edit(root, tmp_path, monkeypatch):
    """`flywheel enrich` writing its edits on a disk that fills up: SQLite's own 'database or disk is full'
    (a page limit on the catalog makes it real), one line, and a re-run with space finishes the edits."""
    import flywheel.enrich as enrich_mod

    photos(tmp_path / "in", 2)
    assert run(root, "ingest", str(tmp_path / "in")).exit_code == 0

    class Recolour:  # a stand-in editor: the test is about the writes, not the edits
        model_id = "recolour"

        def params(self):
            return {}

        def edit(self, requests):  # a distinct tint per recipe and seed
            tint = [tuple(zlib.crc32(f"{r.recipe.id}:{r.seed}".encode()).to_bytes(4, "big")[:3]) for r in requests]
            return [Image.blend(r.image, Image.new("RGB", r.image.size, t), 0.3) for r, t in zip(requests, tint)]

        def close(self):
            pass

    monkeypatch.setattr(enrich_mod, "load_enrich_editor", lambda *args, **kwargs: Recolour())
    real_connect = db.connect

    def full_disk(path):
        conn = real_connect(path)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # room for about one more page, then full
        return conn

    before = count(root, "SELECT COUNT(*) FROM images")
    monkeypatch.setattr(db, "connect", full_disk)
    r = run(root, "enrich", "--backend", "composite")
    catalog = root / ".flywheel" / "catalog.sqlite"
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert error_lines(r.output) == [f"Error: disk full: cannot write the catalog {catalog}", FULL_HINT]
    # Nothing lost: every edit recorded is whole (image row + 'ok' operation); the rest is redone on a re-run.
    monkeypatch.setattr(db, "connect", real_connect)
    made = count(root, "SELECT COUNT(*) FROM images") - before
    assert 0 < made < 20  # the disk filled up part-way through the edits
    assert count(root, "SELECT COUNT(*) FROM images i JOIN operations o ON o.id = i.operation_id "
                       "WHERE o.stage = 'enrich' AND o.status = 'ok'") == made
    r = run(root, "enrich", "--backend", "composite")
    assert r.exit_code == 0, r.output
    assert f"20 edits planned; {20 - made} new, {made} already done" in r.output
    assert count(root, "SELECT COUNT(*) FROM images WHERE kind = 'enriched'") == 20


def test_read_only_project_says_read_only(root, tmp_path, monkeypatch):
    """A read-only catalog (SQLite opened read-only, as on a read-only mount) and a read-only store: the error
    says read-only, never 'corrupt', and nothing changes. Reading commands still work."""
    photos(tmp_path / "in", 1)
    catalog = root / ".flywheel" / "catalog.sqlite"
    before = catalog.read_bytes()
    real_connect = sqlite3.connect

    def read_only(path, *args, **kwargs):
        return real_connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    r = run(root, "ingest", str(tmp_path / "in"))
    assert r.exit_code == 1 and "Traceback" not in r.output and "corrupt" not in r.output
    assert error_lines(r.output) == [f"Error: the project is read-only: cannot write the catalog {catalog}",
                                     READ_ONLY_HINT]
    assert run(root, "status").exit_code == 0
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    assert catalog.read_bytes() == before and count(root, "SELECT COUNT(*) FROM images") == 0

    # A folder that cannot even hold SQLite's shared-memory file fails at open: still 'read-only'.
    class NoWrites(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode"):
                raise sqlite3.OperationalError("attempt to write a readonly database")
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real_connect(*a, factory=NoWrites, **kw))
    r = run(root, "status")
    assert error_lines(r.output) == [f"Error: the project is read-only: cannot write the catalog {catalog}",
                                     READ_ONLY_HINT]
    monkeypatch.setattr(sqlite3, "connect", real_connect)

    import flywheel.catalog.store as store

    def no_temp_files(dir=None, prefix=None):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(store.tempfile, "mkstemp", no_temp_files)
    r = run(root, "ingest", str(tmp_path / "in"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line, hint) = error_lines(r.output)
    assert line.startswith(f"Error: the project is read-only: cannot write {root / '.flywheel' / 'store' / 'originals'}")
    assert line.endswith("(ingest stopped at a.png; the 0 file(s) added before it are kept)") and hint == READ_ONLY_HINT
    assert count(root, "SELECT COUNT(*) FROM images") == 0


def test_the_same_folder_ingested_twice_at_the_same_moment(project, tmp_path):
    """The race made deterministic: a second ingest of the same folder runs (on its own connection) while
    the first is between files. The first then finds those files already there: skipped, not duplicated."""
    from flywheel.project import open_project

    project.config.ingest.detect_faces = False
    files = photos(tmp_path / "in", 4)
    other, seen = open_project(project.root), []
    other.config.ingest.detect_faces = False

    def meanwhile(i, n, label):
        if i == 1 and not seen:
            seen.append(ingest(other, [str(tmp_path / "in")]))

    first = ingest(project, [str(tmp_path / "in")], progress=meanwhile)
    other.close()
    second = seen[0]
    assert [i.path for i in first.added] == [str(files[0])]
    assert [(i.path, i.reason) for i in first.skipped] == [(str(f), "already in the catalog") for f in files[1:]]
    assert [i.path for i in second.added] == [str(f) for f in files[1:]]
    assert [(i.path, i.reason) for i in second.skipped] == [(str(files[0]), "already in the catalog")]
    assert project.catalog.query("SELECT COUNT(*), COUNT(DISTINCT original_sha256) FROM images")[0][:] == (4, 4)


def test_two_processes_ingesting_the_same_folder(root, tmp_path):
    photos(tmp_path / "in", 6)
    cmd = [sys.executable, "-m", "flywheel", "-C", str(root), "ingest", str(tmp_path / "in")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not any("Traceback" in out for out in outputs)
    added = [line for out in outputs for line in out.splitlines() if line.startswith("  added")]
    skipped = [line for out in outputs for line in out.splitlines() if line.startswith("  skipped")]
    assert len(added) == 6 and len(skipped) == 6 and all(line.endswith(": already in the catalog") for line in skipped)
    assert count(root, "SELECT COUNT(*) FROM images") == 6
    assert count(root, "SELECT COUNT(DISTINCT original_sha256) FROM images") == 6


def test_config_that_is_not_utf8(root):
    cfg = root / "flywheel.toml"
    text = cfg.read_text(encoding="utf-8").replace('name = "Test Character"', 'name = "Zoë"')
    cfg.write_bytes(text.encode("latin-1"))
    line = text.splitlines().index('name = "Zoë"') + 1
    before = cfg.read_bytes()
    r = run(root, "status")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert error_lines(r.output) == [
        f"Error: {cfg} is not UTF-8 text: byte 0xeb at line {line}, column 11",
        "Hint: save flywheel.toml with the UTF-8 encoding (most editors: 'Save with encoding' > UTF-8)"]
    assert cfg.read_bytes() == before
    cfg.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark is fine
    assert run(root, "status").exit_code == 0


@pytest.mark.timeout(120)  # reading a FIFO would block forever: this test hangs if one is ever opened
def test_special_files_are_reported_one_line_each(root, tmp_path):
    d = tmp_path / "in"
    photos(d, 1)
    os.mkfifo(d / "pipe.png")
    (d / "null.png").symlink_to("/dev/null")  # a character device behind an image name
    (d / "loop.png").symlink_to(d / "loop.png")
    (d / "gone.png").symlink_to(d / "missing.png")
    (d / "up").symlink_to(d)  # a folder link that leads back up
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    try:
        r = run(root, "ingest", str(d), str(d / "pipe.png"))
    finally:
        sock.close()
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("  ")]
    assert sorted(lines) == sorted([
        f"  added     {d / 'a.png'}",
        f"  skipped   {d / 'pipe.png'}: not a regular file (fifo)",
        f"  skipped   {d / 'null.png'}: not a regular file (character device)",
        f"  skipped   {d / 'loop.png'}: not a regular file (symlink loop)",
        f"  skipped   {d / 'gone.png'}: not a regular file (broken symlink)",
        f"  skipped   {d / 'up'}: symlink to a folder (not followed)",
        f"  skipped   {d / 'sock'}: not a regular file (socket)",
    ])  # pipe.png named twice (in the folder, and alone) is reported once: paths are deduplicated
    assert "ingest: 1 added, 6 skipped, 0 rejected" in r.output


def test_control_characters_in_names_are_escaped_in_the_report(root, tmp_path):
    d = tmp_path / "in"
    (src,) = photos(d, 1)
    evil = d / "two\nlines\x1b[31mred\u202egnp.png"
    src.rename(evil)
    r = run(root, "ingest", str(d))
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\u202e" not in r.output
    assert f"  added     {d}/two\\nlines\\x1b[31mred\\u202egnp.png" in r.output.splitlines()
    assert count(root, "SELECT original_name FROM images") == evil.name  # the catalog keeps the real name


def test_a_catalog_held_by_another_command_is_busy_not_a_crash(root, tmp_path, monkeypatch):
    photos(tmp_path / "in", 1)
    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.2)  # SQLite waits 30 s for real
    holder = sqlite3.connect(root / ".flywheel" / "catalog.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    try:
        r = run(root, "ingest", str(tmp_path / "in"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert error_lines(r.output) == [
        f"Error: the catalog {root / '.flywheel' / 'catalog.sqlite'} is busy: another flywheel command has been "
        "writing to it for more than 0.2 s",
        "Hint: wait for the other command to finish (or stop it), then run this one again; nothing was changed"]
    assert run(root, "ingest", str(tmp_path / "in")).exit_code == 0  # once it is free, the same command works
    assert count(root, "SELECT COUNT(*) FROM images") == 1
