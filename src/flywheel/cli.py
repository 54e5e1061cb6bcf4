"""The ``flywheel`` command line: parse, call one library function, format. No logic lives here."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from flywheel.errors import FlywheelError

log = logging.getLogger("flywheel")


@functools.cache
def _console():
    """One console for the progress bar and the log lines, so log lines print above a running bar."""
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def rich_progress(description: str):
    """A ProgressFn backed by a rich bar: done/total, rate, ETA, elapsed (``flywheel.progress_display``)."""
    from flywheel.progress_display import rich_progress as bar

    return bar(description, _console())


class FlywheelGroup(click.Group):
    """Turns FlywheelError into a readable message + hint and exit code 1 (no traceback); so too a full disk
    or a read-only folder met outside the catalog and the store (an export folder, a run folder)."""

    def invoke(self, ctx: click.Context):
        from flywheel.catalog import oserrors

        try:
            return super().invoke(ctx)
        except FlywheelError as err:
            _exit_with(err)
        except OSError as err:
            storage = oserrors.from_os_error(err, in_project=False)
            if storage is None:  # anything else is a bug: keep its traceback
                raise
            _exit_with(storage)


def _exit_with(err: FlywheelError) -> None:
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

    from flywheel.progress import third_party_bars

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=_console(), show_path=False)],
                        force=True)
    third_party_bars(enabled=verbose > 0)  # downloads and weight loading: our own lines instead, unless -v
    for name in MODEL_LOADING_LOGGERS:  # what is loading (and downloading) shows at the default verbosity
        logging.getLogger(name).setLevel(logging.INFO if verbose == 0 else logging.NOTSET)
    if verbose == 0:
        _quiet_libraries()
    ctx.obj = {"project_dir": project_dir}


# "loading flux-dev (text_to_image) for generate ...", "loaded ... in 41.2 s", "released ...", downloads.
MODEL_LOADING_LOGGERS = ("flywheel.models.pool", "flywheel.models.download")


# Libraries that log expected, unactionable warnings at import or load time (optional kernels missing,
# LoRA files without text-encoder keys, ...). Flywheel's own warnings stay; -v shows everything.
NOISY_LIBRARIES = ("diffusers", "transformers", "torchao", "bitsandbytes", "accelerate", "peft", "torch",
                   "torch.utils._pytree", "absl")


def _quiet_libraries() -> None:
    import os

    # diffusers / transformers set their level from these at first import, so set them before that.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's native (absl/glog) start-up lines
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)


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
    from flywheel.ingest import one_line  # file names may hold newlines or escape codes: one line per file

    for item in result.rejected:
        click.secho(f"  rejected  {one_line(item.path)}: {one_line(item.reason)}", fg="red")
    for item in result.skipped:
        click.echo(f"  skipped   {one_line(item.path)}: {one_line(item.reason)}")
    for item in result.added:
        note = f" ({one_line(item.reason)})" if item.reason else ""
        click.secho(f"  added     {one_line(item.path)}{note}", fg="green")
    click.echo(f"ingest: {len(result.added)} added, {len(result.skipped)} skipped, {len(result.rejected)} rejected")


@main.command()
@click.option("--backend", type=click.Choice(["qwen-image-edit", "flux-kontext", "flux2-klein", "longcat-image-edit",
                                            "instruct-pix2pix", "inpaint-sdxl", "inpaint-flux-fill",
                                            "sdxl-turbo-controlnet", "describe-generate", "composite", "api"]),
              default=None, help="Override [enrich] backend for this run ('composite' runs on CPU, offline).")
@click.option("--fill-gaps", is_flag=True, help="Instead of [enrich] recipes, the recipes that fill the set's empty "
              "coverage cells (`flywheel status` lists them, e.g. 'no profile views').")
@click.pass_context
def enrich(ctx: click.Context, backend: str | None, fill_gaps: bool) -> None:
    """Edit every source with the configured recipes (new backgrounds, light, styles, angles). Resumable."""
    from flywheel.enrich import enrich as run_enrich

    with _open(ctx) as project:
        cfg = project.config.enrich
        if backend is not None:
            cfg = cfg.model_copy(update={"backend": backend})
        if fill_gaps:
            from flywheel.coverage import fill_gaps as plan_gaps

            cfg, gaps = plan_gaps(project, cfg)
            for gap, recipes in gaps:
                click.echo(f"  {gap}: " + (", ".join(recipes) if recipes else "no shipped recipe (add photos)"))
            if not cfg.recipes:
                click.echo("enrich --fill-gaps: no empty coverage cell a recipe can fill; nothing to do")
                return
        with rich_progress("enrich") as progress:
            result = run_enrich(project, cfg, progress=progress)
    for key, error in result.failed:
        click.secho(f"  failed  {key}: {error}", fg="red")
    click.echo(result.summary())


@main.command()
@click.option("--template", is_flag=True, help="Build captions from the edit recipes instead of asking the VLM.")
@click.option("--set", "set_", nargs=2, metavar="ID TEXT", default=None,
              help="Write your own caption for image ID (TEXT '-' reads it from stdin). Kept over machine captions.")
@click.option("--show", metavar="ID", default=None, help="Print every caption image ID has had, oldest first.")
@click.pass_context
def caption(ctx: click.Context, template: bool, set_: tuple[str, str] | None, show: str | None) -> None:
    """Caption every image not yet captioned under the current [caption] policy (trigger word included).

    With --set, write one image's caption by hand instead (cleaned to one line, trigger word added if
    missing; earlier captions stay as history, see --show)."""
    from flywheel.caption import caption as run_caption

    if set_ or show:
        if template or (set_ and show):
            raise click.UsageError("use one of --set, --show or --template")
        _caption_by_hand(ctx, set_, show)
        return
    with _open(ctx) as project, rich_progress("caption") as progress:
        cfg = project.config
        if template:
            cfg = cfg.model_copy(update={"caption": cfg.caption.model_copy(update={"mode": "template"})})
        result = run_caption(project, cfg, progress=progress)
    if not result.written and not result.failed:
        click.echo(f"caption: every image already has a caption from policy {result.policy}")
        return
    for image_id, traits in result.flagged_traits.items():
        click.secho(f"  image {image_id}: caption mentions identity traits {', '.join(traits)}", fg="yellow")
    click.echo(f"caption: {result.count('vlm')} by the VLM, {result.count('template')} from templates "
               f"({len(result.fell_back)} fallbacks), {len(result.failed)} failed, "
               f"trigger inserted in {len(result.trigger_inserted)} (policy {result.policy})")


def _caption_by_hand(ctx: click.Context, set_: tuple[str, str] | None, show: str | None) -> None:
    from flywheel import captions
    from flywheel.review import default_person

    with _open(ctx) as project:
        if set_:
            image_id, text = set_
            text = sys.stdin.read() if text == "-" else text
            edit = captions.set_caption(project, image_id, text, author=default_person(), via="cli")
            click.echo(f"image {edit.image_id}: {edit.text}" + ("" if edit.changed else "  (unchanged)"))
            for note in edit.notes:
                click.secho(f"  note: {note}", fg="yellow")
            return
        rows = captions.history(project, show)
    if not rows:
        click.echo(f"image {show}: no caption yet")
    for i, r in enumerate(rows):
        who = f" by {r['author']}" if r["author"] else ""
        via = f" via {r['via']}" if r["via"] else ""
        now = "  <- current" if i == len(rows) - 1 else ""
        click.echo(f"  {r['created_at'][:19].replace('T', ' ')}  {r['source']}{who}{via}: {r['text']}{now}")


@main.command()
@click.option("--no-vlm", is_flag=True, help="Judge on pixel signals only (faces, change, sharpness, noise).")
@click.option("--judge-adapter", default=None, metavar="PATH|active|none",
              help="LoRA from `flywheel tune-judge` for the judge VLM (default: the active one, if any).")
@click.pass_context
def judge(ctx: click.Context, no_vlm: bool, judge_adapter: str | None) -> None:
    """Score every edited/generated image and record a verdict (accepted / rejected / needs_review)."""
    from flywheel.judge import judge as run_judge

    with _open(ctx) as project, rich_progress("judge") as progress:
        cfg = project.config
        if no_vlm:
            cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"judge": "none"})})
        result = run_judge(project, cfg, progress=progress, judge_adapter=judge_adapter)
    if not result.verdicts:
        click.echo(f"judge: every image already has a verdict under policy {result.policy}")
        return
    for image_id, verdict, reason in result.verdicts:
        if verdict != "accepted":
            click.secho(f"  {verdict:12s} image {image_id}: {reason}", fg="red" if verdict == "rejected" else "yellow")
    click.echo(f"judge: {result.count('accepted')} accepted, {result.count('rejected')} rejected, "
               f"{result.count('needs_review')} need review (policy {result.policy})")


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Counts per kind, round, stage and verdict."""
    from flywheel.status import collect_status, render_status

    with _open(ctx) as project:
        _console().print(render_status(collect_status(project)))


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=Path("flywheel-demo"), required=False)
@click.option("--stack", default=None, help="A tiny model stack for a new demo, e.g. tiny-klein (FLUX.2 klein LoRAs).")
def demo(directory: Path, stack: str | None) -> None:
    """Run the whole loop offline on the built-in sample character (says which parts are tiny stand-ins)."""
    from flywheel.demo import run_demo
    from flywheel.status import render_status

    with rich_progress("demo") as progress:
        summary = run_demo(directory, progress=progress, on_step=lambda s: click.echo(f"» {s}"), stack=stack)
    _console().print(render_status(summary.status))
    for line in summary.notes:
        click.echo(line)


