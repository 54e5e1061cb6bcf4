"""``flywheel models``: the presets, and what a model needs once loaded (attached to ``flywheel.cli.main``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def models() -> None:
    """Model presets, and what a model needs once loaded."""


def _models_config(ctx: click.Context):
    """The project's [models] section when there is a project here, else the defaults."""
    import os

    from flywheel.config import CONFIG_FILENAME, ModelsConfig, load_config
    from flywheel.errors import ProjectNotFoundError
    from flywheel.project import find_project_root

    try:
        root = find_project_root(ctx.obj["project_dir"] or Path(os.environ.get("FLYWHEEL_PROJECT", ".")))
    except ProjectNotFoundError:
        return ModelsConfig()
    return load_config(root / CONFIG_FILENAME).models


@models.command("list")
def models_list() -> None:
    """The presets: name, family, hub id and approximate GPU memory."""
    from flywheel.models.presets import PRESETS, TINY_FOR_ROLE

    def gib(v: float | None) -> str:
        return f"~{v:g} GiB" if v else "-"

    rows = [("preset", "role", "family", "hub id", "VRAM bf16", "VRAM nf4", "note")]
    rows += [(p.name, p.role, p.family, p.hub_id or "(built locally)", gib(p.vram_gib), gib(p.vram_gib_nf4), p.note)
             for p in PRESETS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:  # plain columns: readable when piped, and in narrow terminals
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    roles = ", ".join(f"{role}: {name}" for role, name in TINY_FOR_ROLE.items())
    click.echo(f'"tiny" picks the tiny model for the role ({roles}). Any preset can be replaced by a local folder.')


@models.command("info")
@click.argument("name_or_path")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Override [models].device.")
@click.option("--quantization", type=click.Choice(["none", "nf4", "int8", "fp8"]), default=None,
              help="Override [models].quantization.")
@click.pass_context
def models_info(ctx: click.Context, name_or_path: str, device: str | None, quantization: str | None) -> None:
    """Load a preset, folder or hub id and report parameters, dtype, device and VRAM used."""
    from flywheel.models import model_info

    cfg = _models_config(ctx)
    updates = {k: v for k, v in (("device", device), ("quantization", quantization)) if v}
    info = model_info(name_or_path, cfg.model_copy(update=updates))
    for key in ("model", "family", "folder", "parameters", "weights_gib", "dtype", "device", "quantization", "vram"):
        value = info.get(key)
        if key == "parameters":
            value = f"{value:,}"
        elif key == "weights_gib":
            value = f"{value:.3f} GiB on disk"
        click.echo(f"{key:>13}: {value}")
