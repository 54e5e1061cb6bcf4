"""``flywheel models``: the presets, and what a model needs once loaded (attached to ``flywheel.cli.main``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def models() -> None:
    """Model presets, and what a model needs once loaded."""


def _project_root(ctx: click.Context) -> Path | None:
    import os

    from flywheel.errors import ProjectNotFoundError
    from flywheel.project import find_project_root

    try:
        return find_project_root(ctx.obj["project_dir"] or Path(os.environ.get("FLYWHEEL_PROJECT", ".")))
    except ProjectNotFoundError:
        return None


def _models_config(ctx: click.Context):
    """The project's [models] section when there is a project here, else the defaults."""
    from flywheel.config import CONFIG_FILENAME, ModelsConfig, load_config

    root = _project_root(ctx)
    return ModelsConfig() if root is None else load_config(root / CONFIG_FILENAME).models


@models.command("list")
@click.pass_context
def models_list(ctx: click.Context) -> None:
    """The presets (licence, size on disk, VRAM class, downloaded or not), the stacks, and this project's choice."""
    from flywheel.models.cached import download_state
    from flywheel.models.presets import PRESETS, TINY_FOR_ROLE
    from flywheel.models.stacks import DEFAULT_STACK, STACKS

    rows = [("preset", "role", "family", "licence", "commercial", "on disk", "VRAM", "smaller card", "downloaded",
             "hub id", "note")]
    for p in PRESETS.values():
        licence = p.licence.name if p.licence else "-"
        commercial = "-" if p.licence is None else "yes" if p.licence.commercial else "no"
        rows.append((p.name, p.role, p.family, licence, commercial, f"{p.disk_gb:g} GB" if p.disk_gb else "-",
                     p.vram_class, p.low_vram or "-", download_state(p), p.hub_id or "(built locally)", p.note))
    _columns(rows)
    roles = ", ".join(f"{role}: {name}" for role, name in TINY_FOR_ROLE.items())
    click.echo(f'"tiny" picks the tiny model for the role ({roles}). Any preset can be replaced by a local folder.')
    click.echo("VRAM: the smallest card for the preset's own settings (bf16); smaller card: with quantization or "
               "offload. Sizes are approximate (docs/models.md).")
    click.echo("")
    rows = [("stack", "captioner", "judge", "editor", "base", "[enrich] backend", "commercial", "summary")]
    for s in STACKS.values():
        presets = [PRESETS.get(spec) for spec in s.roles().values()]
        closed = sorted({p.name for p in presets if p and p.licence and not p.licence.commercial})
        commercial = ("no: " + ", ".join(closed)) if closed else "yes" if all(p and p.licence for p in presets) else "-"
        rows.append((s.name + (" (default)" if s.name == DEFAULT_STACK else ""), s.captioner, s.judge, s.editor,
                     s.base, s.enrich_backend, commercial, s.summary))
    _columns(rows)
    click.echo("[models] stack = NAME sets every role; a role set in [models] (or [enrich] backend) wins.")
    project = _project_config(ctx)
    if project is not None:
        m = project.models
        click.echo(f"This project: stack {m.stack}; captioner {m.captioner}, judge {m.judge}, editor {m.editor}, "
                   f"base {m.base}; [enrich] backend {project.enrich.backend}.")


def _project_config(ctx: click.Context):
    """The project's whole config when there is a valid one here, else None (a listing never fails on it)."""
    from flywheel.config import CONFIG_FILENAME, load_config
    from flywheel.errors import ConfigError

    root = _project_root(ctx)
    try:
        return None if root is None else load_config(root / CONFIG_FILENAME)
    except ConfigError:
        return None


def _columns(rows: list[tuple[str, ...]]) -> None:
    """Plain columns, the last one free text: readable when piped, and in narrow terminals."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip())


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
