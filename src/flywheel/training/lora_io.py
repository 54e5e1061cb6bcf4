"""LoRA files: diffusers/PEFT keys (``FluxPipeline.load_lora_weights``) and kohya keys (ComfyUI, Forge, kohya).

Both files carry the LoRA scale folded into ``lora_B`` / ``lora_up`` (alpha = rank), so every loader
applies exactly ``W + B @ A`` whatever it assumes about alpha.

The kohya format names layers as in Black Forest Labs' original FLUX code, where q, k and v (and, in
single blocks, the MLP input) are one fused Linear. A fused LoRA is built exactly: ``lora_down`` stacks
the parts' A matrices and ``lora_up`` is block-diagonal, so ``up @ down`` is the parts' deltas stacked.
Parts without a LoRA get zero blocks of the same rank (the layout diffusers' own converter recognises).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from flywheel.errors import StageError

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"

@dataclass(frozen=True)
class KohyaKeys:
    """How a transformer's diffusers module names map to kohya / ComfyUI ``lora_unet_*`` names (the original
    BFL checkpoint's, dots as underscores): fused layers (several diffusers Linears in one original Linear),
    one-to-one layers inside double / single blocks, and top-level layers."""

    double_fused: dict[str, list[str]]
    double_single: dict[str, str]
    single_fused: dict[str, list[str]]
    single_single: dict[str, str]
    top: dict[str, str]
    metadata: dict[str, str]


FLUX1_KEYS = KohyaKeys(
    double_fused={"img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
                  "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]},
    double_single={"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp_0",
                   "ff.net.2": "img_mlp_2", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2",
                   "norm1.linear": "img_mod_lin", "norm1_context.linear": "txt_mod_lin"},
    single_fused={"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]},
    single_single={"proj_out": "linear2", "norm.linear": "modulation_lin"},
    top={"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear"},
    metadata={"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"},
)


def kohya_nameable(module: str, keys: KohyaKeys = FLUX1_KEYS) -> bool:
    """Whether ``to_kohya`` has a name for a LoRA on transformer module ``module``
    (e.g. ``single_transformer_blocks.3.proj_mlp``: yes; ``norm_out.linear``: no)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)$", module)
    if m is None:
        return module in keys.top
    double = m.group(1) == "transformer_blocks"
    fused = (keys.double_fused if double else keys.single_fused).values()
    return (m.group(2) in (keys.double_single if double else keys.single_single)
            or any(m.group(2) in parts for parts in fused))


def lora_state_dict(transformer, *, alpha: float, rank: int) -> dict:
    """PEFT LoRA weights of ``transformer`` with keys ``transformer.<module>.lora_A/B.weight``, scale folded in."""
    from peft.utils import get_peft_model_state_dict

    scale = alpha / rank
    out = {}
    for k, v in get_peft_model_state_dict(transformer).items():
        v = v.detach().float().cpu()
        out[f"transformer.{k}"] = (v * scale if ".lora_B." in k else v).contiguous()
    return out


def save_diffusers(state: dict, folder: Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights`` does."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / LORA_FILE), metadata={"format": "pt"})
    return folder / LORA_FILE


def to_kohya(state: dict, out_features: dict[str, int], *, dtype=None, keys: KohyaKeys = FLUX1_KEYS) -> dict:
    """Convert diffusers keys to kohya ``lora_unet_*`` keys. ``out_features`` maps module name (as in the
    transformer, e.g. ``single_transformer_blocks.0.proj_mlp``) to its output size, for zero parts."""
    import torch

    pairs: dict[str, tuple] = {}
    for k in state:
        if k.endswith(".lora_A.weight"):
            mod = k[len("transformer."):-len(".lora_A.weight")]
            pairs[mod] = (state[k], state[f"transformer.{mod}.lora_B.weight"])
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def emit(name: str, down, up) -> None:
        out[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
        out[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
        out[f"lora_unet_{name}.alpha"] = torch.tensor(float(down.shape[0]))  # scale already folded in

    def fused(name: str, parts: list[str]) -> None:
        present = [p for p in parts if p in pairs]
        if not present:
            return
        rank = pairs[present[0]][0].shape[0]
        in_f = pairs[present[0]][0].shape[1]
        downs, ups = [], []
        for p in parts:
            a, b = pairs.get(p, (None, None))
            if a is None:
                if p not in out_features:
                    raise StageError(f"cannot export {name}: size of {p} unknown", hint="pass the transformer's sizes")
                a, b = torch.zeros(rank, in_f), torch.zeros(out_features[p], rank)
            elif a.shape[0] != rank:
                raise StageError(f"cannot fuse {name}: its parts have different LoRA ranks")
            downs.append(a)
            ups.append(b)
            used.add(p)
        emit(name, torch.cat(downs, 0), torch.block_diag(*ups))

    blocks: dict[tuple[str, int], list[str]] = {}
    for mod in pairs:
        m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", mod)
        if m:
            blocks.setdefault((m.group(1), int(m.group(2))), []).append(m.group(3))
        elif mod in keys.top:
            emit(keys.top[mod], *pairs[mod])
            used.add(mod)
    for (kind, i), _ in sorted(blocks.items()):
        prefix = f"{kind}.{i}."
        double = kind == "transformer_blocks"
        kname = f"{'double' if double else 'single'}_blocks_{i}_"
        for fname, parts in (keys.double_fused if double else keys.single_fused).items():
            fused(kname + fname, [prefix + p for p in parts])
        for part, sname in (keys.double_single if double else keys.single_single).items():
            if prefix + part in pairs:
                emit(kname + sname, *pairs[prefix + part])
                used.add(prefix + part)
    missing = sorted(set(pairs) - used)
    if missing:
        raise StageError(f"no kohya name for LoRA modules {missing[:3]}",
                         hint="train with target_modules among to_q/k/v, to_out.0, add_*_proj, ff, proj_mlp, proj_out")
    return {k: (v.to(dtype) if dtype is not None else v) for k, v in out.items()}


def out_features_of(transformer) -> dict[str, int]:
    """Output size of every linear layer by module name (LoRA wrappers and fp8 layers included)."""
    sizes = {}
    for name, mod in transformer.named_modules():
        if "lora_" in name or name.endswith("base_layer") or not hasattr(mod, "out_features"):
            continue
        sizes[name] = int(getattr(getattr(mod, "base_layer", mod), "out_features", mod.out_features))
    return sizes


def save_kohya(state: dict, path: Path, out_features: dict[str, int], keys: KohyaKeys = FLUX1_KEYS) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file(to_kohya(state, out_features, dtype=torch.bfloat16, keys=keys), str(path), metadata=keys.metadata)
    return path
