"""Enrichment benchmark: 5 sources x 5 recipes through ``flywheel enrich`` with full-size editors.

The editors have random weights (speed and memory do not depend on the values) at full size, built in
bf16 directly on the GPU, and run through Flywheel's own adapters and the real ``enrich`` stage on a
project holding the 5 sample sources, so the time includes planning, the catalog, references and
storage, exactly as users run it:

- ``kontext``: FLUX.1 Kontext [dev] size: 11.9 B transformer, T5-XXL, CLIP-L, FLUX VAE
  (``FluxKontextEditor``; stock settings 28 steps, guidance 2.5, ~1 MP).
- ``qwen``: Qwen-Image-Edit-2511 size: 20.4 B transformer, Qwen2.5-VL-7B text encoder, Qwen-Image VAE,
  the Plus pipeline with 2 other sources as references (``QwenImageEditor``; stock 40 steps, true CFG 4.0).
  ``--steps 8 --true-cfg 1`` is what a few-step distilled ("Lightning") LoRA runs at.
- ``klein``: FLUX.2 [klein] 4B size: 3.88 B transformer (5 double + 20 single blocks), Qwen3-4B text encoder,
  FLUX.2 VAE, 2 other sources as references (``Flux2KleinEditor``; distilled 4 steps, no guidance).
  ``--steps 50`` (any count above 4) runs the undistilled base's stock settings: 50 steps with CFG 4.
- ``inpaint``: SDXL inpainting size (2.57 B UNet with 9 input channels, CLIP-L + OpenCLIP bigG, SDXL VAE;
  ``InpaintEditor``: stock 30 steps, CFG 8), the person mask (mediapipe, CPU) and the composite-back included.
- ``fill``: FLUX.1 Fill [dev] size (11.9 B transformer, 384 input channels; stock 50 steps, guidance 30), same mask.
- ``controlnet``: SDXL-Turbo + ControlNet-canny-SDXL size (2.57 B UNet + 1.25 B ControlNet; ``SDXLControlNetEditor``:
  img2img at strength 0.5 of 4 steps = 2 denoising steps, no CFG), OpenCV Canny included. Built by
  ``benchmarks/fullsize_routes.py`` (which also writes these repos in the HF cache layout).

Tokenizers, processors and scheduler come from the tiny folders (``flywheel.testing.tiny``): only the
sequence lengths matter for speed, and those follow the real settings (512 T5 tokens; image tokens).
Prints the GPU, seconds per edit (mean over edits after the first, and the first), the 25-edit total,
and the two bars: the seed's "5 images in under 10 minutes" and our "25 edits in under 2 minutes".
``--mode`` measures the editor call alone (``call``: the same requests, nothing stored), the ``enrich`` stage
with the CLI's progress bar (``stage``: planning, catalog rows, PNG files, hashes; wall clock per edit), or
both in one run (``both``: the difference is the stage's own overhead per edit). Variants of one backend
(``benchmarks/enrich_variants.py``: ``refs=``, ``ref_area=``, ``speed=``) share one built editor.

    python benchmarks/enrich.py --backend qwen --steps 8 --true-cfg 1
    python benchmarks/enrich.py --backend kontext
    python benchmarks/enrich.py --backend klein
    python benchmarks/enrich.py --backend inpaint,controlnet,klein,qwen:4:1   # the routes next to the editors
    python benchmarks/enrich.py --tiny --device cpu --sources 2 --recipes 2 --steps 2   # dry run on CPU
    # issue 11's klein edit at 1024²: references 0 / 2 / 2 at 512², compile and fp8 on and off, call vs stage
    python benchmarks/enrich.py --mode both --backend klein:4:refs=0,klein:4:refs=2,\
klein:4:refs=2:ref_area=262144,klein:4:refs=2:speed=compile,klein:4:refs=2:ref_area=262144:speed=compile,\
klein:4:refs=2:ref_area=262144:speed=compile-fp8
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
import time
from pathlib import Path

from enrich_variants import Variant, measure_calls, parse_variant, sync
from fullsize import FLUX_TRANSFORMER as FLUX_FULL
from fullsize import KLEIN_4B_TRANSFORMER, QWEN3_4B  # the real repos' configs, shared with the loop benchmark

RECIPES = ["forest", "sunset", "oil_painting", "left_view", "city_night"]  # the seed's four prompts + one


def speed_kwargs(pipe, device: str, args) -> dict:
    """``speed`` / ``speed_applied`` for the editor's constructor, applied to ``pipe`` as the loader does."""
    from flywheel.models.editor_speed import apply_speed

    return {"speed": args.speed, "speed_applied": apply_speed(pipe, args.speed, device="cuda" if device.startswith(
        "cuda") else device, label=f"benchmark {type(pipe).__name__}")}


