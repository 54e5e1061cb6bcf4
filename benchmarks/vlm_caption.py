"""Captions and judge scoring through Flywheel's Qwen-VL adapter vs plain ``model.generate``, in one run.

Builds Qwen2-VL-2B at full size with random weights on the device (the real config, ``fullsize.py``; speed
and memory do not depend on the values) and measures, on 1024² images with a fixed number of new tokens
(min = max, so random weights cannot stop early):

0. preprocessing per image, on the CPU (the path before issue 15) and on the model's device;
1. plain ``model.generate`` (transformers' own attention) on inputs prepared beforehand, default cache;
2. the judge's scoring, ``QwenVLModel.option_probabilities`` (one yes/no question: one forward pass);
3. Flywheel's caption path, ``QwenVLModel.generate`` (chat template, preprocessing and decoding all timed)
   with its GPU default: static cache, compiled decode step, grouped-query decode attention (``vlm_speed``);
4. plain ``model.generate`` with ``cache_implementation="static"`` (compiled by transformers, its attention);
5. Flywheel's caption path with ``vlm_compile = "off"``.

Every row: images/s, peak GiB; the compilation's one-off cost is reported on its own. GPU name in the header.

    PYTHONPATH=src python benchmarks/vlm_caption.py                        # GPU: the real measurement
    PYTHONPATH=src python benchmarks/vlm_caption.py --tiny --device cpu    # CI: the same code path, tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fullsize  # noqa: E402

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)
BUDGET = 1280 * 28 * 28  # Qwen's recommended pixel budget: a 1024² image becomes 980² = 1225 image tokens
PROMPT = "Describe this image in one detailed paragraph."
QUESTION = "Does this image show visible artifacts (extra fingers, warped faces, smears)? Answer yes or no."


def build(tiny: bool, device: str):
    """Random-weight Qwen2-VL(-2B) and a processor with Qwen's special tokens, chat template and pixel limits."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from flywheel.testing.tiny.tokenizers import QWEN2_VL_CHAT_TEMPLATE, qwen2_tokenizer

    tok = qwen2_tokenizer()  # a local BPE: the model's 151936-row embedding covers its ids
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                     "<|vision_start|>", "<|vision_end|>")}
    text = dict(TINY_TEXT if tiny else fullsize.QWEN2_VL_TEXT, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    cfg = Qwen2VLConfig(text_config=text, vision_config=TINY_VISION if tiny else fullsize.QWEN2_VL_VISION,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        tie_word_embeddings=not tiny)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    limits = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}  # the released preprocessor's limits
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=limits),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=limits),
        tokenizer=tok, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return model, processor


