"""``flywheel demo``: the loop, offline, on the built-in sample character.

What runs today: init a project, write the sample shots (``flywheel.sample``), ingest them with real
face detection, and report status. Later stages join here as they land; the notes returned say which
parts are real and which are tiny stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flywheel.config import CONFIG_FILENAME
from flywheel.ingest import IngestResult, ingest
from flywheel.progress import ProgressFn
from flywheel.project import init_project, open_project
from flywheel.sample import SAMPLE_NAME, SAMPLE_TRIGGER, write_sample
from flywheel.status import Status, collect_status


@dataclass
class DemoSummary:
    root: Path
    ingest: IngestResult
    status: Status
    notes: list[str] = field(default_factory=list)


def run_demo(directory: Path, *, progress: ProgressFn | None = None) -> DemoSummary:
    """Run (or resume) the demo in ``directory``; re-running continues where it stopped."""
    # 1. A project for the sample character (kept as it is when it exists: the demo resumes).
    directory = directory.expanduser().resolve()
    if not (directory / CONFIG_FILENAME).exists():
        init_project(directory, name=SAMPLE_NAME, trigger=SAMPLE_TRIGGER)
    with open_project(directory) as project:
        # 2. The sample shots, written next to the project like a user's own folder of images.
        sources = write_sample(directory / "sample-sources")
        # 3. Ingest (a no-op when already done).
        result = ingest(project, [str(p) for p in sources], progress=progress)
        status = collect_status(project)
    notes = [
        f"Demo project: {directory}",
        "Sample: 5 crops/flips of skimage's astronaut photo (NASA, public domain), real face detection (dlib).",
        f"Inspect it: flywheel -C {directory} status",
    ]
    return DemoSummary(root=directory, ingest=result, status=status, notes=notes)
