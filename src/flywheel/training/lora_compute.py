"""The LoRA's matmuls in the activations' dtype (bf16 on a GPU) while its weights and AdamW stay fp32:
``[train] lora_compute`` (``training/speed.py``).

peft computes a LoRA branch in its weights' dtype: each LoRA layer casts its (bf16) input to fp32, and the
two small matmuls (and their backward) run in fp32. On the H200 those fp32 GEMMs and casts took ~6 % of the
FLUX.1-dev step's kernel time (1137 calls, 23 ms of 0.397 s at 1024²). Here each layer keeps its input's dtype
(peft's ``cast_input_dtype_enabled`` switch, the one its ``disable_input_dtype_casting`` helper flips) and
the LoRA's own Linears cast their fp32 weights to it at use, the way autocast would, but for these layers
only: autocast would also move the base's norms to fp32. Gradients flow through the cast back to the fp32
weights, so the optimizer, checkpoints and saved LoRA are unchanged; the branch's products round to bf16
as the frozen base's own do (``benchmarks/train_numerics.py`` compares the loss curve with fp32).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def compute_in_input_dtype(transformer) -> int:
    """Switch every peft LoRA layer of ``transformer`` to compute in its input's dtype; returns how many.
    0 when the installed peft has no input-casting switch (its LoRA then computes as before)."""
    import torch

    switched = 0
    for module in transformer.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not hasattr(module, "cast_input_dtype_enabled"):
            continue
        module.cast_input_dtype_enabled = False
        for linear in (*lora_a.values(), *lora_b.values()):
            if isinstance(linear, torch.nn.Linear):
                linear.forward = _in_input_dtype(linear)
        switched += 1
    return switched


def _in_input_dtype(linear):
    import torch.nn.functional as F

    def forward(x):
        bias = None if linear.bias is None else linear.bias.to(x.dtype)
        return F.linear(x, linear.weight.to(x.dtype), bias)

    return forward
