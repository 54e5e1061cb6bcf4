"""``flywheel generate``: round-k synthetic images from the prompt bank with the LoRA of round k.

Prompts (the shipped bank plus ``[generate] extra_prompts``, ``{trigger}`` filled in) x seeds, batched.
Each image is an ``images`` row (kind 'synthetic', round k) whose operation row records the prompt, seed,
LoRA run id and path, and every sampler setting. Work keys make a re-run skip what is already done, so an
interrupted generate continues where it stopped. The images then go to ``flywheel judge``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.config import GenerateConfig
from flywheel.errors import ConfigError, StageError
from flywheel.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from flywheel.models.pool import ModelPool

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    round: int
    lora_run_id: int
    image_ids: list[int] = field(default_factory=list)
    skipped: int = 0
    failed: list[str] = field(default_factory=list)  # work keys that failed on the cluster (a re-run retries)


def shipped_prompts(name: str) -> list[str]:
    """A prompt list shipped in ``flywheel/data`` (``prompts.toml``: generation; ``eval_prompts.toml``: held out)."""
    return tomllib.loads((Path(__file__).parent / "data" / name).read_text(encoding="utf-8"))["prompts"]


def prompt_bank(trigger: str, cfg: GenerateConfig) -> list[str]:
    """The shipped prompts (unless turned off) and the user's, each with the trigger word in place."""
    shipped = shipped_prompts("prompts.toml")
    prompts = [*(shipped if cfg.use_shipped_prompts else []), *cfg.extra_prompts]
    missing = [p for p in prompts if "{trigger}" not in p]
    if missing:
        raise ConfigError(f"generate.extra_prompts without {{trigger}}: {missing[0]!r}",
                          hint="put {trigger} where the character should be, e.g. '{trigger} in a forest'")
    if not prompts:
        raise ConfigError("the prompt bank is empty", hint="set generate.use_shipped_prompts = true or add extra_prompts")
    prompts = list(dict.fromkeys(prompts))
    if cfg.prompts:
        prompts = prompts[:cfg.prompts]
    return [p.replace("{trigger}", trigger) for p in prompts]


def generate(project, cfg: GenerateConfig | None = None, *, lora_run_id: int | None = None, device: str | None = None,
             progress: ProgressFn | None = None, purpose: str = "train", pool: ModelPool | None = None,
             **model_kwargs) -> GenerateResult:
    """Generate the round's synthetic images with the newest finished LoRA run (or ``lora_run_id``).

    ``purpose='eval'`` renders held-out evaluation images (``flywheel evaluate``): recorded under the
    'evaluate' stage with ``images.purpose = 'eval'``, so no dataset ever trains on them. The base comes
    from ``pool`` (``flywheel.models.pool``: [models] load settings of the base role, loaded once per pool);
    the round's LoRA is loaded onto it and unloaded again before returning.
    """
    from flywheel.models.pool import stage_pool

    cfg = cfg or project.config.generate
    progress = progress or no_progress
    if purpose not in ("train", "eval"):
        raise StageError(f"unknown purpose {purpose!r}", hint="'train' (synthetic round images) or 'eval' (held out)")
    stage = "generate" if purpose == "train" else "evaluate"
    cat = project.catalog
    # 1. Plan: the LoRA run, prompts x seeds, minus what an earlier (interrupted) call already made.
    run = _lora_run(cat, lora_run_id)
    lora_path = project.workspace / run["output_dir"] / "pytorch_lora_weights.safetensors"
    renderer, steps, guidance = render_settings(project, run, cfg)
    settings = {"width": cfg.width, "height": cfg.height, "num_inference_steps": steps,
                "guidance_scale": guidance, "max_sequence_length": cfg.max_sequence_length,
                "lora_scale": cfg.lora_scale}
    plan = []
    for prompt in prompt_bank(project.config.project.trigger, cfg):
        for j in range(cfg.seeds_per_prompt):
            seed = cfg.seed + j
            key = f"{stage}:" + hashlib.sha256(
                f"{run['id']}|{prompt}|{seed}|{sorted(settings.items())}".encode()).hexdigest()[:32]
            plan.append((prompt, seed, key))
    done = {r["work_key"] for r in cat.query("SELECT work_key FROM operations WHERE stage = ? AND status = 'ok'"
                                             " AND work_key LIKE ?", (stage, f"{stage}:%"))}
    result = GenerateResult(round=run["round"], lora_run_id=run["id"], skipped=sum(k in done for _, _, k in plan))
    # Batches are fixed slices of the whole plan, and one that an interrupted run finished only in part is
    # rendered whole again: batched and single renders differ in the last bits, so only the same batches
    # reproduce the pixels an uninterrupted run makes (only the missing images are recorded).
    batches = [plan[i:i + cfg.batch_size] for i in range(0, len(plan), cfg.batch_size)]
    batches = [b for b in batches if any(key not in done for _, _, key in b)]
    n_todo = len(plan) - result.skipped
    if not batches:
        return result
    # 2. The run's base (from the pool: loaded once) with the round's LoRA on it, unloaded at the end.
    with stage_pool(project, pool, stage) as models:
        if device is not None:
            model_kwargs["device"] = device
        model = models.text_to_image(renderer, num_inference_steps=steps, guidance_scale=guidance,
                                     max_sequence_length=cfg.max_sequence_length, **model_kwargs)
        model.load_lora(str(lora_path), name=f"round{run['round']}", scale=cfg.lora_scale)
        try:
            _render(project, model, plan_batches=batches, done=done, stage=stage, run=run, lora_path=lora_path,
                    settings=settings, cfg=cfg, purpose=purpose, n_todo=n_todo, result=result, progress=progress)
        finally:
            model.unload_lora()
    log.info("generate: %d images for round %d (%d already there)", len(result.image_ids), result.round, result.skipped)
    return result


