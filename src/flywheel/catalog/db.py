"""Open the catalog (WAL mode, foreign keys on), apply outstanding migrations, record operations.

``open_catalog`` is the only place migrations are applied. Every model call or stage run goes through
``Catalog.operation(...)``, which writes its row up front (status 'running') and finishes it with the
duration and 'ok' or 'failed', so a killed process leaves visible 'running' rows instead of nothing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.catalog import oserrors
from flywheel.catalog.migrations import MIGRATIONS
from flywheel.errors import CatalogError, StorageError

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "_flywheel_migrations"
# How long a write waits for another process's write to finish before it gives up ("the catalog is busy").
BUSY_TIMEOUT_S = 30.0


def _statements(sql: str) -> Iterator[str]:
    """Split a migration script into statements (sqlite3.complete_statement understands comments and quotes)."""
    buf: list[str] = []
    for line in sql.splitlines(keepends=True):
        buf.append(line)
        chunk = "".join(buf)
        if sqlite3.complete_statement(chunk):
            if chunk.strip():
                yield chunk
            buf = []
    rest = "".join(buf).strip()
    if rest and not all(ln.strip().startswith("--") or not ln.strip() for ln in rest.splitlines()):
        raise CatalogError(f"incomplete SQL statement in a migration: {rest[:80]!r}")


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    conn.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    return [r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY rowid")]


def migrate(conn: sqlite3.Connection, migrations: list[tuple[str, str]] = MIGRATIONS) -> list[str]:
    """Apply outstanding migrations, each in its own transaction. Returns the names applied now."""
    known = [name for name, _ in migrations]
    unknown = [name for name in applied_migrations(conn) if name not in known]
    if unknown:
        raise CatalogError(
            f"this catalog was written by a newer Flywheel (it has migrations {unknown} this version does not know)",
            hint="upgrade Flywheel (pip install -U character-flywheel) before opening this project",
        )
    done: list[str] = []
    for name, sql in migrations:
        try:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock before re-checking: two processes may race
        except sqlite3.OperationalError as err:  # a read-only project, or another process holding the lock
            storage = oserrors.from_sqlite_error(err, _db_path(conn), BUSY_TIMEOUT_S)
            if storage is None:
                raise
            raise storage from err
        try:
            if conn.execute(f"SELECT 1 FROM {MIGRATIONS_TABLE} WHERE name = ?", (name,)).fetchone():
                conn.execute("COMMIT")
                continue
            for stmt in _statements(sql):
                conn.execute(stmt)
            conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                (name,),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            storage = oserrors.from_sqlite_error(err, _db_path(conn), BUSY_TIMEOUT_S)
            if storage is not None:  # a full disk or a read-only file is not a broken migration
                raise storage from err
            raise CatalogError(
                f"catalog migration {name} failed and was rolled back: {err}",
                hint="the catalog is unchanged; report this as a bug with the message above",
            ) from err
        done.append(name)
        log.info("catalog: applied migration %s", name)
    return done


@dataclass
class Catalog:
    """A connection to one project's catalog plus the few write helpers every stage shares."""

    conn: sqlite3.Connection
    path: Path
    _depth: int = field(default=0, repr=False)

    # -- transactions -------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work; nested uses join the outer transaction."""
        if self._depth == 0:
            self.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self._depth -= 1
            if self._depth == 0 and self.conn.in_transaction:  # SQLite may have rolled back already (disk full)
                self.conn.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            try:
                self.execute("COMMIT")
            except StorageError:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.OperationalError as err:  # disk full, read-only, locked: one line for the user
            storage = oserrors.from_sqlite_error(err, self.path, BUSY_TIMEOUT_S)
            if storage is None:
                raise
            raise storage from err

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return list(self.execute(sql, params))

    def insert(self, table: str, row: dict[str, Any]) -> int:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cur = self.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid)

    # -- operations ---------------------------------------------------------------------------------
    def start_operation(
        self,
        stage: str,
        *,
        kind: str = "model_call",
        model: str | None = None,
        params: dict[str, Any] | None = None,
        seed: int | None = None,
        parent_id: int | None = None,
        work_key: str | None = None,
    ) -> int:
        """Write the row of a call about to run. With a ``work_key`` whose earlier attempt was killed or
        failed, that row is taken over (same id, fresh params/status): a resumed unit never duplicates."""
        row = {
            "stage": stage,
            "kind": kind,
            "model": model,
            "params_json": json.dumps(params or {}, sort_keys=True, default=str),
            "seed": seed,
            "parent_id": parent_id,
            "work_key": work_key,
        }
        with self.transaction():
            if work_key is not None:
                prior = self.query("SELECT id, status FROM operations WHERE work_key = ?", (work_key,))
                if prior:
                    if prior[0]["status"] in ("ok", "skipped"):
                        raise CatalogError(f"unit {work_key} is already done (operation {prior[0]['id']})",
                                           hint="this is a bug in the stage: it must skip finished units")
                    log.info("catalog: redoing %s (previous attempt: %s)", work_key, prior[0]["status"])
                    self.execute(
                        "UPDATE operations SET stage = ?, kind = ?, model = ?, params_json = ?, seed = ?, "
                        "parent_id = ?, status = 'running', error = NULL, duration_ms = NULL, output_image_id = NULL, "
                        "started_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
                        (stage, kind, model, row["params_json"], seed, parent_id, prior[0]["id"]),
                    )
                    return int(prior[0]["id"])
            return self.insert("operations", row)

    def finish_operation(self, op_id: int, status: str, duration_ms: int, error: str | None = None, *,
                         output_image_id: int | None = None) -> None:
        with self.transaction():
            self.execute(
                "UPDATE operations SET status = ?, duration_ms = ?, error = ?, output_image_id = ? WHERE id = ?",
                (status, duration_ms, error, output_image_id, op_id),
            )

    @contextmanager
    def operation(self, stage: str, **kwargs: Any) -> Iterator[int]:
        """Record a stage run or model call: the row exists while it runs, then gets status + duration."""
        op_id = self.start_operation(stage, **kwargs)
        t0 = time.perf_counter()
        try:
            yield op_id
        except BaseException as err:
            try:
                self.finish_operation(op_id, "failed", int((time.perf_counter() - t0) * 1000),
                                      f"{type(err).__name__}: {err}")
            except StorageError as also:  # a full disk: the row stays 'running' (a re-run takes it over)
                log.warning("catalog: could not mark operation %d failed: %s", op_id, also.args[0])
            raise
        self.finish_operation(op_id, "ok", int((time.perf_counter() - t0) * 1000))

    def close(self) -> None:
        self.conn.close()


def connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError as err:
        storage = oserrors.from_sqlite_error(err, path, BUSY_TIMEOUT_S)
        if storage is not None:  # a read-only folder or a full disk is not a corrupt catalog
            raise storage from err
        raise CatalogError(
            f"cannot open the catalog {path}: {err}",
            hint="the file may be corrupt or not a Flywheel catalog; restore it from a backup",
        ) from err
    return conn


def _db_path(conn: sqlite3.Connection) -> str:
    return next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"), "the catalog")


def open_catalog(path: Path) -> Catalog:
    """Open (creating if needed) and migrate a catalog."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        storage = oserrors.from_os_error(err, path.parent)
        if storage is None:
            raise
        raise storage from err
    conn = connect(path)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return Catalog(conn=conn, path=path)
