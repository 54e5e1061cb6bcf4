"""How a training run loads and optimizes its base: the [models] base role's settings resolved for training,
the checks that fail before minutes of loading, and the optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flywheel.config import TrainConfig
from flywheel.errors import MissingExtraError
from flywheel.training import quantize, targets


@dataclass
class BaseLoad:
    """How the FLUX base is loaded for training: [models] base role settings, the stage's device override,
    and ``[train] quantize_base`` ('auto' follows the base role's [models] quantization)."""

    device: str
    dtype: str
    quantize: str
    cpu_offload: bool


def base_load(project, cfg: TrainConfig, device: str | None) -> BaseLoad:
    from flywheel.models.hub import pick_device

    role = project.config.models.for_role("base")
    resolved = pick_device(device or role["device"])
    dtype = role["dtype"] if role["dtype"] != "auto" else ("bfloat16" if resolved.startswith("cuda") else "float32")
    mode = cfg.quantize_base if cfg.quantize_base != "auto" else role["quantization"]
    return BaseLoad(resolved, dtype, mode, bool(role["cpu_offload"]))


def check_runnable(cfg: TrainConfig, load: BaseLoad, family=None) -> None:
    """Options that need a GPU or an optional library fail here, with what to do, not after the loading.
    ``family`` (``flywheel.training.families``; FLUX.1 when None) names the layers LoRA targets must match."""
    if family is None:
        targets.check_target_modules(cfg.target_modules)  # else the kohya export fails after training
    else:
        targets.check_target_modules(cfg.target_modules, family.linears, family.nameable, family.label,
                                     family.containers)
    quantize.check_quantize_support(load.quantize, load.device)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MissingExtraError("bitsandbytes", "lowvram", "[train] optimizer = 'adamw8bit'") from None


def optimizer(cfg: TrainConfig, params: list):
    import torch

    from flywheel.training.speed import adamw_options

    if cfg.optimizer == "adamw8bit":  # bitsandbytes' presence was checked by check_runnable
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # adamw_options: the fused CUDA kernel ([train] fused_optimizer)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **adamw_options(cfg, params))


def lr_factor(cfg: TrainConfig):
    """The learning rate's factor at each step (``LambdaLR``): linear warm-up, then constant, linear or cosine."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - frac)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0
    return factor