def render_settings(project, run, cfg: GenerateConfig) -> tuple[str, int, float]:
    """(model, steps, guidance) that render ``run``'s LoRA: the model its training recorded in config.json
    (``generate_model``: the distilled klein for a klein base), else its base. Steps and guidance are
    [generate]'s, except that unset ones follow the rendering preset (4 steps, no CFG on the distilled klein)."""
    import json

    from flywheel.models.presets import get_preset

    resolved = project.workspace / run["output_dir"] / "config.json"
    renderer = json.loads(resolved.read_text(encoding="utf-8")).get("generate_model") if resolved.is_file() else None
    if not renderer:
        return run["base_model"], cfg.steps, cfg.guidance
    preset = get_preset(renderer, "text_to_image")
    defaults = preset.settings if preset is not None else {}
    steps = cfg.steps if "steps" in cfg.model_fields_set else int(defaults.get("num_inference_steps", cfg.steps))
    guidance = (cfg.guidance if "guidance" in cfg.model_fields_set
                else float(defaults.get("guidance_scale", cfg.guidance)))
    return renderer, steps, guidance


def _render(project, model, *, plan_batches, done, stage, run, lora_path, settings, cfg, purpose, n_todo, result,
            progress) -> None:
    """Step 3 of ``generate``: render the batches, one operation row per image and its images row."""
    from flywheel.compute import UnitFailed, map_calls
    from flywheel.models.base import TextToImageRequest

    cat = project.catalog
    # 3. Batches: one operation row per image, finished with the images row that points to it.
    with cat.operation(stage, kind="stage_run", model=model.model_id,
                       params={"lora_run_id": run["id"], "images": n_todo, **settings}) as stage_op:
        running: dict[str, dict[int, int]] = {}

        def calls():  # each batch's 'running' rows and requests, made just before it runs (here or on Ray)
            for batch in plan_batches:
                running[batch[0][2]] = ops = {
                    i: cat.start_operation(stage, model=model.model_id, seed=seed, parent_id=stage_op, work_key=key,
                                           params={**model.params(), **settings, "prompt": prompt, "seed": seed,
                                                   "lora_run_id": run["id"], "lora_path": str(lora_path)})
                    for i, (prompt, seed, key) in enumerate(batch) if key not in done}
                requests = [TextToImageRequest(p, seed=s, width=cfg.width, height=cfg.height) for p, s, _ in batch]
                yield (batch, ops), (requests,), {"batch_size": len(batch)}

        try:
            for out in map_calls(model, "generate", calls()):
                (batch, ops), images = out.item, out.value
                running.pop(batch[0][2])  # from here on its rows are finished here, or left for a re-run
                if out.error is not None:  # here: stop (a re-run redoes it); on Ray after retries: record, go on
                    for op in ops.values():
                        cat.finish_operation(op, "failed", 0, f"{type(out.error).__name__}: {out.error}")
                    if not isinstance(out.error, UnitFailed):
                        raise out.error
                    result.failed.extend(key for _, _, key in batch if key not in done)
                    continue
                ms = int(out.seconds * 1000 / len(batch))  # the batch's time, shared out
                for i, op in ops.items():
                    _record(project, images[i], op, ms, run, purpose, result)
                progress(len(result.image_ids), n_todo, "images")
        except BaseException as err:
            for ops in running.values():
                for op in ops.values():
                    cat.finish_operation(op, "failed", 0, f"{type(err).__name__}: {err}")
            raise


def _record(project, image, op: int, ms: int, run, purpose: str, result: GenerateResult) -> None:
    from flywheel.images import phash, phash_hex, pixel_sha256

    cat = project.catalog
    sha, _ = project.store.put_image(image)
    with cat.transaction():
        existing = cat.query("SELECT id FROM images WHERE sha256 = ?", (sha,))
        image_id = existing[0]["id"] if existing else cat.insert("images", {
            "sha256": sha, "pixel_sha256": pixel_sha256(image), "phash": phash_hex(phash(image)),
            "width": image.width, "height": image.height, "kind": "synthetic", "round": run["round"],
            "operation_id": op, "purpose": purpose})
        cat.finish_operation(op, "ok", ms, output_image_id=image_id)
    result.image_ids.append(image_id)


def _lora_run(cat, lora_run_id: int | None):
    if lora_run_id is not None:
        rows = cat.query("SELECT * FROM lora_runs WHERE id = ?", (lora_run_id,))
        if rows and rows[0]["status"] != "ok":
            raise StageError(f"LoRA run {lora_run_id} did not finish ({rows[0]['status']})",
                             hint="finish it with `flywheel train --resume`")
    else:
        rows = cat.query("SELECT * FROM lora_runs WHERE status = 'ok' ORDER BY id DESC LIMIT 1")
    if not rows:
        raise StageError("no finished LoRA run to generate with" + (f" (id {lora_run_id})" if lora_run_id else ""),
                         hint="run `flywheel train` first")
    return rows[0]
