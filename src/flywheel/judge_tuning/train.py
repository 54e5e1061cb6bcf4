"""LoRA / QLoRA supervised fine-tuning of the Qwen-VL judge on keep-question examples.

Each example is encoded exactly as the judge encodes a question (the adapter's own prompt encoding:
pixel budget, chat template, vision tokens), then the target answer's tokens and ``<|im_end|>`` are
appended; labels are -100 on the prompt, so only the answer is in the loss. Batches are right-padded.
The base is frozen (4-bit NF4 on CUDA via bitsandbytes + ``peft.prepare_model_for_kbit_training``,
float32 on CPU) and LoRA layers go on the language model's attention projections. Data order is a
function of the seed alone and checkpoints (``flywheel.training.checkpoint``) hold LoRA, optimizer,
scheduler and RNG state, so a resumed run takes the same steps as one that never stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.config import TuneJudgeConfig
from flywheel.errors import StageError
from flywheel.models.base import ChatRequest
from flywheel.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

IGNORE = -100
ENCODE_CACHE_BYTES = 2 * 1024**3  # encoded examples kept in CPU memory between epochs


def encode(vlm, request: ChatRequest, answer: str) -> dict[str, Any]:
    """Prompt tensors from the judge's own encoder + answer tokens; labels only on the answer (CPU tensors)."""
    import torch

    tok = vlm.processor.tokenizer
    # The very encoding option_probabilities uses, so training sees what the judge will be asked.
    prompt = {k: v.cpu() for k, v in vlm.encode([request]).items()}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answer_ids = tok.encode(answer, add_special_tokens=False) + [end if isinstance(end, int) else tok.eos_token_id]
    answer_t = torch.tensor([answer_ids], dtype=prompt["input_ids"].dtype)
    n_prompt = prompt["input_ids"].shape[1]
    out: dict[str, Any] = {}
    for key, value in prompt.items():
        if value.dim() == 2 and value.shape == (1, n_prompt):  # per-token: extend over the answer
            fill = answer_t if key == "input_ids" else torch.full_like(answer_t, 1 if key == "attention_mask" else 0)
            out[key] = torch.cat([value, fill], dim=1)
        else:
            out[key] = value
    out["labels"] = torch.cat([torch.full((1, n_prompt), IGNORE, dtype=answer_t.dtype), answer_t], dim=1)
    return out


def collate(encoded: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad the per-token tensors (labels with -100, masks with 0); concatenate image tensors."""
    import torch

    length = max(e["input_ids"].shape[1] for e in encoded)
    pad_value = {"input_ids": pad_id, "labels": IGNORE}
    batch: dict[str, Any] = {}
    for key in encoded[0]:
        per_token = all(e[key].dim() == 2 and e[key].shape == e["input_ids"].shape for e in encoded)
        if per_token:
            batch[key] = torch.cat([torch.nn.functional.pad(e[key], (0, length - e[key].shape[1]),
                                                            value=pad_value.get(key, 0)) for e in encoded])
        else:
            batch[key] = torch.cat([e[key] for e in encoded])
    return batch


def answer_loss(model, batch: dict[str, Any], decision_share: float):
    """Cross-entropy on the answer tokens only: ``decision_share`` on the decision word, the rest on the JSON.

    The decision is one token among ~40 (the JSON and reason follow it); averaged with the others it gets
    ~1/40 of the gradient and a small model learns the JSON long before the decision. Logits are kept only
    for the answer span, never the prompt's image tokens (vocab x prompt length would dominate memory).
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    answer = labels != IGNORE
    length = labels.shape[1]
    first_answer = int(answer.float().argmax(dim=1).min())  # earliest answer token in the batch
    keep = length - first_answer + 1  # logits from the position that predicts it
    logits = model(**inputs, logits_to_keep=keep).logits
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)[:, length - keep:]  # the token each position predicts
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    mask = targets != IGNORE
    decision = mask & (mask.long().cumsum(dim=1) == 1)
    rest = mask & ~decision
    if not rest.any():
        return ce[decision].mean()
    return decision_share * ce[decision].mean() + (1 - decision_share) * ce[rest].mean()