def kontext_editor(device: str, tiny: bool, args):
    import torch
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flywheel.models.flux import KONTEXT_DEFAULTS, FluxKontextEditor
    from flywheel.testing.tiny.flux import build_tiny_flux

    folder = build_tiny_flux(Path(tempfile.gettempdir()) / "fw-bench-tiny-flux")
    dtype = torch.float32 if tiny else torch.bfloat16
    pipe = FluxKontextPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    if not tiny:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            pipe.transformer = FluxTransformer2DModel(**FLUX_FULL)
            pipe.text_encoder_2 = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dense_act_fn="gelu_new",
                is_gated_act=True))
            pipe.text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
            pipe.vae = AutoencoderKL(
                latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
        torch.set_default_dtype(torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    settings = {**KONTEXT_DEFAULTS, "num_inference_steps": args.steps or KONTEXT_DEFAULTS["num_inference_steps"]}
    if tiny:
        settings.update(auto_resize=False, max_sequence_length=32)
    return FluxKontextEditor(pipe, model_id="FLUX.1-Kontext-dev size, random weights" if not tiny else "tiny kontext",
                             device=device, dtype=dtype, cpu_offload=False, quantization="none", settings=settings,
                             **speed_kwargs(pipe, device, args))


def qwen_editor(device: str, tiny: bool, args):
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from flywheel.models.qwen_image_edit import DEFAULTS, QwenImageEditor
    from flywheel.testing.tiny.qwen_image import build_tiny_qwen_image_edit

    folder = Path(tempfile.gettempdir()) / "fw-bench-tiny-qie"
    if not (folder / "model_index.json").exists():
        build_tiny_qwen_image_edit(folder)
    dtype = torch.float32 if tiny else torch.bfloat16
    pipe = QwenImageEditPlusPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    if not tiny:
        tiny_cfg = pipe.text_encoder.config
        ids = {k: getattr(tiny_cfg, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                 "vision_end_token_id") if hasattr(tiny_cfg, k)}
        te_cfg = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31]), **ids)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            pipe.transformer = QwenImageTransformer2DModel()  # the defaults are the released 20 B config
            pipe.text_encoder = Qwen2_5_VLForConditionalGeneration(te_cfg)
            pipe.vae = AutoencoderKLQwenImage()
        torch.set_default_dtype(torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    settings = {**DEFAULTS, "num_inference_steps": args.steps or DEFAULTS["num_inference_steps"]}
    if args.true_cfg is not None:
        settings["true_cfg_scale"] = args.true_cfg
    if tiny:
        settings["max_area"] = 64 * 64
    return QwenImageEditor(pipe, model_id="Qwen-Image-Edit-2511 size, random weights" if not tiny else "tiny qie",
                           device=device, dtype=dtype, plus=True, cpu_offload=False, quantization="none",
                           settings=settings, **speed_kwargs(pipe, device, args))


def klein_editor(device: str, tiny: bool, args):
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flywheel.models.flux2_klein import DEFAULTS, Flux2KleinEditor
    from flywheel.testing.tiny.flux2_klein import build_tiny_flux2_klein

    folder = Path(tempfile.gettempdir()) / "fw-bench-tiny-klein"
    if not (folder / "model_index.json").exists():
        build_tiny_flux2_klein(folder)
    dtype = torch.float32 if tiny else torch.bfloat16
    pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    if not tiny:  # the FLUX.2-klein-4B config: 3.88 B transformer, Qwen3-4B (4.02 B) text encoder
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            pipe.transformer = Flux2Transformer2DModel(**KLEIN_4B_TRANSFORMER)
            pipe.text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
            pipe.vae = AutoencoderKLFlux2()
        torch.set_default_dtype(torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    settings = {**DEFAULTS, "num_inference_steps": args.steps or DEFAULTS["num_inference_steps"]}
    base = settings["num_inference_steps"] > 4  # more steps: the undistilled base's stock settings, CFG 4 included
    if base:
        pipe.register_to_config(is_distilled=False)
        settings["guidance_scale"] = 4.0
    if tiny:
        settings.update(max_area=64 * 64, max_sequence_length=32)
    return Flux2KleinEditor(pipe, model_id="FLUX.2-klein-4B size, random weights" if not tiny else "tiny klein",
                            device=device, dtype=dtype, kv_cache=False, distilled=not base, cpu_offload=False,
                            quantization="none", settings=settings, **speed_kwargs(pipe, device, args))


def inpaint_editor(device: str, tiny: bool, args, family: str = "sdxl_inpaint"):
    """SDXL inpainting (or FLUX.1 Fill) size, the mediapipe person mask and the composite-back on the CPU included."""
    from fullsize_routes import flux_fill_pipeline, sdxl_pipeline

    from flywheel.models.sdxl_inpaint import DEFAULTS, MASK_DEFAULTS, InpaintEditor

    fill = family == "flux_fill"
    pipe = flux_fill_pipeline(tiny=tiny, device=device) if fill else sdxl_pipeline("inpaint", tiny=tiny, device=device)
    settings = {**DEFAULTS[family], "num_inference_steps": args.steps or DEFAULTS[family]["num_inference_steps"]}
    if tiny:
        settings.update(max_area=64 * 64, **({"max_sequence_length": 32} if fill else {}))
    name = "FLUX.1-Fill-dev" if fill else "SDXL inpainting 0.1"
    return InpaintEditor(pipe, model_id=f"{name} size, random weights" if not tiny else f"tiny {family}",
                         family=family, device=device, dtype=pipe.dtype, cpu_offload=False, quantization="none",
                         settings=settings, mask=dict(MASK_DEFAULTS))


def controlnet_editor(device: str, tiny: bool, args):
    """SDXL-Turbo + ControlNet (canny) size: img2img at strength 0.5 (4 steps run 2), Canny on the CPU included."""
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline
    from fullsize_routes import sdxl_pipeline

    from flywheel.models.sdxl_controlnet import CONTROL_DEFAULTS, DEFAULTS, SDXLControlNetEditor

    base = sdxl_pipeline("controlnet", tiny=tiny, device=device)
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(base, dtype=base.dtype)  # from_pipe's default: fp32
    pipe.set_progress_bar_config(disable=True)
    settings = {**DEFAULTS, "num_inference_steps": args.steps or DEFAULTS["num_inference_steps"]}
    if tiny:
        settings["max_area"] = 64 * 64
    return SDXLControlNetEditor(pipe, model_id="SDXL-Turbo + ControlNet size, random weights" if not tiny else
                                "tiny sdxl controlnet", device=device, dtype=pipe.dtype, cpu_offload=False,
                                quantization="none", settings=settings, control=dict(CONTROL_DEFAULTS),
                                controlnet="diffusers/controlnet-canny-sdxl-1.0 size")


EDITORS = {"kontext": (kontext_editor, "flux-kontext"), "qwen": (qwen_editor, "qwen-image-edit"),
           "klein": (klein_editor, "flux2-klein"), "inpaint": (inpaint_editor, "inpaint-sdxl"),
           "fill": (lambda d, t, a: inpaint_editor(d, t, a, "flux_fill"), "inpaint-flux-fill"),
           "controlnet": (controlnet_editor, "sdxl-turbo-controlnet")}


def run(variant: Variant, editor, args) -> dict:
    """One variant on ``editor``: the editor call alone and / or the ``enrich`` stage, on a fresh project."""
    import torch

    from flywheel.config import EnrichConfig
    from flywheel.enrich import enrich
    from flywheel.ingest import ingest
    from flywheel.progress_display import rich_progress
    from flywheel.project import init_project, open_project
    from flywheel.sample import write_sample

    device, backend = args.device, variant.backend
    _, enrich_backend = EDITORS[backend]
    if "reference_area" in editor.settings or variant.ref_area:  # klein: reset for every variant
        editor.settings["reference_area"] = variant.ref_area
    refs = variant.refs if backend in ("qwen", "klein") else 0
    out: dict = {"variant": variant.entry, "backend": backend, "references": refs, "reference_area": variant.ref_area,
                 "speed": variant.speed, "speed_applied": getattr(editor, "speed_applied", "none")}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        init_project(root, name="Bench", trigger="fw_bench")
        sources = write_sample(root / "sources")[: args.sources]
        with open_project(root) as project:
            ingest(project, [str(p) for p in sources])
            if args.mode in ("call", "both"):
                out.update(measure_calls(editor, project, RECIPES[: args.recipes], refs, device))
            if args.mode in ("stage", "both"):
                cfg = EnrichConfig(backend=enrich_backend, recipes=RECIPES[: args.recipes], seeds=1, references=refs)
                sync(device)
                t0 = time.perf_counter()
                with rich_progress(f"enrich {variant.entry}") as progress:  # the CLI's display, as users see it
                    result = enrich(project, cfg, editor=editor, progress=progress)
                sync(device)
                wall = time.perf_counter() - t0
                ms = [r[0] for r in project.catalog.query(
                    "SELECT duration_ms FROM operations WHERE stage = 'enrich' AND work_key IS NOT NULL ORDER BY id")]
                edits = len(result.made) + result.identical
                after_first = ms[1:] or ms
                out.update({
                    "edits": edits, "failed": len(result.failed), "wall_s": round(wall, 1),
                    "s_per_edit": round(sum(after_first) / len(after_first) / 1000, 3),
                    "first_edit_s": round(ms[0] / 1000, 2) if ms else None,
                    # wall clock per edit after the first: the editor call plus everything the stage does
                    "stage_s_per_edit": round((wall - ms[0] / 1000) / max(edits - 1, 1), 3) if ms else None})
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda") else None
    out["settings"] = editor.params()
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="both",
                   help="both (qwen and kontext), one backend, or a comma list of NAME[:STEPS[:TRUE_CFG]][:key=value...] "
                        "run one after the other in this process, e.g. klein:4,klein:4:ref_area=262144:speed=compile,"
                        "qwen:4:1 (keys: refs, ref_area, speed; one table, one GPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models (a CPU dry run of the code path)")
    p.add_argument("--sources", type=int, default=5)
    p.add_argument("--recipes", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the backend's stock)")
    p.add_argument("--true-cfg", type=float, default=None, help="Qwen-Image-Edit true CFG (1 = off)")
    p.add_argument("--references", type=int, default=2, help="other sources given to Qwen-Image-Edit / klein per edit")
    p.add_argument("--speed", default="none", choices=["none", "compile", "compile-fp8", "auto"],
                   help="editor speed for variants without speed= (flywheel.models.editor_speed)")
    p.add_argument("--mode", default="stage", choices=["stage", "call", "both"],
                   help="the enrich stage (default), the editor call alone, or both (the stage's overhead)")
    p.add_argument("--max-area", type=int, default=None, help="output pixels (tiny default 64², full 1024²)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    gpu = "cpu"
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}  torch {torch.__version__}", flush=True)
    try:
        plan = [parse_variant(e, args) for e in (["qwen", "kontext"] if args.backend == "both"
                                                  else args.backend.split(","))]
    except ValueError as err:
        p.error(str(err))
    for v in plan:
        if v.backend not in EDITORS:
            p.error(f"unknown backend {v.backend!r} (choose from {', '.join(EDITORS)})")
        if v.ref_area and v.backend != "klein":
            p.error(f"{v.entry}: ref_area is klein's (Qwen-Image-Edit resizes references to ~1024² itself)")
    rows, editor, built = [], None, None
    for v in plan:
        if v.build_key != built:  # one editor in memory at a time
            editor = None
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            editor = EDITORS[v.backend][0](args.device, args.tiny, argparse.Namespace(**{
                **vars(args), "steps": v.steps, "true_cfg": v.true_cfg, "speed": v.speed}))
            if args.max_area:
                editor.settings["max_area"] = args.max_area
            built = v.build_key
            print(f"built {v.backend} in {time.perf_counter() - t0:.1f} s", flush=True)
        r = run(v, editor, args)
        rows.append(r)
        print(json.dumps(r), flush=True)
        per_edit = r.get("stage_s_per_edit") or r.get("call_s_per_edit")
        print(f"{v.entry}: call {r.get('call_s_per_edit')} s/edit, stage {r.get('stage_s_per_edit')} s/edit "
              f"(editor inside the stage {r.get('s_per_edit')}), first edit {r.get('first_edit_s') or r.get('call_first_s')}"
              f" s, peak {r['peak_gib']} GiB; 25 edits ~ {25 * per_edit:.0f} s; goal 1.0 s/edit "
              f"{'met' if per_edit <= 1.0 else 'missed'}", flush=True)
    print(f"\nGPU: {gpu}")
    print(f"{'variant':<58}{'call s':>8}{'stage s':>9}{'first':>7}{'peak GiB':>10}{'25 edits s':>12}")
    for r in rows:
        per_edit = r.get("stage_s_per_edit") or r.get("call_s_per_edit") or 0
        print(f"{r['variant']:<58}{r.get('call_s_per_edit') or 0:>8.3f}{r.get('stage_s_per_edit') or 0:>9.3f}"
              f"{r.get('first_edit_s') or r.get('call_first_s') or 0:>7.2f}{r['peak_gib'] or 0:>10.1f}"
              f"{25 * per_edit:>12.0f}")


if __name__ == "__main__":
    main()
