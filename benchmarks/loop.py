"""The whole loop at full size, through the CLI a user runs: per-stage time, GPU peak and model loads.

Builds random-weight copies of the default presets' hub repos (``benchmarks/fullsize.py``: same on-disk
layout, full size) into a Hugging Face cache, sets ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE=1``, and runs
``flywheel init`` / ``ingest`` / ``enrich`` / ``run`` as subprocesses on the 5 sample sources, to dataset v2,
LoRA v2 and the evaluation report. Then it reads the project's catalog: one row per loop step (wall time,
GPU peak), one per model load, per-unit times; prints the table and extrapolates a default run (25 edits,
2 x 1000 training steps at 1024², 100 generations, the shipped evaluation set).

Reduced work, stated in the output: ``--train-steps`` per round (default 20), ``--generate`` prompts x 2
seeds, ``--eval-prompts`` x 1 seed, training samples at 8 steps. Stage times are measured, not scaled.

Phases (the GPU machine has 64 GB of disk and 10 minutes per command; the repos do not all fit at once):
  ``edit``  (flux1 stack) build Qwen-Image-Edit-2511 + the Lightning LoRA; 25 edits with its fast preset, then
            ``--stock-edits`` edits with the stock preset (40 steps, true CFG 4) in the same process run;
            removes the editor repo afterwards (``--keep`` to keep it)
  ``rest``  (flux1 stack) build FLUX.1-dev + Qwen2-VL-2B; ``flywheel run`` the same project to the report
  ``klein`` the FLUX.2 klein stack (``--klein-stack``, a new project's ``[models] stack``): its edits,
            ``--stock-edits`` stock edits and ``flywheel run`` in one project, the process capped at
            ``--cap-gib`` (0: uncapped, the unconstrained profile)
  ``24gb``  the same on configs/examples/gpu-24gb.toml (the klein4b stack), the process capped at 24 GiB
            (``torch.cuda.set_per_process_memory_fraction``)
  ``24gb-flux1``  link FLUX.1 Kontext to FLUX.1-dev's files; a project on configs/examples/gpu-24gb-flux1.toml
            (fp8 + CPU offload), capped likewise; ``flywheel run``
  ``all``   edit, rest, 24gb-flux1 in turn (the flux1 stack)

    python benchmarks/loop.py --phase klein --cap-gib 0 && python benchmarks/loop.py --phase 24gb  # klein4b
    python benchmarks/loop.py --phase edit && python benchmarks/loop.py --phase rest   # flux1, two commands
    python benchmarks/loop.py --tiny --device cpu                                     # CI-sized dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fullsize

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["forest", "sunset", "oil_painting", "left_view", "city_night"]  # 5 x 5 sources = 25 edits
# What the default run does, for the extrapolation: 5 sources x 5 recipes; 2 x 1000 steps; 50 prompts x 2.
# The example configs of the capped profiles (configs/examples/).
EXAMPLES = {"24gb": "gpu-24gb.toml", "24gb-flux1": "gpu-24gb-flux1.toml"}
DEFAULT_RUN = {"edits": 25, "train_steps": 1000, "rounds": 2, "generations": 100}
# The CLI, in a process that may cap its own GPU memory first (the 24 GiB profile).
LAUNCH = ("import os, sys\n"
          "f = float(os.environ.get('FLYWHEEL_BENCH_GPU_FRACTION') or 0)\n"
          "if f:\n"
          "    import torch; torch.cuda.set_per_process_memory_fraction(f)\n"
          "from flywheel.cli import main\n"
          "main(sys.argv[1:], prog_name='flywheel')\n")


def cli(project: Path | None, *args: str, env: dict[str, str], log_file: Path) -> float:
    cmd = [sys.executable, "-c", LAUNCH, *(["-C", str(project)] if project else []), *args]
    t0 = time.perf_counter()
    with open(log_file, "a") as out:
        out.write(f"\n$ flywheel {' '.join(cmd[3:])}\n")
        out.flush()
        proc = subprocess.run(cmd, check=False, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = log_file.read_text().splitlines()[-25:]
        raise SystemExit(f"flywheel {' '.join(args)} failed ({proc.returncode}) after {seconds:.0f} s:\n" + "\n".join(tail))
    return seconds


def config(profile: str, args) -> str:
    """The project's flywheel.toml: a new project on the klein stack ("klein"), the flux1 stack ("default": the
    edit and rest phases) or an example file (``EXAMPLES``), with the reduced work and the benchmark's own paths."""
    if profile in EXAMPLES:
        text = (ROOT / "configs/examples" / EXAMPLES[profile]).read_text()
        head, _, tail = text.partition("[enrich]")
        text = head + "[enrich]\n" + _drop_keys(tail.split("\n[", 1)[0], {"recipes", "seeds", "references"}) + (
            "\n[" + tail.split("\n[", 1)[1] if "\n[" in tail else "")
        text = _drop_sections(text, ("train", "generate", "evaluate", "loop"))
    elif profile == "klein":
        text = f'[project]\nname = "Benchmark"\ntrigger = "fw_bench"\n[models]\nstack = "{args.klein_stack}"\n'
    else:  # the edit / rest phases: the flux1 stack (the default before klein4b)
        text = '[project]\nname = "Benchmark"\ntrigger = "fw_bench"\n[models]\nstack = "flux1"\n'
    device = f'\ndevice = "{args.device}"' if args.device != "auto" else ""
    tiny = args.tiny
    recipes = RECIPES[:args.recipes_24gb if profile == "24gb-flux1" else args.recipes]
    text += """
[loop]
rounds = 2
sources = ["sources"]
review = "auto"
"""
    text = text.replace("[models]", "[models]" + device, 1) if "[models]" in text else text + f"\n[models]{device}\n"
    text = _put(text, "enrich", f"recipes = {json.dumps(recipes)}")
    if tiny:
        text = _put(text, "enrich", "max_area = 4096\nreferences = 1")
        text = _put(_put(text, "caption", "max_new_tokens = 8"), "judge", "max_new_tokens = 16")
    size = 64 if tiny else 1024
    text += f"""
[train]
steps = {args.train_steps}
resolution = {size}
checkpoint_every = 100000
sample_every = 0
sample_steps = {2 if tiny else 8}
sample_size = {size}
{'max_sequence_length = 32' if tiny else ''}
[generate]
prompts = {args.generate}
seeds_per_prompt = 2
width = {size}
height = {size}
{'steps = 2' if tiny else ''}
{'max_sequence_length = 32' if tiny else ''}
[evaluate]
prompts = {json.dumps([f"a photo of {{trigger}} {p}" for p in ["in a library", "on a beach at noon", "in the rain",
                                                                "skiing", "at a desk"][:args.eval_prompts]])}
seeds_per_prompt = 1
"""
    return text


