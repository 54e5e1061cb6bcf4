"""``flywheel freeze`` and ``flywheel export``: dataset versions without training, and files other trainers
read (attached to ``flywheel.cli.main``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--round", "round_", type=click.IntRange(1), default=None,
              help="LoRA round the set is for (default: the next one).")
@click.pass_context
def freeze(ctx: click.Context, round_: int | None) -> None:
    """Freeze a dataset version without training: which images, with which captions; says what it holds."""
    from flywheel.cli import _open
    from flywheel.dataset import freeze_dataset, next_round, summarize

    with _open(ctx) as project:
        k = round_ or next_round(project)
        summary = summarize(project, version=freeze_dataset(project, k).version)
    click.echo(summary.describe())
    if summary.blockers():
        missing = "; ".join(what for what, _ in summary.blockers())
        commands = ", ".join(f"`{cmd}`" for _, cmd in summary.blockers())
        click.secho(f"Not ready to train: {missing}. Run {commands}, then freeze again.", fg="yellow")
    click.echo(f"Next: flywheel export DEST --dataset {summary.version}, or flywheel train --dataset {summary.version}")


@click.command(name="export")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["kohya", "ai-toolkit", "imagefolder"]), default="kohya",
              show_default=True)
@click.option("--dataset", "version", type=int, default=None, help="Dataset version (default: the newest).")
@click.option("--freeze", is_flag=True, help="Freeze a new dataset version first and export that.")
@click.option("--class-word", default=None, metavar="WORD",
              help="What the character is, e.g. 'woman': captions and prompts read 'TRIGGER woman'.")
@click.option("--short-captions", is_flag=True,
              help="Also write NNNN.short.txt (first sentence); the configs train on both forms.")
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True, help="kohya folder repeats.")
@click.option("--overwrite", is_flag=True, help="Replace DEST if it is not empty.")
@click.pass_context
def export_cmd(ctx: click.Context, dest: Path, fmt: str, version: int | None, freeze: bool, class_word: str | None,
               short_captions: bool, repeats: int, overwrite: bool) -> None:
    """Export a dataset version as image + caption files, with a ready ai-toolkit YAML and kohya TOML."""
    from flywheel.cli import _open
    from flywheel.dataset import summarize
    from flywheel.export import export_dataset

    with _open(ctx) as project:
        result = export_dataset(project, dest, fmt=fmt, version=version, repeats=repeats, overwrite=overwrite,
                                freeze=freeze, class_word=class_word, short_captions=short_captions)
        if result.frozen:
            click.echo("froze " + summarize(project, version=result.dataset_version).describe())
    click.echo(f"dataset v{result.dataset_version}: {result.images} images -> {result.folder}")
    for path in result.configs:
        click.echo(f"  {'ai-toolkit job' if path.suffix == '.yaml' else 'kohya dataset config'}: {path}")
