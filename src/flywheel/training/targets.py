"""``[train] target_modules`` checked before any model loads: every LoRA layer must have a kohya name.

A run writes its LoRA in diffusers and kohya formats (``lora_io``). A target that matches a layer the kohya
format cannot name (``norm_out.linear``, the time/guidance embedders) would fail only when the finished
LoRA is saved, hours later, so such a target is refused up front, as is one that matches no layer.
The check needs no model: it matches the targets the way peft matches a list of names (the whole module
name, or its ending after a dot) against the Linear layers of diffusers' ``FluxTransformer2DModel``.
"""

from __future__ import annotations

from flywheel.errors import ConfigError
from flywheel.training.lora_io import kohya_nameable

# The Linear layers of FluxTransformer2DModel by name ({i}: any block index). tests/test_targets.py checks
# this list against a real (tiny) FluxTransformer2DModel and the matching against peft's own.
FLUX_LINEARS = (
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "context_embedder", "x_embedder",
    *(f"transformer_blocks.{{i}}.{m}" for m in (
        "norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2")),
    *(f"single_transformer_blocks.{{i}}.{m}" for m in (
        "norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")),
    "norm_out.linear", "proj_out",
)


def matches(module: str, target: str) -> bool:
    """peft's rule for a list of target names: the whole module name, or its ending after a dot."""
    return module == target or module.endswith(f".{target}")


def nameable_targets(linears: tuple[str, ...] = FLUX_LINEARS, nameable=kohya_nameable) -> list[str]:
    """The targets the kohya exporter can name, shortest form first seen (``attn.to_q``, ``proj_mlp``, ...)."""
    out: list[str] = []
    for name in linears:
        short = name.split(".{i}.", 1)[-1]
        if nameable(name.replace("{i}", "0")) and short not in out:
            out.append(short)
    return out


def check_target_modules(targets: list[str], linears: tuple[str, ...] = FLUX_LINEARS, nameable=kohya_nameable,
                         model: str = "FLUX", containers: tuple[str, ...] = ()) -> None:
    """Raise ConfigError (one line) for a target matching no layer, or a layer the kohya exporter can't name.
    ``linears`` / ``nameable`` / ``model``: the family's (``flywheel.training.families``); FLUX.1 by default.
    ``containers``: non-Linear modules whose names a target could also match (peft refuses those)."""
    layers = {name.replace("{i}", "0"): name.replace("{i}", "N") for name in linears}
    for target in targets:
        box = next((c.replace("{i}", "N") for c in containers if matches(c.replace("{i}", "0"), target)), None)
        if box is not None:  # peft would stop at it after the loading: it only wraps Linear layers
            raise ConfigError(f"[train] target_modules entry {target!r} also matches {box}, which is not a Linear "
                              f"layer of the {model} transformer", hint=f"name the layer in full, e.g. "
                              f"'single_transformer_blocks.0.{target}', or pick from: "
                              + ", ".join(nameable_targets(linears, nameable)))
        hit = [name for name in layers if matches(name, target)]
        unnamed = [layers[name] for name in hit if not nameable(name)]
        if hit and not unnamed:
            continue
        problem = (f"has no kohya name (it matches {unnamed[0]})" if hit
                   else f"matches no linear layer of the {model} transformer")
        raise ConfigError(
            f"[train] target_modules entry {target!r} {problem}; the kohya exporter names: "
            + ", ".join(nameable_targets(linears, nameable)),
            hint="set [train] target_modules in flywheel.toml to entries from that list, e.g. "
                 "[\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]",
        )