def _put(text: str, section: str, line: str) -> str:
    """``line`` at the top of ``[section]``, which is added at the end when the text has none."""
    head = f"\n[{section}]\n"
    return text.replace(head, head + line + "\n", 1) if head in text else text + head + line + "\n"


def _drop_keys(section: str, keys: set[str]) -> str:
    return "\n".join(line for line in section.splitlines() if line.split("=")[0].strip() not in keys)


def _drop_sections(text: str, names: tuple[str, ...]) -> str:
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skip = line.strip("[] ").split(".")[0] in names
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


def make_project(root: Path, profile: str, args, env, log_file) -> Path:
    from flywheel.sample import write_sample

    project = root / f"project-{profile}"
    if (project / "flywheel.toml").exists():
        return project
    cli(None, "init", str(project), "--name", "Benchmark", "--trigger", "fw_bench", env=env, log_file=log_file)
    (project / "flywheel.toml").write_text(config(profile, args))
    for extra in write_sample(project / "sources")[args.sources:]:
        extra.unlink()
    if not args.tiny:
        _upscale_sources(project / "sources")
    return project


def _upscale_sources(folder: Path, area: int = 1024 * 1024) -> None:
    """The sample sources are 384-512 px; a user's photos are ~1 MP or more. At their own size every source is
    a training bucket of its own, and each new shape recompiles the trainer's blocks, a cost a user's 1 MP
    sources do not have: the benchmark trains at one bucket like they do."""
    from PIL import Image

    for path in sorted(folder.iterdir()):
        with Image.open(path) as im:
            scale = (area / (im.width * im.height)) ** 0.5
            if scale > 1:
                im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)),
                                         Image.Resampling.LANCZOS).save(path, quality=95)