class Clock:
    """Wall time and peak device memory of one measured call."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 1024**3 if self.device == "cuda" else float("nan")
        return out, seconds, peak


def main() -> None:  # one measurement script, read top to bottom
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from flywheel.models.base import ChatRequest
    from flywheel.models.qwen_vl import QwenVLModel
    from flywheel.models.vlm_speed import cache_length, decode_kwargs

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny config: checks the code path, measures nothing")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--plain-batches", default=None, help="batches for plain model.generate (default: --batches)")
    ap.add_argument("--eager-batches", default="32", help="batches for Flywheel with the compiled decode off")
    ap.add_argument("--budget-s", type=float, default=3600, help="skip what is left after this many seconds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.size, args.new_tokens, args.batches, args.eager_batches = 128, 8, "2,3", "2"
    batches = [int(b) for b in args.batches.split(",")]
    plain_batches = [int(b) for b in (args.plain_batches or args.batches).split(",") if b]
    eager_batches = [int(b) for b in args.eager_batches.split(",") if b]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name} | torch {torch.__version__} | transformers {transformers.__version__}", flush=True)
    clock = Clock(device)
    t0 = time.perf_counter()
    model, processor = build(args.tiny, device)
    n_params = sum(p.numel() for p in model.parameters())
    weights = torch.cuda.memory_allocated() / 1024**3 if device == "cuda" else float("nan")
    print(f"built {n_params / 1e9:.3f} B parameters in {time.perf_counter() - t0:.1f} s, weights {weights:.2f} GiB",
          flush=True)
    vlm = QwenVLModel(model, processor, model_id="qwen2-vl-2b (random)", device=device, max_pixels=BUDGET,
                      batch_size=max(batches), compile="on")
    if device != "cuda":
        vlm.compile_backend = "eager"  # dynamo's trace without inductor: the static-cache path, at CI speed
    rng = np.random.default_rng(0)
    pool = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(8)]
    pad = processor.tokenizer.pad_token_id
    rows: list[dict] = []

    def record(path: str, batch: int, seconds: float, peak: float, **extra) -> None:
        rows.append(dict(path=path, batch=batch, seconds=seconds, images_per_s=batch / seconds, peak_gib=peak, **extra))
        print(f"  {path:<34}{batch:>5}{seconds:>9.2f} s{batch / seconds:>8.2f} img/s{peak:>8.2f} GiB", flush=True)

    def requests(b: int, text: str = PROMPT) -> list:
        return [ChatRequest(text, [pool[i % len(pool)]]) for i in range(b)]

    cache: dict[int, object] = {}

    def prepared(b: int):
        """The model inputs, prepared before timing (the adapter's own encoding, so both paths see the same
        tensors); plain ``generate`` is then timed on them alone."""
        if b not in cache:
            cache.clear()  # one batch's tensors at a time
            cache[b] = vlm.encode(requests(b))
        return cache[b]

    @contextmanager
    def stock_attention():
        """transformers' own "sdpa" attention in the text decoder (Flywheel's fast path swaps in its own)."""
        text = model.config.get_text_config()
        flywheel_attention, text._attn_implementation = text._attn_implementation, "sdpa"
        try:
            yield
        finally:
            text._attn_implementation = flywheel_attention

    def plain(inputs, new_tokens: int, static: bool):
        """``model.generate`` as transformers ships it."""
        extra = decode_kwargs(device, cache_length(inputs["input_ids"].shape[1], new_tokens), backend=vlm.compile_backend) \
            if static else {}
        with stock_attention(), torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad, **extra)

    def caption(b: int, new_tokens: int):
        vlm.batch_size, vlm.generation = b, {"min_new_tokens": new_tokens}
        out = vlm.generate(requests(b), max_new_tokens=new_tokens)
        assert len(out) == b
        return out

    deadline = time.perf_counter() + args.budget_s

    def phase(title: str, fn, sizes: list[int]) -> None:
        """One measured path at each batch size; a failure or the time budget skips the rest of the path only."""
        t_phase = time.perf_counter()
        for b in sizes:
            if time.perf_counter() > deadline:
                print(f"  {title} at batch {b}: skipped (--budget-s spent)", flush=True)
                return
            try:
                fn(b)
            except Exception as err:  # noqa: BLE001 (the other paths are still worth measuring)
                print(f"  {title} at batch {b} FAILED: {type(err).__name__}: {err}", flush=True)
                rows.append(dict(path=title, batch=b, error=f"{type(err).__name__}: {err}"))
                return
        print(f"    ({title}: {time.perf_counter() - t_phase:.0f} s in all)", flush=True)

    def plain_dynamic(b: int) -> None:
        inputs = prepared(b)
        plain(inputs, 4, static=False)  # warm-up: kernel selection, allocator growth
        _, s, peak = clock(lambda: plain(inputs, args.new_tokens, static=False))
        record("plain generate, dynamic cache", b, s, peak)

    first: dict[str, float] = {}

    def fly_compiled(b: int) -> None:
        vlm.compile = "on"
        vlm._use_compiled(True)
        if not first:  # the process's first compiled call: compilation included, reported on its own
            _, first["s"], _ = clock(lambda: caption(b, args.new_tokens))
        # A new shape records CUDA graphs (or, once, compiles again with dynamic shapes): a short call, timed apart.
        _, warm_s, _ = clock(lambda: caption(b, 4))
        _, s, peak = clock(lambda: caption(b, args.new_tokens))
        record("flywheel caption, compiled decode", b, s, peak, new_shape_s=warm_s)
        print(f"    (before it: a 4-token call at this new shape {warm_s:.1f} s)", flush=True)
        if "reported" not in first:
            first["reported"] = 1
            rows[-1]["first_call_s"] = first["s"]
            print(f"    (first call {first['s']:.1f} s: compilation ~{first['s'] - s:.1f} s, once per process)",
                  flush=True)

    def plain_static(b: int) -> None:  # compiles again: transformers' attention is another graph
        inputs = prepared(b)
        _, warm_s, _ = clock(lambda: plain(inputs, 4, static=True))
        _, s, peak = clock(lambda: plain(inputs, args.new_tokens, static=True))
        record("plain generate, static cache", b, s, peak, new_shape_s=warm_s)

    def fly_eager(b: int) -> None:  # as with vlm_compile = "off": no static cache, transformers' attention
        vlm.compile, vlm.compiled_decode = "off", False
        with stock_attention():
            caption(b, 4)
            _, s, peak = clock(lambda: caption(b, args.new_tokens))
        record("flywheel caption, decode not compiled", b, s, peak)

    def judge(b: int) -> None:
        vlm.batch_size = b
        vlm.option_probabilities(requests(b, QUESTION), ["yes", "no"])
        out, s, peak = clock(lambda: vlm.option_probabilities(requests(b, QUESTION), ["yes", "no"]))
        assert len(out) == b and all(abs(p["yes"] + p["no"] - 1) < 1e-6 for p in out)
        record("judge yes/no scoring", b, s, peak)

    print(f"\n{args.new_tokens} new tokens per {args.size}² image, greedy (min = max); in order of priority",
          flush=True)
    def preprocessing(b: int) -> None:
        """Where the adapter's overhead was: encoding on the CPU (PIL fit + processor, then a float32 copy to the
        device: the path before issue 15, and today's CPU path) vs on the model's device."""
        for label, where in (("CPU (before)", "cpu"), ("model's device", device)):
            vlm.device = where
            vlm.encode(requests(2))
            _, s, _ = clock(lambda: vlm.encode(requests(b)))
            print(f"  preprocessing {b} images on the {label}: {1000 * s / b:.1f} ms per image", flush=True)
            rows.append(dict(path=f"preprocessing, {label}", batch=b, seconds=s, ms_per_image=1000 * s / b))
        vlm.device = device

    phase("preprocessing", preprocessing, [min(8, max(batches))])  # 0. chat template + image processing only
    phase("plain generate, dynamic cache", plain_dynamic, plain_batches)  # 1. the baseline
    phase("judge yes/no scoring", judge, batches)  # 2. the judge: one forward pass per question
    phase("flywheel caption, compiled decode", fly_compiled, batches)  # 3. the default caption path on a GPU
    phase("plain generate, static cache", plain_static, batches)  # 4. the same compiled step, without Flywheel
    phase("flywheel caption, decode not compiled", fly_eager, eager_batches)  # 5. vlm_compile = "off"

    best = {}
    for r in (r for r in rows if "images_per_s" in r):
        best[r["path"]] = max(best.get(r["path"], 0.0), r["images_per_s"])
    print(f"\nbest images/s on {name}: " + "; ".join(f"{k} {v:.2f}" for k, v in best.items()))
    fly, ref = best.get("flywheel caption, compiled decode", 0.0), best.get("plain generate, dynamic cache", float("nan"))
    print(f"Flywheel caption path vs plain model.generate (default cache): {fly / ref:.2f}x; goal 15 images/s: "
          f"{'met' if fly >= 15 else 'not met'} ({fly:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "new_tokens": args.new_tokens,
                                         "size": args.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
