"""``flywheel status``: what the catalog holds, counted per kind, round, stage and verdict, and coverage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flywheel.catalog.queries import LATEST_REVIEW, LATEST_VERDICT
from flywheel.project import Project

if TYPE_CHECKING:
    from flywheel.coverage import CoverageTable

@dataclass
class Status:
    name: str
    trigger: str
    images: list[tuple[str, int, int]] = field(default_factory=list)  # kind, round, count
    captioned: int = 0
    stages: list[tuple[str, str, int]] = field(default_factory=list)  # stage, status, count
    verdicts: list[tuple[str, str, int]] = field(default_factory=list)  # kind, verdict, count
    reviews: list[tuple[str, int]] = field(default_factory=list)  # decision, count
    datasets: list[tuple[int, int, int]] = field(default_factory=list)  # version, round, members
    lora_runs: list[tuple[int, int, str]] = field(default_factory=list)  # id, round, status
    coverage: CoverageTable | None = None  # None until the judge has tagged something (flywheel.coverage)


def collect_status(project: Project) -> Status:
    from flywheel.coverage import coverage_table

    q = project.catalog.query
    tagged = bool(q("SELECT 1 FROM scores WHERE criterion = 'coverage' LIMIT 1"))
    return Status(
        name=project.config.project.name,
        trigger=project.config.project.trigger,
        images=[tuple(r) for r in q(
            "SELECT kind || CASE purpose WHEN 'eval' THEN ' (held-out eval)' ELSE '' END, round, COUNT(*) "
            "FROM images GROUP BY kind, round, purpose ORDER BY round, kind, purpose")],
        captioned=q("SELECT COUNT(DISTINCT image_id) FROM captions")[0][0],
        stages=[tuple(r) for r in q("SELECT stage, status, COUNT(*) FROM operations GROUP BY stage, status ORDER BY stage, status")],
        verdicts=[tuple(r) for r in q(
            f"SELECT i.kind, lv.verdict, COUNT(*) FROM ({LATEST_VERDICT}) lv JOIN images i ON i.id = lv.image_id "
            "GROUP BY i.kind, lv.verdict ORDER BY i.kind, lv.verdict")],
        reviews=[tuple(r) for r in q(f"SELECT decision, COUNT(*) FROM ({LATEST_REVIEW}) GROUP BY decision ORDER BY decision")],
        datasets=[tuple(r) for r in q(
            "SELECT d.version, d.round, COUNT(m.image_id) FROM dataset_versions d "
            "LEFT JOIN dataset_members m ON m.dataset_id = d.id GROUP BY d.id ORDER BY d.version")],
        lora_runs=[tuple(r) for r in q("SELECT id, round, status FROM lora_runs ORDER BY id")],
        coverage=coverage_table(project) if tagged else None,
    )


def render_status(status: Status):
    """A rich renderable: one small table per aspect (empty aspects are left out)."""
    from rich.console import Group
    from rich.table import Table

    def table(title: str, headers: list[str], rows: list[tuple]) -> Table:
        t = Table(title=title, title_justify="left", show_edge=False)
        for h in headers:
            t.add_column(h, justify="right" if h in ("count", "round", "members", "version", "run") else "left")
        for row in rows:
            t.add_row(*(str(c) for c in row))
        return t

    parts = [f"[bold]{status.name}[/bold]  trigger: [cyan]{status.trigger}[/cyan]"]
    if not status.images:
        parts.append("No images yet: run `flywheel ingest PATH...`")
    else:
        parts.append(table("Images", ["kind", "round", "count"], status.images))
        parts.append(f"Captioned images: {status.captioned}")
    if status.stages:
        parts.append(table("Operations", ["stage", "status", "count"], status.stages))
    if status.verdicts:
        parts.append(table("Judge verdicts (newest per image)", ["kind", "verdict", "count"], status.verdicts))
    if status.reviews:
        parts.append(table("Human reviews (newest per image)", ["decision", "count"], status.reviews))
    if status.datasets:
        parts.append(table("Dataset versions", ["version", "round", "members"], status.datasets))
    if status.lora_runs:
        parts.append(table("LoRA runs", ["run", "round", "status"], status.lora_runs))
    if status.coverage is not None:
        cov = status.coverage
        from rich.markup import escape

        parts.append(table(f"Coverage of the set ({cov.images} images: kept sources + accepted)", ["axis", "images"],
                           [(axis, escape(text)) for axis, text in cov.rows()]))  # "[judge]" is not markup
        gaps = cov.gap_messages()
        parts.append("Missing: " + ", ".join(gaps) + " (`flywheel enrich --fill-gaps` plans recipes for them)"
                     if gaps else "No empty coverage cells.")
    return Group(*parts)
