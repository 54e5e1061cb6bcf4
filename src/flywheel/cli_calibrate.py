"""``flywheel calibrate``: the judge's checks against your review decisions (attached to ``flywheel.cli.main``)."""

from __future__ import annotations

import click


@click.command()
@click.option("--objective", type=click.Choice(["kappa", "agreement"]), default="kappa", show_default=True,
              help="What a suggested threshold maximises on your decisions.")
@click.option("--bins", type=click.IntRange(2, 20), default=5, show_default=True, help="Reliability table bins.")
@click.pass_context
def calibrate(ctx: click.Context, objective: str, bins: int) -> None:
    """How each judge check agrees with your reviews, and the thresholds that would match them best (changes nothing)."""
    from flywheel.calibrate import calibrate as run_calibrate
    from flywheel.calibrate import render
    from flywheel.cli import _open

    with _open(ctx) as project:
        report = run_calibrate(project, objective=objective, bins=bins)
    for line in render(report):
        click.echo(line)