def enrich_phase(root: Path, cache: Path, args, env, log_file) -> dict:
    out: dict = {}
    if not fullsize.has_repo(cache, fullsize.QWEN_EDIT):
        out["build_s"] = fullsize.build_qwen_image_edit(cache, tiny=args.tiny, device=args.build_device)
    project = make_project(root, "default", args, env, log_file)
    cli(project, "ingest", str(project / "sources"), env=env, log_file=log_file)
    out["fast_cli_s"] = cli(project, "enrich", env=env, log_file=log_file)
    out["fast"] = unit_times(project, "enrich")
    if args.stock_edits:
        out.update(stock_edits(root / "project-stock", "default", "qwen-image-edit-2511", args, env, log_file))
    if not args.keep:
        fullsize.remove_repo(cache, fullsize.QWEN_EDIT)
        fullsize.remove_repo(cache, fullsize.LIGHTNING)
    return out


def stock_edits(stock: Path, profile: str, editor: str, args, env, log_file) -> dict:
    """The stock preset's edits in a small project of their own (``--stock-edits`` sources x 1 recipe)."""
    if not (stock / "flywheel.toml").exists():
        cli(None, "init", str(stock), "--name", "Stock", "--trigger", "fw_bench", env=env, log_file=log_file)
        text = config(profile, args).replace(f"recipes = {json.dumps(RECIPES[:args.recipes])}",
                                             f"recipes = {json.dumps(RECIPES[:1])}")
        text = text.replace("[models]", f'[models]\neditor = "{editor}"', 1)
        (stock / "flywheel.toml").write_text(text)
        from flywheel.sample import write_sample

        for extra in write_sample(stock / "sources")[args.stock_edits:]:
            extra.unlink()
    cli(stock, "ingest", str(stock / "sources"), env=env, log_file=log_file)
    return {"stock_cli_s": cli(stock, "enrich", env=env, log_file=log_file), "stock": unit_times(stock, "enrich")}


def run_results(project: Path, env, log_file) -> dict:
    """`flywheel run` on ``project``, and what the catalog says of it afterwards."""
    return {"cli_s": cli(project, "run", env=env, log_file=log_file), "steps": loop_steps(project),
            "units": {stage: unit_times(project, stage) for stage in ("enrich", "caption", "judge", "generate", "evaluate")},
            "train": train_timing(project),
            "report": [str(p) for p in (project / ".flywheel" / "reports").rglob("index.html")]}


def run_phase(root: Path, cache: Path, profile: str, args, env, log_file) -> dict:
    out: dict = {"build_s": 0.0}
    if not fullsize.has_repo(cache, fullsize.FLUX_DEV):
        out["build_s"] += fullsize.build_flux_dev(cache, tiny=args.tiny, device=args.build_device)
    if not fullsize.has_repo(cache, fullsize.QWEN2_VL_2B):
        out["build_s"] += fullsize.build_qwen2_vl(cache, tiny=args.tiny, device=args.build_device)
    if profile == "24gb-flux1":
        fullsize.link_flux_kontext(cache)
        env = {**env, "FLYWHEEL_BENCH_GPU_FRACTION": str(args.cap_gib * 1024**3 / _gpu_total())}
    project = make_project(root, profile, args, env, log_file)
    return {**out, **run_results(project, env, log_file)}


def klein_phase(root: Path, cache: Path, profile: str, args, env, log_file) -> tuple[dict, dict]:
    """The FLUX.2 klein stack end to end in one project: its fast edits (distilled klein-4B), the stock edits
    (klein-base-4B, 50 steps with CFG), then `flywheel run` (klein-base-4B LoRAs, distilled klein renders).
    ``profile``: "klein" (a new project on ``--klein-stack``) or "24gb" (configs/examples/gpu-24gb.toml). The
    process is capped at --cap-gib (24 by default; 0: uncapped): this stack is the one meant to fit 24 GB."""
    edit: dict = {"build_s": 0.0}
    if not fullsize.has_repo(cache, fullsize.KLEIN_4B):
        edit["build_s"] += fullsize.build_flux2_klein(cache, tiny=args.tiny, device=args.build_device)
    import tomllib

    from flywheel.models.stacks import STACKS

    stack = tomllib.loads(config(profile, args))["models"].get("stack", args.klein_stack)

    vlm = fullsize.preset_builders()[STACKS[stack].captioner]
    if not fullsize.has_repo(cache, vlm[0]):
        edit["build_s"] += vlm[1](cache, tiny=args.tiny, device=args.build_device)
    if args.cap_gib and not args.tiny:
        env = {**env, "FLYWHEEL_BENCH_GPU_FRACTION": str(args.cap_gib * 1024**3 / _gpu_total())}
    project = make_project(root, profile, args, env, log_file)
    cli(project, "ingest", str(project / "sources"), env=env, log_file=log_file)
    edit["fast_cli_s"] = cli(project, "enrich", env=env, log_file=log_file)
    edit["fast"] = unit_times(project, "enrich")
    if args.stock_edits:
        edit.update(stock_edits(root / f"project-{profile}-stock", profile, "flux2-klein-base-4b-edit", args, env, log_file))
    return edit, {"build_s": 0.0, **run_results(project, env, log_file)}