def schedule(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices per step: seeded epoch permutations, so resuming needs only the step number."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n, generator=g).tolist())
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def add_lora(vlm, tcfg: TuneJudgeConfig, *, quantized: bool):
    """Freeze the base, prepare it for k-bit training when quantized, and put LoRA layers on it (in place)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = vlm.model
    if next(model.parameters()).is_cuda:  # cuDNN attention's backward hit illegal memory accesses (torch 2.11, H100)
        torch.backends.cuda.enable_cudnn_sdp(False)
    gc_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tcfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    torch.manual_seed(tcfg.seed)  # LoRA A matrices are random: same seed, same start
    config = LoraConfig(r=tcfg.rank, lora_alpha=tcfg.alpha, lora_dropout=tcfg.dropout,
                        target_modules=tcfg.target_modules, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise StageError(f"cannot put LoRA layers on {vlm.model_id}: {err}",
                         hint="check [tune_judge] target_modules against the model's module names") from None
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("tune-judge: %d trainable LoRA parameters on %s", n_train, vlm.model_id)
    vlm.model = peft_model  # the adapter's option_probabilities now runs the LoRA model
    return peft_model


def trainable(peft_model) -> dict[str, Any]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def fit(vlm, peft_model, example: Callable[[int], tuple[ChatRequest, str]], n_examples: int, tcfg: TuneJudgeConfig,
        run_dir: Path, *, resume_from: Path | None = None,
        progress: ProgressFn | None = None) -> list[dict[str, float]]:
    """AdamW on the LoRA parameters for ``tcfg.steps`` steps; ``example(i)`` is (request, answer). Returns losses."""
    import torch

    from flywheel.training.checkpoint import load_checkpoint, save_checkpoint

    progress = progress or no_progress
    params = trainable(peft_model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    warmup = tcfg.warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator().manual_seed(tcfg.seed)
    plan = schedule(n_examples, tcfg.steps, min(tcfg.batch_size, n_examples), tcfg.seed)
    losses: list[dict[str, float]] = []
    start = 0
    torch.manual_seed(tcfg.seed)
    if resume_from is not None:
        state = load_checkpoint(resume_from, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                generator=generator)
        start, losses = int(state["step"]), list(state["losses"])
        log.info("tune-judge: resumed from %s at step %d", resume_from, start)
    pad_id = vlm.processor.tokenizer.pad_token_id
    device = next(iter(params.values())).device
    cache: dict[int, dict[str, Any]] = {}
    cached_bytes = 0

    def encoded(i: int) -> dict[str, Any]:
        # Encoding (image resize + processor) costs more than a tiny model's step: keep it while memory allows.
        nonlocal cached_bytes
        if i in cache:
            return cache[i]
        item = encode(vlm, *example(i))
        size = sum(t.numel() * t.element_size() for t in item.values())
        if cached_bytes + size <= ENCODE_CACHE_BYTES:
            cache[i], cached_bytes = item, cached_bytes + size
        return item

    peft_model.train()
    progress(start, tcfg.steps, "steps")
    for step in range(start, tcfg.steps):
        batch = collate([encoded(i) for i in plan[step]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = answer_loss(peft_model, batch, tcfg.decision_loss_share)
        if not torch.isfinite(loss):
            raise StageError(f"tune-judge: the loss became {loss.item()} at step {step + 1}",
                             hint="lower [tune_judge] learning_rate, or resume from the last checkpoint")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), tcfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append({"step": step + 1, "loss": float(loss.item())})
        done = step + 1
        if done % tcfg.checkpoint_every == 0 and done < tcfg.steps:
            save_checkpoint(run_dir, done, lora=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                            generator=generator, data={"seed": tcfg.seed, "examples": n_examples}, losses=losses,
                            keep=tcfg.keep_checkpoints)
        progress(done, tcfg.steps, f"loss {losses[-1]['loss']:.3f}")
    peft_model.eval()
    return losses