@main.command("run")
@click.argument("projects", nargs=-1, type=click.Path(path_type=Path, file_okay=False))
@click.option("--queue", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="A file of project folders, one per line, read again after each project (appended lines run too).")
@click.pass_context
def run_(ctx: click.Context, projects: tuple[Path, ...], queue: Path | None) -> None:
    """Walk the whole data flywheel ([loop] in flywheel.toml); re-run to resume after a stop or a crash.

    With PROJECTS (folders) or --queue, runs each project in turn through one cluster and prints a status table
    (docs/scaling.md)."""
    from flywheel.loop import run_loop

    if projects or queue:
        return _run_many(list(projects), queue)
    with _open(ctx) as project, rich_progress("flywheel") as progress:
        result = run_loop(project, progress=progress, on_step=lambda s: click.echo(f"» {s}"))
    if result.waiting_for_review:
        click.secho(f"Waiting for review: {result.waiting_for_review} images need a human decision "
                    "([loop] review). Run `flywheel review`, then `flywheel run` again.", fg="yellow")
    elif result.report:
        click.echo(f"Done. Evaluation: {result.verdict.replace('_', ' ')}. Report: {result.report}")
    else:
        click.echo("Done.")


def _run_many(folders: list[Path], queue: Path | None) -> None:
    from rich.table import Table

    from flywheel.compute.projects import queued_folders, run_projects

    def table(runs) -> None:
        t = Table("project", "status", "detail", "time", title="flywheel run: projects")
        for r in runs:
            t.add_row(r.folder.name, r.status, r.detail, f"{r.seconds / 60:.1f} min" if r.seconds else "")
        _console().print(t)

    with rich_progress("flywheel") as progress:
        runs = run_projects(queued_folders(folders, queue), progress=progress,
                            on_step=lambda s: click.echo(f"» {s}"))
    table(runs)
    if any(r.status == "failed" for r in runs):
        sys.exit(1)