def _gpu_total() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 24 * 1024**3


# -- reading the catalog -----------------------------------------------------------------------------------
def _catalog(project: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(project / ".flywheel" / "catalog.sqlite")
    conn.row_factory = sqlite3.Row
    return conn


def loop_steps(project: Path) -> list[dict]:
    """Each `flywheel run` step: seconds, GPU peak, and the model loads (label, seconds) made inside it."""
    conn = _catalog(project)
    steps = [dict(r) for r in conn.execute("SELECT id, params_json, duration_ms, status, started_at FROM operations "
                                           "WHERE stage = 'run' AND kind = 'stage_run' ORDER BY id")]
    loads = [dict(r) for r in conn.execute("SELECT id, model, params_json FROM operations WHERE kind = 'model_call' "
                                           "AND json_extract(params_json, '$.action') = 'load' ORDER BY id")]
    out = []
    for i, s in enumerate(steps):
        end = steps[i + 1]["id"] if i + 1 < len(steps) else 1 << 62
        p = json.loads(s["params_json"])
        inside = [(l["model"], json.loads(l["params_json"]).get("seconds")) for l in loads if s["id"] < l["id"] < end]
        if s["duration_ms"] is None:  # killed inside this step: until the last operation it started
            last = conn.execute("SELECT (julianday(MAX(started_at)) - julianday(?)) * 86400000 FROM operations "
                                "WHERE id > ? AND id < ?", (s["started_at"], s["id"], end)).fetchone()[0]
            s["duration_ms"] = last or 0
        out.append({"step": p["step"], "seconds": (s["duration_ms"] or 0) / 1000, "gpu_peak_gib": p.get("gpu_peak_gib"),
                    "loads": inside, "status": s["status"]})
    return merge_invocations(out)


def merge_invocations(steps: list[dict]) -> list[dict]:
    """One row per loop step when `flywheel run` ran more than once on the project: a GPU command's time limit
    killed it and the same command resumed it. Every invocation walks the same plan from its first step
    (``ingest``), finished steps taking ~0 s, so the i-th step of each invocation is the same step: their
    seconds and loads add up, the GPU peak is the highest, the status the last one's."""
    runs: list[list[dict]] = []
    for step in steps:
        if step["step"] == "ingest" or not runs:
            runs.append([])
        runs[-1].append(step)
    merged = [dict(s, loads=list(s["loads"])) for s in runs[0]] if runs else []
    for run in runs[1:]:
        for i, step in enumerate(run):
            if i >= len(merged):
                merged.append(dict(step, loads=list(step["loads"])))
                continue
            row = merged[i]
            peaks = [p for p in (row["gpu_peak_gib"], step["gpu_peak_gib"]) if p is not None]
            row.update(seconds=row["seconds"] + step["seconds"], gpu_peak_gib=max(peaks) if peaks else None,
                       loads=row["loads"] + step["loads"], status=step["status"])
    return merged


def unit_times(project: Path, stage: str) -> dict:
    """Per-unit model calls of a stage (edits, renders, VLM batches): count and mean seconds."""
    conn = _catalog(project)
    rows = [r[0] / 1000 for r in conn.execute(
        "SELECT duration_ms FROM operations WHERE stage = ? AND kind = 'model_call' AND status = 'ok' "
        "AND json_extract(params_json, '$.action') IS NULL AND duration_ms IS NOT NULL ORDER BY id", (stage,))]
    if not rows:
        return {"n": 0}
    rest = rows[1:] or rows
    return {"n": len(rows), "first_s": rows[0], "mean_s": sum(rest) / len(rest), "total_s": sum(rows)}


def train_timing(project: Path) -> list[dict]:
    conn = _catalog(project)
    out = []
    for r in conn.execute("SELECT round, output_dir FROM lora_runs WHERE status = 'ok' ORDER BY id"):
        cfg = json.loads((project / ".flywheel" / r["output_dir"] / "config.json").read_text())
        out.append({"round": r["round"], **cfg.get("timing", {}), "quantize_base": cfg.get("quantize_base")})
    return out


# -- printing --------------------------------------------------------------------------------------------
def report(name: str, gpu: str, edit: dict | None, run: dict | None, args) -> None:
    print(f"\n== {name} on {gpu} ==")
    if edit:
        fast = edit["fast"]
        print(f"edits, default (fast) preset: {fast['n']} edits, {fast['mean_s']:.2f} s/edit after the first "
              f"({fast['first_s']:.2f} s first); all {fast['n']}: {fast['total_s']:.1f} s of editing, "
              f"`flywheel enrich` {edit['fast_cli_s']:.1f} s end to end (loading included)")
        if "stock" in edit and edit["stock"]["n"]:
            stock = edit["stock"]
            print(f"edits, stock preset: {stock['n']} edit(s), {stock['mean_s']:.2f} s/edit; "
                  f"fast is {stock['mean_s'] / fast['mean_s']:.1f}x faster; 25 stock edits ~{25 * stock['mean_s'] / 60:.1f} min")
        print(f"goal 25 edits < 60 s: {'met' if 25 * fast['mean_s'] < 60 else 'missed'} "
              f"({25 * fast['mean_s']:.0f} s of editing for 25)")
    if run:
        print(f"{'step':<28}{'seconds':>9}{'GPU peak GiB':>14}  loads (seconds)")
        for s in run["steps"]:
            loads = ", ".join(f"{_label(m)} ({sec:.0f} s)" if sec is not None else _label(m) for m, sec in s["loads"])
            peak = "-" if s["gpu_peak_gib"] is None else f"{s['gpu_peak_gib']:.1f}"
            print(f"{s['step']:<28}{s['seconds']:>9.1f}{peak:>14}  {len(s['loads'])}: {loads}")
        print(f"`flywheel run` end to end: {run['cli_s']:.1f} s")
        for t in run["train"]:
            print(f"train round {t['round']}: {t.get('steps')} steps, {t.get('seconds_per_step', 0):.3f} s/step on "
                  f"average, {t.get('median_seconds_per_step', 0):.3f} s median (compiling: "
                  f"{t.get('warmup_seconds', 0):.0f} s; base {t.get('quantize_base')})")
        print("reduced work: " + f"{args.train_steps} training steps per round, {args.generate * 2} generations, "
              f"{args.eval_prompts} evaluation prompts x 1 seed per round, training samples at 8 steps")
        print(extrapolate(run, edit))


def _label(model: str) -> str:
    """A hub cache snapshot folder as its repo id (``.../models--Owner--Name/snapshots/rev`` -> ``Owner/Name``)."""
    parts = Path(model).parts
    repo = next((p for p in parts if p.startswith("models--")), None)
    return repo.removeprefix("models--").replace("--", "/") if repo else model


def extrapolate(run: dict, edit: dict | None) -> str:
    """A default run from the measured parts: each step's fixed part (loading, caching, samples) as measured,
    its per-unit work scaled to the default counts (edits, training steps, generations and the images they
    bring to caption and judge, evaluation renders)."""
    units = run["units"]
    n_gen = max(1, units["generate"].get("n", 0))
    eval_default = 8 * 2 * 2  # the shipped evaluation set: 8 prompts x 2 seeds, both rounds
    parts: list[tuple[str, float]] = []
    edit_units = (edit or {}).get("fast") or units["enrich"]
    if edit_units.get("n"):
        loading = (edit or {}).get("fast_cli_s", 0) - edit_units.get("total_s", 0)
        parts.append(("enrich", max(0.0, loading) + DEFAULT_RUN["edits"] * edit_units["mean_s"]))
    after_generate = False
    for s in run["steps"]:
        name, seconds = s["step"], s["seconds"]
        loading = sum(sec or 0 for _, sec in s["loads"])
        if name.startswith("train"):
            k = int(name.split()[-1]) - 1
            tr = run["train"][k] if k < len(run["train"]) else {}
            # Steady state: the median step (the first steps of each bucket shape compile, once per run).
            per_step = tr.get("median_seconds_per_step") or tr.get("seconds_per_step") or 0
            t = seconds + (DEFAULT_RUN["train_steps"] - (tr.get("steps") or 0)) * per_step
        elif name.startswith("generate"):
            g = units["generate"]
            t = seconds - g.get("total_s", 0) + DEFAULT_RUN["generations"] * g.get("mean_s", 0)
            after_generate = True
        elif name in ("caption", "judge") and after_generate:  # the synthetic images: scale with their number
            t = loading + (seconds - loading) * DEFAULT_RUN["generations"] / n_gen
        elif name == "evaluate":
            e = units["evaluate"]
            t = seconds + (eval_default - e.get("n", 0)) * e.get("mean_s", 0)
        elif name in ("enrich", "ingest") or name.startswith("waiting"):
            continue
        else:
            t = seconds
        parts.append((name, t))
    total = sum(t for _, t in parts)
    return (f"extrapolated default run (25 edits, 2 x {DEFAULT_RUN['train_steps']} steps at 1024², "
            f"{DEFAULT_RUN['generations']} generations, {eval_default} evaluation renders): {total / 60:.1f} min = "
            + " + ".join(f"{n} {t:.0f} s" for n, t in parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["edit", "rest", "klein", "24gb", "24gb-flux1", "all"], default="all")
    parser.add_argument("--klein-stack", default="klein4b", help="the [models] stack of the klein phase")
    parser.add_argument("--root", type=Path, default=ROOT / ".bench" / "loop", help="projects, logs, results")
    parser.add_argument("--cache", type=Path, default=None, help="the random-weight hub cache (default: ROOT/hub)")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures (a CPU dry run of the same path)")
    parser.add_argument("--device", default="auto", help="[models] device for the projects (cpu with --tiny)")
    parser.add_argument("--sources", type=int, default=5, help="sample sources to use (of 5)")
    parser.add_argument("--recipes", type=int, default=5)
    parser.add_argument("--recipes-24gb", type=int, default=1, help="recipes in the 24gb-flux1 profile (x 5 sources)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--generate", type=int, default=4, help="prompts for generation (x 2 seeds)")
    parser.add_argument("--eval-prompts", type=int, default=2)
    parser.add_argument("--stock-edits", type=int, default=1)
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--keep", action="store_true", help="keep the editor repo after the edit phase")
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    args.build_device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"
    root = args.root.resolve()
    cache = (args.cache or root / "hub").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    log_file = args.log or root / "cli.log"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "FLYWHEEL_CACHE": str(root / "flywheel-cache")}
    results = {}
    if args.phase in ("edit", "all"):
        results["edit"] = enrich_phase(root, cache, args, env, log_file)
        report("edit phase (default project)", gpu, results["edit"], None, args)
    if args.phase in ("rest", "all"):
        saved = root / "edit.json"
        edit = results.get("edit") or (json.loads(saved.read_text()) if saved.exists() else None)
        results["rest"] = run_phase(root, cache, "default", args, env, log_file)
        report("default profile (unconstrained)", gpu, edit, results["rest"], args)
    if args.phase in ("24gb-flux1", "all"):
        results["24gb-flux1"] = run_phase(root, cache, "24gb-flux1", args, env, log_file)
        report(f"24 GiB profile, FLUX.1 (configs/examples/{EXAMPLES['24gb-flux1']}, process capped at "
               f"{args.cap_gib:g} GiB)", gpu, None, results["24gb-flux1"], args)
    if args.phase in ("klein", "24gb"):
        profile = args.phase
        cap = f"process capped at {args.cap_gib:g} GiB" if args.cap_gib else "uncapped"
        name = (f"klein stack '{args.klein_stack}'" if profile == "klein" else
                f"24 GiB profile (configs/examples/{EXAMPLES['24gb']})") + f", {cap}"
        results[f"{profile}_edit"], results[profile] = klein_phase(root, cache, profile, args, env, log_file)
        report(name, gpu, results[f"{profile}_edit"], results[profile], args)
    if "edit" in results:
        (root / "edit.json").write_text(json.dumps(results["edit"]))
    (root / f"results-{args.phase}.json").write_text(json.dumps({"gpu": gpu, **results}, indent=2, default=str))


if __name__ == "__main__":
    main()
