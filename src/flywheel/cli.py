"""The ``flywheel`` command line: parse, call one library function, format. No logic lives here."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from flywheel.errors import FlywheelError

log = logging.getLogger("flywheel")


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


@contextmanager
def rich_progress(description: str) -> Iterator:
    """A ProgressFn backed by a rich progress bar ("12/25 edits")."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[label]}"),
        TimeElapsedColumn(), console=_console(), transient=False,
    ) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            bar.update(task, completed=done, total=total, label=label)

        yield update


class FlywheelGroup(click.Group):
    """Turns FlywheelError into a readable message + hint and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FlywheelError as err:
            msg = FlywheelError.__str__(err).split("\n  hint: ")[0]
            click.secho(f"Error: {msg}", fg="red", err=True)
            if err.hint:
                click.secho(f"Hint: {err.hint}", fg="yellow", err=True)
            sys.exit(1)


@click.group(cls=FlywheelGroup)
@click.option("-C", "--project", "project_dir", type=click.Path(path_type=Path), default=None,
              help="Project folder (default: $FLYWHEEL_PROJECT or the current folder).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="character-flywheel")
@click.pass_context
def main(ctx: click.Context, project_dir: Path | None, verbose: int) -> None:
    """Flywheel: from a handful of images of one character to a clean dataset and a FLUX LoRA."""
    from rich.logging import RichHandler

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)], force=True)
    ctx.obj = {"project_dir": project_dir}


def _open(ctx: click.Context):
    from flywheel.project import open_project

    return open_project(ctx.obj["project_dir"])


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Name of the character, e.g. 'Astronaut'.")
@click.option("--trigger", required=True, help="Trigger token for the LoRA, e.g. 'fw_astro'.")
def init(directory: Path, name: str, trigger: str) -> None:
    """Create a project: a commented flywheel.toml and the .flywheel/ workspace."""
    from flywheel.project import init_project

    cfg = init_project(directory, name=name, trigger=trigger)
    click.echo(f"Created {cfg}\nNext: flywheel -C {directory} ingest PATH...")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
def ingest(ctx: click.Context, paths: tuple[str, ...]) -> None:
    """Add source images (files, folders, globs). Never modifies or moves your files."""
    from flywheel.ingest import ingest as run_ingest

    with _open(ctx) as project, rich_progress("ingest") as progress:
        result = run_ingest(project, list(paths), progress=progress)
    _print_ingest(result)


def _print_ingest(result) -> None:
    for item in result.rejected:
        click.secho(f"  rejected  {item.path}: {item.reason}", fg="red")
    for item in result.skipped:
        click.echo(f"  skipped   {item.path}: {item.reason}")
    for item in result.added:
        note = f" ({item.reason})" if item.reason else ""
        click.secho(f"  added     {item.path}{note}", fg="green")
    click.echo(f"ingest: {len(result.added)} added, {len(result.skipped)} skipped, {len(result.rejected)} rejected")


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Counts per kind, round, stage and verdict."""
    from flywheel.status import collect_status, render_status

    with _open(ctx) as project:
        _console().print(render_status(collect_status(project)))


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=Path("flywheel-demo"), required=False)
def demo(directory: Path) -> None:
    """Run the loop offline on the built-in sample character (see README: which parts are stand-ins)."""
    from flywheel.demo import run_demo
    from flywheel.status import render_status

    with rich_progress("demo") as progress:
        summary = run_demo(directory, progress=progress)
    _print_ingest(summary.ingest)
    _console().print(render_status(summary.status))
    for line in summary.notes:
        click.echo(line)
