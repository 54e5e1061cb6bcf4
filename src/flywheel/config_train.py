"""``[train]``, ``[generate]`` and ``[tune_judge]``: the sections that train and render (split from config.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from flywheel.config_base import Section


class TuneJudgeConfig(Section):
    """``flywheel tune-judge``: a LoRA on the judge VLM learned from human reviews (docs/tune_judge.md)."""

    held_out_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="Share of reviewed images held out, by source.")
    split_seed: int = 0
    min_examples: int = Field(8, ge=2, description="Fewer accepted/rejected human reviews than this is an error.")
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str = Field(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                                description="Regex of the modules that get LoRA layers (peft).")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    decision_loss_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of the loss on the yes/no token; the rest is the JSON reason.")
    max_grad_norm: float = Field(1.0, gt=0)
    quantize_base: Literal["auto", "none", "nf4"] = Field(
        "auto", description="'auto': QLoRA (4-bit NF4 base) on CUDA, plain LoRA in float32 on CPU.")
    gradient_checkpointing: bool = True
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    use_active_adapter: bool = Field(
        True, description="`flywheel judge` uses the newest promoted adapter of [models] judge (if any).")


class TrainConfig(Section):
    """``flywheel train``: a FLUX.1 or FLUX.2 klein LoRA on a frozen dataset version (flywheel.toml.template)."""

    base_model: str | None = Field(
        None, description="Base to train on (FLUX.1 or klein base): preset, folder or hub id; unset = [models] base.")
    resolution: int = Field(1024, ge=64, multiple_of=16, description="Bucket area is about resolution^2 px.")
    bucket_step: int = Field(64, ge=16, multiple_of=16, description="Bucket sides are multiples of this (px).")
    max_aspect: float = Field(2.0, ge=1.0, le=4.0)
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1, description="Images per batch (per GPU with gpus >= 1).")
    gpus: int = Field(0, ge=0, description="0 = train in this process; N = N processes, one per GPU, through "
                      "torch.distributed (data parallel, docs/scaling.md).")
    gradient_accumulation: int = Field(1, ge=1, description="Batches per optimizer step: the effective batch "
                                       "is max(1, gpus) x batch_size x gradient_accumulation.")
    repeats: int = Field(1, ge=1, description="Times each image appears per epoch.")
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.05, ge=0, le=1)
    guidance: float = Field(1.0, ge=0)
    timestep_sampling: Literal["shifted_sigmoid", "sigmoid", "uniform"] = "shifted_sigmoid"
    gradient_checkpointing: bool = True
    checkpoint_every_n_blocks: int = Field(
        0, ge=0, description="With checkpointing: 1 = every block, 2 = half...; 0 = auto (with fp8_matmul: none for a base of "
                   "<= 6 B params at <= one 1024² image per step, else 2, or with compile recomputation inside the blocks "
                   "(activation_memory_budget); without fp8_matmul: 1).")
    quantize_base: Literal["auto", "none", "fp8", "int8", "nf4"] = Field(
        "auto", description="Frozen base precision while training; 'auto' follows [models] quantization of the base.")
    compile: bool = Field(True, description="torch.compile per transformer block (CUDA only; skipped elsewhere).")
    compile_dynamic: bool = Field(
        False, description="With compile: one graph for every bucket shape instead of one per shape (each "
                           "static shape compiles every block type again, ~40 s on an H200).")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="With compile: replay the compiled blocks as CUDA graphs (forward and backward), "
        "which removes the CPU's kernel-launch time. 'auto' = on where compiled and no block is checkpointed "
        "(checkpoint_every_n_blocks), off with gpus >= 1 (not measured there yet); memory: the graphs' pool "
        "(docs/training.md).")
    activation_memory_budget: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        "auto", description="With compile: < 1 recomputes the cheapest activations inside each block to save "
        "memory (1 = keep all). 'auto': 0.5 where checkpointing 'auto' would checkpoint every 2nd block (a base "
        "> 6 B params with fp8 matmuls, e.g. FLUX.1-dev), which it then replaces; else 1.")
    fp8_matmul: Literal["auto", "on", "off"] = Field(
        "auto", description="fp8 weights + fp8 matmuls on the frozen base; 'auto' = on with CUDA compute 8.9+.")
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math", "native"] = Field(
        "auto", description="PyTorch SDPA kernel; 'auto' = flash on CUDA, PyTorch's choice elsewhere.")
    fused_optimizer: bool = Field(True, description="AdamW's fused CUDA kernel (skipped off CUDA).")
    lora_compute: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="dtype of the LoRA's matmuls; its weights, gradients' accumulation and AdamW stay "
        "fp32. 'auto' = bf16 on CUDA (the activations' dtype), fp32 elsewhere.")
    max_sequence_length: int = Field(512, ge=16, le=512)
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    sample_every: int = Field(250, ge=0, description="0 = only at the end.")
    sample_prompts: list[str] = Field(default_factory=lambda: [
        "a photo of {trigger}, portrait, soft window light",
        "{trigger} walking through a busy city street at night, full body",
    ])
    sample_seeds: list[int] = Field(default_factory=lambda: [0])
    sample_steps: int = Field(28, ge=1)
    sample_size: int = Field(1024, ge=64)
    seed: int = 42


class GenerateConfig(Section):
    """``flywheel generate``: round-k synthetic images from the prompt bank with LoRA round k."""

    prompts: int = Field(0, ge=0, description="How many bank prompts to use (0 = all).")
    seeds_per_prompt: int = Field(2, ge=1)
    extra_prompts: list[str] = Field(default_factory=list, description="Added to the shipped bank; use {trigger}.")
    use_shipped_prompts: bool = True
    width: int = Field(1024, ge=16, multiple_of=16)
    height: int = Field(1024, ge=16, multiple_of=16)
    steps: int = Field(28, ge=1)
    guidance: float = Field(3.5, ge=0)
    max_sequence_length: int = Field(512, ge=16, le=512)
    batch_size: int = Field(4, ge=1)
    lora_scale: float = 1.0
    seed: int = 0