@main.command()
@click.option("--baseline", "baseline", type=int, default=None, help="LoRA run id (default: the one before).")
@click.option("--candidate", "candidate", type=int, default=None, help="LoRA run id (default: the newest).")
@click.pass_context
def evaluate(ctx: click.Context, baseline: int | None, candidate: int | None) -> None:
    """Compare two LoRA rounds on held-out prompts and seeds; writes an HTML report."""
    from flywheel.evaluate import evaluate as run_evaluate

    with _open(ctx) as project, rich_progress("evaluate") as progress:
        r = run_evaluate(project, baseline_run=baseline, candidate_run=candidate, progress=progress)
    comp = r.metrics["comparisons"].get(r.primary, {})
    click.echo(f"Run {r.candidate_run} vs run {r.baseline_run}: {r.verdict.replace('_', ' ')} on {r.primary} "
               f"({comp.get('baseline', float('nan')):.3f} -> {comp.get('candidate', float('nan')):.3f}, "
               f"95% interval of the improvement {comp.get('ci95', ['?', '?'])})")
    click.echo(f"Report: {r.report}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --token.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--token", envvar="FLYWHEEL_REVIEW_TOKEN", default=None,
              help="Secret every request must carry (env FLYWHEEL_REVIEW_TOKEN keeps it out of `ps`).")
@click.option("--reviewer", default=None, help="Name recorded with each decision (default: your login name).")
@click.option("--no-browser", is_flag=True, help="Do not open a browser tab.")
@click.pass_context
def review(ctx: click.Context, host: str, port: int, token: str | None, reviewer: str | None, no_browser: bool) -> None:
    """Review images in your browser: accept / reject / skip by keyboard; decisions go to the catalog."""
    from flywheel.web import serve

    serve(ctx.obj["project_dir"], host=host, port=port, token=token, reviewer=reviewer, open_browser=not no_browser,
          on_ready=lambda url: click.echo(f"Review at {url}  (Ctrl+C to stop)"))


@main.command()
@click.option("--resume", "resume", is_flag=True,
              help="Continue the newest unfinished run from its last checkpoint; if [train], the base model or the "
              "dataset changed since it stopped, set it aside and start a new run instead.")
