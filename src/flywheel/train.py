"""``flywheel train``: a character LoRA (FLUX.1 or FLUX.2 klein) on a frozen dataset version, resumable step for step.

The run reads top to bottom: plan (freeze the dataset, record the run), load the base, cache latents and
text embeddings (then the VAE and text encoders leave the GPU), add the LoRA, train with checkpoints and
samples, save the LoRA in diffusers and kohya / ComfyUI formats beside the resolved config and the loss curve.
What differs between base models (prompt encoding, latent packing, the loss's inputs, LoRA key names,
sample pipeline) is the family's (``flywheel.training.families``); this loop is the same for all.
Everything random in the loop (data order, caption dropout, t, noise) comes from one generator whose
state is checkpointed, so ``resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import TrainConfig
from flywheel.dataset import ensure_trainable, freeze_dataset, load_dataset
from flywheel.errors import StageError
from flywheel.models.pool import free_accelerator_memory
from flywheel.progress import ProgressFn, no_progress
from flywheel.training import buckets as bk
from flywheel.training import caching, checkpoint, lora_io, quantize, samples, setup
from flywheel.training import distributed as dp
from flywheel.training import losses as losses_io
from flywheel.training.families import family_for_folder
from flywheel.training.flux_step import Batch
from flywheel.training.setup import base_load, check_runnable
from flywheel.training.speed import apply as apply_speed_options
from flywheel.training.step import LateLoss, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: int
    run_dir: Path
    lora_path: Path
    kohya_path: Path
    dataset_version: int
    losses: list[float]


def train(project, cfg: TrainConfig | None = None, *, dataset_version: int | None = None, resume: int | bool = False,
          restart: bool = False, device: str | None = None, progress: ProgressFn | None = None,
          force: bool = False) -> TrainResult:
    """Train (or, with ``resume``, continue) a LoRA run. ``resume=True`` picks the newest unfinished run; given
    a ``cfg`` (today's [train]) that differs from the run's own, or another base or dataset, that run is set
    aside and a new one starts (``flywheel.training.runs``). ``restart`` sets every unfinished run aside and
    starts a new one; without either, an unfinished run is a clear error rather than a second run.
    A set with uncaptioned, unjudged or unreviewed images, or no edits yet, is refused unless ``force``."""
    from flywheel.models.hub import check_cpu_for
    from flywheel.training import runs

    progress = progress or no_progress
    cat = project.catalog
    # 1. Plan: the run (the unfinished one to continue, or a new one), its frozen dataset and folder.
    def base_of(c: TrainConfig) -> str:
        return base_model_folder(c, project.config.models.base)

    planned = runs.plan(project, cfg, resume=resume, restart=restart, dataset_version=dataset_version, base_of=base_of)
    resuming = planned.run is not None
    spec = planned.run["base_model"] if resuming else ((cfg or project.config.train).base_model
                                                       or project.config.models.base)
    check_cpu_for(spec, "text_to_image", device or project.config.models.for_role("base")["device"])  # no GPU: say so
    if resuming:
        run = planned.run
        cfg = TrainConfig.model_validate(json.loads(run["config_json"]))  # the run's own settings
        ds = load_dataset(project, planned.dataset_version)
        run_id, base = run["id"], run["base_model"]
        family = family_for_folder(base)
        check_runnable(cfg, base_load(project, cfg, device), family)
        placed = dp.place(project, cfg, device)
    else:
        cfg = cfg or project.config.train
        base = planned.base or base_of(cfg)
        family = family_for_folder(base)
        check_runnable(cfg, base_load(project, cfg, device), family)  # before the run is recorded and the loading
        placed = dp.place(project, cfg, device)  # --gpus N: N GPUs visible (or the CPU asked for by name)?
        if not (force or planned.same_set):  # before a version is frozen: a refusal writes nothing
            ensure_trainable(project, _next_round(cat), planned.dataset_version)
        version = planned.dataset_version
        ds = load_dataset(project, version) if version else freeze_dataset(project, _next_round(cat))
        with cat.transaction():
            op = cat.start_operation("train", kind="stage_run", model=base, params=cfg.model_dump(),
                                     seed=cfg.seed)
            run_id = cat.insert("lora_runs", {
                "round": ds.round, "dataset_id": ds.id, "base_model": base, "operation_id": op,
                "config_json": json.dumps(cfg.model_dump()), "output_dir": f"runs/run-{0:04d}",
            })
            cat.execute("UPDATE lora_runs SET output_dir = ? WHERE id = ?", (f"runs/run-{run_id:04d}", run_id))
            runs.supersede(cat, planned.set_aside, by=run_id, reason=planned.why)
        runs.announce(planned, run_id)
    run_dir = project.workspace / "runs" / f"run-{run_id:04d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    trigger = project.config.project.trigger
    try:
        with cat.operation("train", kind="model_call", model=base, seed=cfg.seed,
                           params={"lora_run_id": run_id, "resume": resuming, "dataset_version": ds.version}):
            kw = {"family": family, "cfg": cfg, "ds": ds, "base": base, "run_id": run_id, "run_dir": run_dir,
                  "trigger": trigger, "resume": resuming}
            losses = (dp.launch(project, placed, progress, **kw) if cfg.gpus  # N worker processes train
                      else _run(project, device=device, progress=progress, **kw))
    except BaseException:
        with cat.transaction():
            cat.execute("UPDATE lora_runs SET status = 'failed' WHERE id = ?", (run_id,))
            cat.execute("UPDATE operations SET status = 'failed' WHERE id = "
                        "(SELECT operation_id FROM lora_runs WHERE id = ?)", (run_id,))
        raise
    finally:
        # The pipeline, the LoRA'd transformer and the optimizer sit in reference cycles (diffusers hooks,
        # peft): without a collection they hold the GPU into the next stage (benchmarks/loop.py measured 22 GiB
        # still allocated when evaluate began, and the 24 GiB profile ran out of memory in generate).
        free_accelerator_memory()
    with cat.transaction():
        cat.execute("UPDATE lora_runs SET status = 'ok', finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') "
                    "WHERE id = ?", (run_id,))
        op = cat.query("SELECT operation_id FROM lora_runs WHERE id = ?", (run_id,))[0]["operation_id"]
        cat.execute("UPDATE operations SET status = 'ok' WHERE id = ?", (op,))
    return TrainResult(run_id, run_dir, run_dir / lora_io.LORA_FILE, run_dir / lora_io.KOHYA_FILE, ds.version, losses)


def base_model_folder(cfg: TrainConfig, models_base: str) -> str:
    """The base as a loadable folder or hub id: [train] base_model, else [models] base (a preset, e.g.
    'flux-dev', 'flux2-klein-base-4b' or 'tiny', a folder, or a hub id). Recorded on the run, so generate and
    resume use it."""
    from flywheel.models import resolve

    return str(resolve(cfg.base_model or models_base, role="text_to_image").folder)


def _run(project, family, cfg: TrainConfig, ds, base: str, run_id: int, run_dir: Path, trigger: str, device,
         progress, *, resume: bool, ranks: dp.Ranks | None = None) -> list[float]:
    import torch
    from peft import LoraConfig

    from flywheel.models.pool import recorded_load
    from flywheel.training import step_profile

    ranks = ranks or dp.Ranks()  # this process alone, or one rank of --gpus N (training/distributed.py)
    progress = step_profile.wrap(progress, ranks.rank)  # benchmarks/train_gpus.py --profile: a few steps profiled
    # 2. Load the base pipeline through the shared loader ([models] base role: device, dtype; the memory
    #    check counts the transformer at the precision it trains in). It stays on the CPU: the trainer moves
    #    one part at a time to the GPU. Everything but the LoRA stays frozen.
    load = base_load(project, cfg, device)
    device = load.device
    if device.startswith("cuda"):  # cuDNN attention's backward hit illegal memory accesses (torch 2.11, H100)
        torch.backends.cuda.enable_cudnn_sdp(False)
    with recorded_load(project.catalog if ranks.main else None, "train", base,  # ranks > 0: no row
                       {"role": "base", **vars(load)}) as record:
        pipe, source, dtype = family.load(base, load)
        record(str(source), {"quantization": load.quantize, "dtype": str(dtype), "device": device,
                             "family": family.name})
    encoders = family.text_encoders(pipe)
    for m in (pipe.vae, *encoders, pipe.transformer):
        m.requires_grad_(False)
    model_key = hashlib.sha256(str(source).encode()).hexdigest()[:16]

    # 3. Buckets and caches; afterwards the VAE and text encoders leave the GPU.
    by_id = {m.image_id: m for m in ds.members}
    groups = bk.group_by_bucket({m.image_id: (m.width, m.height) for m in ds.members},
                                bk.make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect))
    bucket_of = {i: b for b, ids in groups.items() for i in ids}
    cache_dir = project.workspace / "cache"
    captions = {i: (by_id[i].caption or trigger) for i in by_id}
    sample_prompts = [p.replace("{trigger}", trigger) for p in cfg.sample_prompts]
    with ranks.main_first():  # rank 0 encodes; the other ranks then read its cache files
        pipe.vae.to(device)
        latents = caching.cache_latents(family, pipe.vae,
                                        [(by_id[i].sha256, by_id[i].path, bucket_of[i]) for i in by_id],
                                        cache_dir, model_key=model_key, device=device)
        for m in encoders:
            m.to(device)
        text = caching.cache_text(family, pipe, [*captions.values(), "", *sample_prompts], cache_dir,
                                  model_key=model_key, max_sequence_length=cfg.max_sequence_length)
    caching.release(pipe.vae, *encoders)

    # 4. LoRA on the frozen base (quantized block by block on its way to the GPU: int8 / nf4 before the
    #    LoRA, so peft wraps the quantized layers; fp8 after it), optimizer, schedule, generator; restore
    #    them all from the last checkpoint when resuming.
    transformer = pipe.transformer
    if load.quantize in quantize.BEFORE_LORA:
        quantize.quantize_base(transformer, load.quantize, device)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():  # peft: torchao layers cannot merge without their config; we never merge
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                           target_modules=cfg.target_modules))
    if load.quantize == "fp8":
        quantize.quantize_base(transformer, "fp8", device)
    # fp8 matmuls, attention kernel, checkpointing, per-block compile ([train], training/speed.py)
    apply_speed_options(transformer, cfg, device, base_quantize=load.quantize)
    transformer.to(device)
    named = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    for p in named.values():
        p.data = p.data.float()  # LoRA weights and optimizer state in fp32, the frozen base in bf16
    transformer.train()
    optimizer = setup.optimizer(cfg, list(named.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, setup.lr_factor(cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    step, data, losses = 0, _new_epoch(groups, cfg, 0), []
    last = checkpoint.list_checkpoints(run_dir)
    if resume and last:
        state = checkpoint.load_checkpoint(last[-1], params=named, optimizer=optimizer, lr_scheduler=scheduler,
                                           generator=generator)
        step, data, losses = state["step"], state["data"], state["losses"]
        log.info("resuming run %d at step %d from %s", run_id, step, last[-1].name)
    ranks.start(named, cfg)

    # 5. The loop: one bucket batch per step.
    def batch_for(ids: list[int]) -> Batch:
        drop = torch.rand(len(ids), generator=generator) < cfg.caption_dropout
        return family.batch([latents[by_id[i].sha256] for i in ids],
                            [text["" if d else captions[i]] for i, d in zip(ids, drop.tolist())], device, dtype)

    # A step's loss is read once the next step is queued (``LateLoss``: waits for that step only), so the GPU
    # never idles while the CPU prepares a step; before a checkpoint, samples or the end, it is read at once.
    step_times: list[float] = []
    pending, t_recorded = None, time.perf_counter()

    def record(entry) -> None:
        nonlocal t_recorded
        done, late, step_lr, epoch = entry
        losses.append({"step": done, "loss": late.value(), "lr": step_lr, "epoch": epoch})
        now = time.perf_counter()
        step_times.append(now - t_recorded)
        t_recorded = now
        if not math.isfinite(losses[-1]["loss"]):
            raise StageError(f"run {run_id} stopped: the loss became {losses[-1]['loss']} at step {done} of {cfg.steps} "
                             f"(learning_rate {cfg.learning_rate:g})",
                             hint="lower learning_rate (or max_grad_norm) in [train] of flywheel.toml, then "
                             "`flywheel train --resume` or `flywheel run`: changed settings start a new run")

    while step < cfg.steps:
        micro = []  # the global batches of one optimizer step (gradient_accumulation of them)
        for _ in range(cfg.gradient_accumulation):
            if data["position"] >= len(data["order"]):
                data = _new_epoch(groups, cfg, data["epoch"] + 1)
            micro.append(data["order"][data["position"]])
            data["position"] += 1
        lr = scheduler.get_last_lr()[0]
        opts = {"params": list(named.values()), "guidance": cfg.guidance, "sampling": cfg.timestep_sampling,
                "max_grad_norm": cfg.max_grad_norm, "lr_scheduler": scheduler}
        loss = (ranks.step(family, transformer, optimizer, micro, batch_for, generator, **opts)  # ranks, accumulation
                if ranks.group or len(micro) > 1 else
                train_step(family, transformer, optimizer, batch_for(micro[0]), generator, **opts))
        step += 1
        entry = (step, LateLoss(loss), lr, data["epoch"])
        if pending is not None:
            record(pending)
            progress(pending[0], cfg.steps, f"loss {losses[-1]['loss']:.4f}")
        pending = entry
        save = ranks.main and step % cfg.checkpoint_every == 0 and step < cfg.steps
        render = ranks.main and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps
        if not (save or render or step == cfg.steps):
            continue
        record(pending)  # the LoRA and the optimizer are saved as of this step: nothing is queued after it
        pending = None
        if save:
            ck = checkpoint.save_checkpoint(run_dir, step, lora={n: p for n, p in named.items()}, optimizer=optimizer,
                                            lr_scheduler=scheduler, generator=generator, data=data, losses=losses,
                                            keep=cfg.keep_checkpoints)
            samples.record(project, "checkpoint", ck, run_id, step, hash_file=False)
        if render:
            samples.render(project, family, pipe, transformer, cfg, text, sample_prompts, run_id, run_dir, step,
                           device)
        progress(step, cfg.steps, f"loss {losses[-1]['loss']:.4f}")

    # 6. Outputs: LoRA (diffusers keys, and the family's kohya / ComfyUI keys), resolved config (with the model
    #    that renders the LoRA in generate), loss curve, final samples.
    if not ranks.main:  # rank 0 writes the outputs
        return [r["loss"] for r in losses]
    transformer.eval()
    samples.render(project, family, pipe, transformer, cfg, text, sample_prompts, run_id, run_dir, step, device)
    state = lora_io.lora_state_dict(transformer, alpha=cfg.alpha, rank=cfg.rank)
    samples.record(project, "lora", lora_io.save_diffusers(state, run_dir), run_id, step)
    for kind, path in family.export(state, run_dir, transformer):
        samples.record(project, kind, path, run_id, step)
    resolved = {"train": cfg.model_dump(), "base_model_path": str(source), "dataset_version": ds.version,
                "family": family.name, "generate_model": _generate_model(project, cfg, family, base),
                "trigger": trigger, "lora_run_id": run_id, "device": device, "dtype": str(dtype),
                "quantize_base": load.quantize, "batch": dp.describe(cfg),
                # This process's steps (a resumed run counts only its own): wall time per step, samples excluded.
                "timing": _timing(step_times)}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2), encoding="utf-8")
    samples.record(project, "config", run_dir / "config.json", run_id, step)
    samples.record(project, "loss_csv", losses_io.save_csv(losses, run_dir / "loss.csv"), run_id, step)
    png = losses_io.plot(losses, run_dir / "loss.png", title=f"LoRA run {run_id} (dataset v{ds.version})")
    if png is not None:
        samples.record(project, "loss_curve", png, run_id, step)
    return [r["loss"] for r in losses]


def _timing(step_times: list[float]) -> dict:
    """Wall time of this process's steps: the mean (compiles included) and the median, the steady-state rate
    a longer run settles at (the first steps of each new bucket shape compile the blocks: tens of seconds)."""
    n, total = len(step_times), sum(step_times)
    median = statistics.median(step_times) if step_times else 0.0
    return {"steps": n, "seconds": round(total, 3), "seconds_per_step": round(total / max(1, n), 4),
            "median_seconds_per_step": round(median, 4), "warmup_seconds": round(max(0.0, total - n * median), 3)}


def _generate_model(project, cfg: TrainConfig, family, base: str) -> str | None:
    """The model generate / evaluate render this run's LoRA on, when not the base itself: the family's choice
    for the configured base spec (klein base -> the distilled klein), if that spec is the run's base."""
    spec = cfg.base_model or project.config.models.base
    if base_model_folder(cfg, project.config.models.base) != base:
        return None
    return family.generate_model(spec)


def _new_epoch(groups: dict, cfg: TrainConfig, epoch: int) -> dict:
    """Batches of one bucket each, shuffled with a seed of (run seed, epoch): the checkpointed data order."""
    rng = random.Random(f"{cfg.seed}:{epoch}")
    batches = []
    for _, ids in sorted(groups.items(), key=lambda kv: (kv[0].width, kv[0].height)):
        items = sorted(ids) * cfg.repeats
        rng.shuffle(items)
        size = dp.micro_batch(cfg)  # gpus x batch_size: every rank walks the same global batches
        batches += [items[i:i + size] for i in range(0, len(items), size)]
    rng.shuffle(batches)
    return {"epoch": epoch, "order": batches, "position": 0}


def _next_round(cat) -> int:
    return int(cat.query("SELECT COALESCE(MAX(round), 0) + 1 AS r FROM lora_runs WHERE status = 'ok'")[0]["r"])
