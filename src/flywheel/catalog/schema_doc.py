"""Keep docs/catalog.md's schema block equal to what the migrations create.

``python -m flywheel.catalog.schema_doc docs/catalog.md`` rewrites the block between the markers;
a test fails when the block is stale, so the documented schema cannot drift from the real one.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from flywheel.catalog.db import migrate

START, END = "<!-- schema:start -->", "<!-- schema:end -->"


def schema_markdown() -> str:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    rows = conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
        "AND name != '_flywheel_migrations' ORDER BY CASE type WHEN 'table' THEN 0 ELSE 1 END, rowid"
    ).fetchall()
    parts = [f"```sql\n{sql.strip()};\n```" for typ, name, sql in rows if typ == "table"]
    indexes = [f"{sql.strip()};" for typ, name, sql in rows if typ == "index"]
    return "\n\n".join(parts + ["```sql\n" + "\n".join(indexes) + "\n```"])


def render(doc: str) -> str:
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{schema_markdown()}\n{END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/catalog.md")
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
