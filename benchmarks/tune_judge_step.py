"""Judge fine-tuning step (``flywheel tune-judge``): QLoRA step time and peak GPU memory at full size.

Full Qwen2-VL-2B and Qwen2-VL-7B architectures with random weights (speed and memory do not depend on
the values), saved as real HF folders and loaded through ``QwenVLModel.from_pretrained`` exactly as
``tune-judge`` loads a judge: 4-bit NF4 base via bitsandbytes + ``prepare_model_for_kbit_training``
(QLoRA), or bf16 (plain LoRA, the baseline). One training example is the keep question with
``--images`` images of ``--side``² px and an answer of ~``--answer-tokens`` tokens, batch 1, gradient
checkpointing, LoRA r16 on the language model's q/k/v/o, AdamW, and the loss ``tune-judge`` uses
(``flywheel.judge_tuning.train.answer_loss``). Prints the GPU, then per variant the median step time,
peak allocated memory and the ratio to the 2B bf16 LoRA baseline measured in the same run.
The goal: a 7B judge fine-tune within 16 GiB.

    python benchmarks/tune_judge_step.py                       # GPU: 2B bf16 baseline, 2B and 7B QLoRA
    python benchmarks/tune_judge_step.py --tiny --steps 2      # CPU dry run of the same code path
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
CONFIGS = {
    "qwen2-vl-2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
                        vision={**VISION, "hidden_size": 1536}, tie=True),
    "qwen2-vl-7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                  num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768),
                        vision={**VISION, "hidden_size": 3584}, tie=False),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
                 vision=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=4, patch_size=14, spatial_merge_size=2,
                             temporal_patch_size=2, in_channels=3, hidden_size=64), tie=True, mrope=[2, 3, 3]),
}


def build_folder(name: str, folder: Path, device: str, side: int) -> Path:
    """Random-weight model + processor (tiny tokenizer: ids only, the lengths are set by --answer-tokens)."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from flywheel.testing.tiny.tokenizers import QWEN2_VL_CHAT_TEMPLATE, qwen2_tokenizer

    spec = CONFIGS[name]
    tok = qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                     "<|vision_start|>", "<|vision_end|>")}
    rope = {**ROPE, "mrope_section": spec.get("mrope", ROPE["mrope_section"])}
    config = Qwen2VLConfig(
        text_config={**spec["text"], "rope_parameters": rope, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config=spec["vision"], tie_word_embeddings=spec["tie"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # random init on the GPU takes seconds; on the CPU minutes for 7B
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    t0 = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="5GB")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    limits = {"shortest_edge": 56 * 56, "longest_edge": side * side}
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=limits), tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(size=limits),
                     chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(folder)
    print(f"  built {name}: {n_params / 1e9:.2f} B parameters, saved in {time.perf_counter() - t0:.0f} s")
    return folder


def measure(folder: Path, *, quantized: bool, device: str, steps: int, side: int, images: int,
            answer_tokens: int) -> dict:
    import torch
    from PIL import Image

    from flywheel.config import TuneJudgeConfig
    from flywheel.judge_tuning.prompt import keep_answer, keep_request
    from flywheel.judge_tuning.train import add_lora, answer_loss, collate, encode, trainable
    from flywheel.models.qwen_vl import QwenVLModel

    vlm = QwenVLModel.from_pretrained(folder, device=device, quantization="nf4" if quantized else "none",
                                      dtype="bfloat16" if device == "cuda" else "float32", max_pixels=side * side)
    tcfg = TuneJudgeConfig(rank=16, alpha=32, dropout=0.0, gradient_checkpointing=True)
    peft_model = add_lora(vlm, tcfg, quantized=quantized)
    params = list(trainable(peft_model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rng = torch.Generator().manual_seed(0)
    pics = [Image.fromarray((torch.rand(side, side, 3, generator=rng) * 255).byte().numpy()) for _ in range(images)]
    request = keep_request(pics[0], pics[-1], kind="enriched", prompt="Change the background to a forest.")
    request.images = pics  # --images 1: the single-image case the goal names; 2: reference + candidate
    tok = vlm.processor.tokenizer
    reason = "the face matches the reference and the forest edit is clean"
    while len(tok.encode(keep_answer(True, reason), add_special_tokens=False)) < answer_tokens:
        reason += " and the lighting is consistent"
    item = encode(vlm, request, keep_answer(True, reason))
    batch = {k: v.to(vlm.model.device) for k, v in collate([item], tok.pad_token_id).items()}
    n_answer = int((item["labels"] != -100).sum())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peft_model.train()
    times = []
    for _ in range(steps + 2):  # two warm-up steps (allocator, kernels)
        t0 = time.perf_counter()
        loss = answer_loss(peft_model, batch, tcfg.decision_loss_share)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else float("nan")
    out = {"step_s": statistics.median(times[2:]), "peak_gib": peak, "tokens": int(item["input_ids"].shape[1]),
           "answer_tokens": n_answer, "lora_params": sum(p.numel() for p in params), "loss": loss.item()}
    del vlm, peft_model, optimizer, batch, loss
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config (dry run of the code paths)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--side", type=int, default=1024, help="image side in px")
    ap.add_argument("--images", type=int, default=1, choices=[1, 2])
    ap.add_argument("--answer-tokens", type=int, default=100)
    ap.add_argument("--models", default="qwen2-vl-2b,qwen2-vl-7b")
    ap.add_argument("--workdir", type=Path, default=None, help="where the random-weight folders go (default: a temp dir)")
    args = ap.parse_args()
    names = ["tiny"] if args.tiny else args.models.split(",")
    side = 112 if args.tiny and args.side == 1024 else args.side
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; torch {torch.__version__}")
    has_bnb = True
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        has_bnb = False
        print("  bitsandbytes is not installed: QLoRA (nf4) variants are skipped")
    work = Path(tempfile.mkdtemp(prefix="tune-judge-bench-", dir=args.workdir))
    variants = [(names[0], False)] + [(n, True) for n in names]  # bf16/fp32 LoRA baseline first
    results = []
    try:
        for name in dict.fromkeys(n for n, _ in variants):
            folder = build_folder(name, work / name, args.device, side)
            for vname, quantized in variants:
                if vname != name:
                    continue
                if quantized and (args.device != "cuda" or not has_bnb):
                    print(f"  {name} QLoRA: skipped (needs CUDA + bitsandbytes)")
                    continue
                r = measure(folder, quantized=quantized, device=args.device, steps=args.steps, side=side,
                            images=args.images, answer_tokens=args.answer_tokens)
                plain = "LoRA bf16" if args.device == "cuda" else "LoRA fp32"
                results.append((name, "QLoRA nf4" if quantized else plain, r))
                print(f"  {name:12s} {results[-1][1]:10s} step {r['step_s']:.3f} s  peak {r['peak_gib']:.2f} GiB  "
                      f"({r['tokens']} tokens, {r['answer_tokens']} in the loss, {r['lora_params'] / 1e6:.1f} M LoRA)")
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if results:
        base = results[0][2]
        print(f"\nratios vs {results[0][0]} {results[0][1]} (same run):")
        for name, mode, r in results:
            mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x memory" if base["peak_gib"] == base["peak_gib"] else ""
            goal = "  (goal: <= 16 GiB)" if name == "qwen2-vl-7b" else ""
            print(f"  {name:12s} {mode:10s} {r['step_s'] / base['step_s']:.2f}x time  {mem}{goal}")


if __name__ == "__main__":
    main()