@click.option("--restart", is_flag=True, help="Set every unfinished run aside and start a new run.")
@click.option("--run", "run_id", type=int, default=None, help="With --resume: the run id to continue.")
@click.option("--dataset", "dataset_version", type=int, default=None,
              help="Train on this frozen dataset version (default: freeze a new one for the next round).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Override [train] steps.")
@click.option("--gpus", type=click.IntRange(0), default=None,
              help="Override [train] gpus: N processes, one per GPU, data parallel (0: this process).")
@click.option("--device", default=None,
              help="Override [models] base device; 'cpu' with --gpus runs CPU processes (tests).")
@click.option("--force", is_flag=True,
              help="Train even when the set has uncaptioned, unjudged or unreviewed images, or no edits yet.")
@click.pass_context
def train(ctx: click.Context, resume: bool, restart: bool, run_id: int | None, dataset_version: int | None,
          steps: int | None, gpus: int | None, device: str | None, force: bool) -> None:
    """Train a FLUX.1 LoRA on accepted images + captions (sources always in); resumable."""
    from flywheel.train import train as run_train

    if resume and restart:
        raise click.UsageError("--resume continues a run and --restart starts a new one: pick one")
    with _open(ctx) as project, rich_progress("train") as progress:
        update = {k: v for k, v in {"steps": steps, "gpus": gpus}.items() if v is not None}
        cfg = project.config.train.model_copy(update=update) if update else project.config.train
        result = run_train(project, cfg, dataset_version=dataset_version, resume=(run_id or True) if resume else False,
                           restart=restart, device=device, progress=progress, force=force)
    click.echo(f"run {result.run_id} (dataset v{result.dataset_version}): final loss {result.losses[-1]:.4f}")
    click.echo(f"  LoRA (diffusers): {result.lora_path}\n  LoRA (kohya/ComfyUI): {result.kohya_path}")


@main.command()
@click.option("--run", "run_id", type=int, default=None, help="LoRA run to use (default: the newest finished one).")
@click.pass_context
def generate(ctx: click.Context, run_id: int | None) -> None:
    """Generate round-k synthetic images: prompt bank x seeds with LoRA round k (then: flywheel judge)."""
    from flywheel.generate import generate as run_generate

    with _open(ctx) as project, rich_progress("generate") as progress:
        result = run_generate(project, lora_run_id=run_id, progress=progress)
    click.echo(f"round {result.round}: {len(result.image_ids)} images generated, {result.skipped} already there")


@main.command("tune-judge")
@click.option("--resume", is_flag=True, help="Continue the newest unfinished attempt from its last checkpoint.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Override [tune_judge] steps.")
@click.pass_context
def tune_judge_cmd(ctx: click.Context, resume: bool, steps: int | None) -> None:
    """Fine-tune the judge VLM on your review decisions; it judges only if it agrees better with held-out ones."""
    from flywheel.tune_judge import tune_judge

    with _open(ctx) as project, rich_progress("tune-judge") as progress:
        cfg = project.config
        if steps is not None:
            cfg = cfg.model_copy(update={"tune_judge": cfg.tune_judge.model_copy(update={"steps": steps})})
        r = tune_judge(project, cfg, resume=resume, progress=progress)
    for name, c in r.balance.items():
        click.echo(f"{name:9s}: {c['keep']} keep / {c['reject']} reject from {c['groups']} source group(s)")
    click.echo(f"{'held-out':22s} {'base judge':>11s} {'verdicts':>10s} {'this adapter':>13s}")
    for key in ("accuracy", "kappa", "reject_precision", "reject_recall", "brier", "ece"):
        click.echo(f"{key:22s} {r.before[key]:11.3f} {r.incumbent[key]:10.3f} {r.after[key]:13.3f}")
    click.echo(f"kappa gain over the judge's recorded verdicts (policy {r.incumbent_policy}): {r.gain.difference:+.3f}, "
               f"95% interval [{r.gain.low:+.3f}, {r.gain.high:+.3f}] over {r.gain.n} held-out group(s)")
    click.echo(f"adapter {r.adapter_id} ({r.base_model}, data {r.data_hash[:12]}): {r.adapter_path}")
    if r.promoted:
        click.secho("promoted: `flywheel judge` now uses this adapter", fg="green")
    else:
        click.secho("not promoted: its kappa gain over the recorded verdicts is not above zero with 95% confidence",
                    fg="yellow")


def _attach() -> None:
    """Commands that live in their own modules (cli.py stays readable in one sitting)."""
    from flywheel.cli_calibrate import calibrate
    from flywheel.cli_models import models
    from flywheel.cli_sets import export_cmd, freeze

    for command in (models, freeze, export_cmd, calibrate):
        main.add_command(command)


_attach()
