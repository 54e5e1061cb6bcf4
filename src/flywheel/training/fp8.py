"""A frozen FP8 base for LoRA training: half the weight memory of bf16 and fp8 tensor-core matmuls.

Each frozen ``nn.Linear`` inside the transformer blocks becomes an ``FP8FrozenLinear``: the weight is
stored as float8 e4m3 with one fp32 scale (per tensor, or per output row). Forward quantizes the
activations (per tensor or per row) and runs ``torch._scaled_mm`` on Hopper's fp8 tensor cores. Backward
needs only the input gradient (the weight is frozen; nothing is saved for a weight gradient): with
``fp8_backward`` the gradient is quantized to e5m2 and multiplied by the weight transposed on the fly
(1 byte per parameter), otherwise the weight is cast up and the product runs in bf16.
With ``fp8_compute=False`` fp8 is storage only: every matmul runs in bf16 on the weight cast up on the fly.
Per-sample layers (adaLN modulation: as many rows as the batch, too few for fp8 kernels) and CPU tensors
keep the fp8 storage and run a bf16 matmul, which is memory-bound there anyway.
Apply it after the LoRA is added: LoRA weights stay in full precision and see the full-precision input.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _scale(x, fmax: float, rowwise: bool):
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    return amax.float().clamp(min=1e-12) / fmax


def _fp8_function():
    import torch

    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2

    class _FP8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, w_scale, bias, rowwise: bool, fp8_backward: bool, fp8_compute: bool):
            ctx.save_for_backward(weight, w_scale)
            ctx.fp8_backward = fp8_backward and fp8_compute
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            n = weight.shape[0]
            if not fp8_compute or x2.shape[0] % 16 or not x2.is_cuda:  # bf16 matmul on the cast-up weight
                out = (x2 @ weight.to(x2.dtype).t()) * w_scale.view(1, -1).to(x2.dtype)
            else:
                xs = _scale(x2, E4M3_MAX, rowwise)
                xq = (x2 / xs.to(x2.dtype)).to(e4m3)
                ws = w_scale.view(1, -1) if w_scale.numel() > 1 else w_scale.reshape(())
                if rowwise and ws.dim() == 0:
                    ws = ws.expand(1, n).contiguous()
                out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype)
            if bias is not None:
                out = out + bias
            return out.reshape(*shape[:-1], n)

        @staticmethod
        def backward(ctx, grad):
            weight, w_scale = ctx.saved_tensors
            g2 = grad.reshape(-1, grad.shape[-1])
            if ctx.fp8_backward and g2.is_cuda and g2.shape[0] % 16 == 0 and w_scale.numel() == 1:
                gs = _scale(g2, E5M2_MAX, False)
                gq = (g2 / gs.to(g2.dtype)).to(e5m2)
                w_t = weight.t().contiguous()  # (in, out) row-major: the column-major operand _scaled_mm needs
                gx = torch._scaled_mm(gq, w_t.t(), scale_a=gs, scale_b=w_scale.reshape(()), out_dtype=grad.dtype)
            else:
                gx = (g2 * w_scale.view(1, -1).to(g2.dtype)) @ weight.to(g2.dtype)
            return gx.reshape(*grad.shape[:-1], weight.shape[1]), None, None, None, None, None, None

    return _FP8Matmul


class _Lazy:
    fn = None


def fp8_frozen_linear_cls():
    import torch

    class FP8FrozenLinear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear, *, rowwise: bool = False, fp8_backward: bool = True,
                     fp8_compute: bool = True):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.rowwise, self.fp8_backward, self.fp8_compute = rowwise, fp8_backward, fp8_compute
            with torch.no_grad():
                w = linear.weight.detach()
                ws = _scale(w, E4M3_MAX, rowwise).reshape(-1)  # (out,) or (1,)
                self.register_buffer("weight_fp8", (w.float() / ws.view(-1, 1)).to(torch.float8_e4m3fn))
            self.register_buffer("weight_scale", ws)
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

        def forward(self, x):
            if _Lazy.fn is None:
                _Lazy.fn = _fp8_function()
            return _Lazy.fn.apply(x, self.weight_fp8, self.weight_scale, self.bias, self.rowwise, self.fp8_backward,
                                 self.fp8_compute)

    return FP8FrozenLinear


def convert_to_fp8(transformer, *, rowwise: bool = False, fp8_backward: bool = True, fp8_compute: bool = True) -> int:
    """Replace the frozen Linears inside the transformer blocks (LoRA wrappers' base layers included) with
    FP8FrozenLinear, in place. Returns how many were converted."""
    import torch

    cls = fp8_frozen_linear_cls()
    n = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and not child.weight.requires_grad and "lora_" not in name:
                    setattr(parent, name, cls(child, rowwise=rowwise, fp8_backward=fp8_backward,
                                              fp8_compute=fp8_compute))
                    n += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("fp8 frozen base: %d Linear layers converted (rowwise=%s, fp8 backward=%s)", n, rowwise, fp8_backward)
    return n
