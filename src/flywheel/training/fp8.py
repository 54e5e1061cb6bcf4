"""A frozen FP8 base for LoRA training: half the weight memory of bf16 and fp8 tensor-core matmuls.

Each frozen ``nn.Linear`` inside the transformer blocks becomes an ``FP8FrozenLinear``: the weight is
stored as float8 e4m3 with one fp32 scale (per tensor, or per output row). Forward quantizes the
activations (per tensor or per row) and runs ``torch._scaled_mm`` on Hopper's fp8 tensor cores. Backward
needs only the input gradient (the weight is frozen; nothing is saved for a weight gradient): with
``fp8_backward`` the gradient is quantized (per tensor: e5m2; per row: the weight's row scales folded into
its columns, then e4m3 per token) and multiplied by the weight transposed on the fly (1 byte per
parameter), otherwise the weight is cast up and the product runs in bf16.
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

    # _scaled_mm as an opaque custom op: under torch.compile the quantizing casts around it still fuse, and
    # inductor must hand it its operands in the eager strides (it gave the backward's fp8 gradient a
    # column-major layout that _scaled_mm refuses, "mat_a must be row_major").
    @torch.library.custom_op("flywheel::fp8_mm", mutates_args=(), schema=(
        "(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, ScalarType out_dtype) -> Tensor"))
    def fp8_mm(a, b, scale_a, scale_b, out_dtype):
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    @fp8_mm.register_fake
    def _(a, b, scale_a, scale_b, out_dtype):
        return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)

    class _FP8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, w_scale, bias, rowwise: bool, fp8_backward: bool, fp8_compute: bool,
                    force_scaled_mm: bool = False):
            ctx.save_for_backward(weight, w_scale)
            ctx.fp8_backward = fp8_backward and fp8_compute
            ctx.force_scaled_mm = force_scaled_mm  # tests: the fp8 kernels' CPU implementation
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            n = weight.shape[0]
            if not fp8_compute or x2.shape[0] % 16 or not (x2.is_cuda or force_scaled_mm):  # bf16 on the cast-up weight
                out = (x2 @ weight.to(x2.dtype).t()) * w_scale.view(1, -1).to(x2.dtype)
            else:
                xs = _scale(x2, E4M3_MAX, rowwise)
                xq = (x2.float() / xs).to(e4m3)  # fp32: the exact scale _scaled_mm undoes
                ws = w_scale.view(1, -1) if w_scale.numel() > 1 else w_scale.reshape(())
                if rowwise and ws.dim() == 0:
                    ws = ws.expand(1, n).contiguous()
                out = fp8_mm(xq, weight.t(), xs, ws, x.dtype)
            if bias is not None:
                out = out + bias
            return out.reshape(*shape[:-1], n)

        @staticmethod
        def backward(ctx, grad):
            weight, w_scale = ctx.saved_tensors
            g2 = grad.reshape(-1, grad.shape[-1])
            if ctx.fp8_backward and g2.shape[0] % 16 == 0 and (g2.is_cuda or ctx.force_scaled_mm):
                w_t = weight.t().contiguous()  # (in, out) row-major: the column-major operand _scaled_mm needs
                if w_scale.numel() == 1:
                    gs = _scale(g2, E5M2_MAX, False)
                    gq = (g2.float() / gs).to(e5m2)
                    gx = fp8_mm(gq, w_t.t(), gs, w_scale.reshape(()), grad.dtype)
                else:  # per-row weight scales fold into the gradient's columns; then e4m3 per token row
                    gw = g2.float() * w_scale.view(1, -1)
                    gs = _scale(gw, E4M3_MAX, True)
                    gq = (gw / gs).to(e4m3)
                    ones = torch.ones(1, weight.shape[1], device=g2.device, dtype=torch.float32)
                    gx = fp8_mm(gq, w_t.t(), gs, ones, grad.dtype)
            else:
                gx = (g2 * w_scale.view(1, -1).to(g2.dtype)) @ weight.to(g2.dtype)
            return gx.reshape(*grad.shape[:-1], weight.shape[1]), None, None, None, None, None, None, None

    return _FP8Matmul


class _Lazy:
    fn = None
    cls = None


def fp8_frozen_linear_cls():
    """The FP8FrozenLinear class, made once: torch.compile guards on a module's class, so a class per
    call made every block recompile (57 compiles for FLUX.1 instead of one per block type)."""
    if _Lazy.cls is None:
        _Lazy.cls = _make_cls()
    return _Lazy.cls


def _make_cls():
    import torch

    class FP8FrozenLinear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear, *, rowwise: bool = False, fp8_backward: bool = True,
                     fp8_compute: bool = True):
            super().__init__()
            if _Lazy.fn is None:  # here, not in forward: torch.compile cannot trace a class definition
                _Lazy.fn = _fp8_function()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.rowwise, self.fp8_backward, self.fp8_compute = rowwise, fp8_backward, fp8_compute
            self.force_scaled_mm = False  # True: fp8 kernels on the CPU too (tests of the fp8 arithmetic)
            with torch.no_grad():
                w = linear.weight.detach()
                ws = _scale(w, E4M3_MAX, rowwise).reshape(-1)  # (out,) or (1,)
                self.register_buffer("weight_fp8", (w.float() / ws.view(-1, 1)).to(torch.float8_e4m3fn))
            self.register_buffer("weight_scale", ws)
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

        def forward(self, x):
            return _Lazy.fn.apply(x, self.weight_fp8, self.weight_scale, self.bias, self.rowwise, self.fp8_backward,
                                 self.fp8_compute, self.force_scaled_mm)

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
