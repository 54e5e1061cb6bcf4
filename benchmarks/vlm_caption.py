"""Batched captioning vs a per-image loop, through Flywheel's Qwen-VL adapter, bf16 and 4-bit NF4.

Builds Qwen2-VL-2B at full size with random weights (speed and memory do not depend on the values; the
config is the real one, see docs/models.md), SAVES it as a safetensors folder, then loads that folder
with ``QwenVLModel.from_pretrained`` (once in bf16, once with BitsAndBytesConfig NF4), and times
``generate`` on 1024x1024 images with a fixed 128 new tokens (min = max, so random weights cannot stop
early). The per-image loop (batch_size=1) measured in the same run is the baseline for every ratio.

    PYTHONPATH=src python benchmarks/vlm_caption.py                # GPU: the real measurement
    PYTHONPATH=src python benchmarks/vlm_caption.py --tiny         # CPU dry run of the same code path
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import fullsize  # noqa: E402

# The released Qwen2-VL-2B config, shared with the loop benchmark's random-weight repo (fullsize.py).
FULL_TEXT, FULL_VISION = fullsize.QWEN2_VL_TEXT, fullsize.QWEN2_VL_VISION
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VL_MAX_PIXELS = 1280 * 28 * 28  # Qwen's recommended budget: a 1024² image becomes 980² = 1225 tokens


def build(folder: Path, tiny: bool, device: str) -> float:
    """Random-weight Qwen2-VL(-2B) + a processor with Qwen's special tokens and chat template, saved."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from flywheel.testing.tiny.tokenizers import QWEN2_VL_CHAT_TEMPLATE, qwen2_tokenizer

    t0 = time.perf_counter()
    tok = qwen2_tokenizer()  # a local BPE: the model's 151936-row embedding covers its ids
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                     "<|vision_start|>", "<|vision_end|>")}
    text = dict(TINY_TEXT if tiny else FULL_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    cfg = Qwen2VLConfig(text_config=text, vision_config=TINY_VISION if tiny else FULL_VISION,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        tie_word_embeddings=not tiny)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    limits = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=limits),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=limits),
        tokenizer=tok, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    # Measured on the device: the first ~30 s after writing 4.4 GB ran the (CPU-bound) decode loop up to
    # 1.7x slower, so flush the page cache before anything is timed.
    os.sync()
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"built + saved {n / 1e9:.3f} B parameters to {folder} in {time.perf_counter() - t0:.1f} s")
    return n


def timed(adapter, images, batch_size: int, new_tokens: int, device: str) -> tuple[float, float]:
    """(seconds, peak GiB) for captioning ``images`` with ``batch_size`` prompts per generate call."""
    import torch

    from flywheel.models.base import ChatRequest

    adapter.batch_size = batch_size
    adapter.generation = {"min_new_tokens": new_tokens}  # fixed work per image: random weights never stop early
    requests = [ChatRequest("Describe this image in one detailed paragraph.", [im]) for im in images]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = adapter.generate(requests, max_new_tokens=new_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    assert len(out) == len(images)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else float("nan")
    return time.perf_counter() - t0, peak


def raw_loop(adapter, images, new_tokens: int, device: str) -> tuple[float, float]:
    """The same per-image work with ``model.generate`` called directly: what the adapter itself costs."""
    import torch

    from flywheel.models.base import ChatRequest

    inputs = [adapter.encode([ChatRequest("Describe this image in one detailed paragraph.", [im])]) for im in images]
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for inp in inputs:
        with torch.inference_mode():
            adapter.model.generate(**inp, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=adapter.processor.tokenizer.pad_token_id)
    if device == "cuda":
        torch.cuda.synchronize()
    raw_s = time.perf_counter() - t0
    prep0 = time.perf_counter()
    adapter.encode([ChatRequest("Describe this image.", [im]) for im in images])
    return raw_s, time.perf_counter() - prep0


def main() -> None:
    import torch

    from flywheel.models.qwen_vl import QwenVLModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU: checks the script, measures nothing")
    ap.add_argument("--loop-images", type=int, default=3)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--quant", default="none,nf4,none", help="passes in order; a repeat shows order effects")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.size, args.new_tokens, args.batches, args.loop_images = 128, 8, "4", 2
    quants = [q for q in args.quant.split(",") if device == "cuda" or q == "none"]
    batches = [int(b) for b in args.batches.split(",")]
    print("device:", torch.cuda.get_device_name() if device == "cuda" else "cpu", "| torch", torch.__version__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2-vl-2b-random"
        build(folder, args.tiny, device)
        rng = torch.Generator().manual_seed(0)
        pool = [Image.fromarray(torch.randint(0, 256, (args.size, args.size, 3), generator=rng, dtype=torch.uint8).numpy())
                for _ in range(4)]
        for n_pass, quant in enumerate(quants):
            t0 = time.perf_counter()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            adapter = QwenVLModel.from_pretrained(folder, model_id="qwen2-vl-2b (random)", device=device,
                                                  quantization=quant, max_pixels=QWEN2_VL_MAX_PIXELS)
            load_s = time.perf_counter() - t0
            weights = torch.cuda.memory_allocated() / 1024**3 if device == "cuda" else float("nan")
            print(f"[{quant}] loaded in {load_s:.1f} s, weights {weights:.2f} GiB")
            for b in [1, *batches]:  # warm-up at every timed shape: kernel selection, allocator growth
                timed(adapter, [pool[i % 4] for i in range(b)], b, 4, device)
            loop_s, loop_peak = timed(adapter, [pool[i % 4] for i in range(args.loop_images)], 1, args.new_tokens, device)
            base = args.loop_images / loop_s
            rows.append(dict(quant=quant, batch=1, images=args.loop_images, seconds=loop_s, images_per_s=base,
                             vs_loop=1.0, peak_gib=loop_peak, weights_gib=weights, n_pass=n_pass))
            raw_s, prep_s = raw_loop(adapter, [pool[i % 4] for i in range(args.loop_images)], args.new_tokens, device)
            print(f"[{quant}] per-image loop: adapter {loop_s:.2f} s, model.generate directly {raw_s:.2f} s; "
                  f"preprocessing {args.loop_images} images {prep_s:.2f} s")
            for b in batches:
                s, peak = timed(adapter, [pool[i % 4] for i in range(b)], b, args.new_tokens, device)
                rows.append(dict(quant=quant, batch=b, images=b, seconds=s, images_per_s=b / s, vs_loop=(b / s) / base,
                                 peak_gib=peak, weights_gib=weights, n_pass=n_pass))
            del adapter
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    ref = {r["batch"]: r["images_per_s"] for r in rows if r["n_pass"] == 0}
    print(f"\n{args.new_tokens} new tokens per {args.size}² image, greedy; ratios vs the per-image loop of the same run")
    print(f"{'quant':<6}{'batch':>6}{'images':>7}{'seconds':>9}{'img/s':>8}{'vs loop':>9}{'vs bf16':>9}{'peak GiB':>10}")
    for r in rows:
        vs_bf16 = r["images_per_s"] / ref[r["batch"]] if r["batch"] in ref else float("nan")
        label = r["quant"] + ("*" if r["n_pass"] == 2 else "")
        print(f"{label:<6}{r['batch']:>6}{r['images']:>7}{r['seconds']:>9.2f}{r['images_per_s']:>8.2f}"
              f"{r['vs_loop']:>8.2f}x{vs_bf16:>8.2f}x{r['peak_gib']:>10.2f}")
    if len(quants) > 2:
        print("* = bf16 measured again after nf4, to show order effects (warm-up, disk writeback, clocks)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
