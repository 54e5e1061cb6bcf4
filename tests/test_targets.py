"""[train] target_modules the kohya exporter can't name are refused before any model loads."""

from __future__ import annotations

import re

import pytest

from flywheel.errors import ConfigError
from flywheel.training.targets import FLUX_LINEARS, check_target_modules, matches, nameable_targets

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "attn.to_q", "proj_out", "proj_mlp", "linear", "norm.linear",
           "norm1.linear", "linear_1", "ff.net.2", "net.2", "x_embedder", "context_embedder", "attn", "to_add_out",
           "norm_out.linear", "transformer_blocks.0.attn.to_q", "0.proj"]


def test_layer_names_and_matching_are_the_real_ones():
    """The static list is FluxTransformer2DModel's Linear layers, and the matching is peft's own."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                       axes_dims_rope=(4, 6, 6))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    templates = {re.sub(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.", r"\1.{i}.", n) for n in linears}
    assert templates == set(FLUX_LINEARS)
    for target in TARGETS:
        cfg = LoraConfig(target_modules=[target])
        assert [n for n in linears if check_target_module_exists(cfg, n)] == [n for n in linears if matches(n, target)]


def test_what_the_kohya_exporter_names_passes_and_the_rest_is_refused():
    from flywheel.config import TrainConfig
    from flywheel.training.lora_io import to_kohya

    check_target_modules(TrainConfig().target_modules)  # the default
    check_target_modules(nameable_targets())  # everything listed as nameable really is
    assert nameable_targets()[:2] == ["context_embedder", "x_embedder"] and "attn.to_q" in nameable_targets()
    with pytest.raises(ConfigError) as err:
        check_target_modules(["to_q", "linear"])
    assert err.value.args[0].startswith("[train] target_modules entry 'linear' has no kohya name (it matches "
                                        "norm_out.linear); the kohya exporter names: context_embedder, x_embedder, ")
    assert "\n" not in err.value.args[0]
    with pytest.raises(ConfigError, match="'attn' matches no linear layer of the FLUX transformer"):
        check_target_modules(["attn"])
    with pytest.raises(ConfigError, match=r"'linear_1' has no kohya name \(it matches time_text_embed"):
        check_target_modules(["linear_1"])
    # The claim behind the check: a LoRA on a listed layer converts, one on norm_out.linear does not.
    import torch

    lora = {"transformer.single_transformer_blocks.0.norm.linear.lora_A.weight": torch.zeros(2, 4),
            "transformer.single_transformer_blocks.0.norm.linear.lora_B.weight": torch.zeros(8, 2)}
    assert "lora_unet_single_blocks_0_modulation_lin.lora_down.weight" in to_kohya(lora, {})
    bad = {k.replace("single_transformer_blocks.0.norm.linear", "norm_out.linear"): v for k, v in lora.items()}
    with pytest.raises(Exception, match="no kohya name"):
        to_kohya(bad, {})


def test_train_refuses_the_target_before_loading(project, monkeypatch):
    from click.testing import CliRunner

    import flywheel.train as train_mod
    from flywheel.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the model was about to load")

    monkeypatch.setattr(train_mod, "_run", never)  # where the FLUX pipeline loads
    cfg = project.root / "flywheel.toml"
    text = cfg.read_text(encoding="utf-8").replace('# base = "flux2-klein-base-4b"', 'base = "tiny"')  # no GPU here
    default = 'target_modules = ["to_q", "to_k", "to_v", "to_out.0"]'
    assert text.count(default) == 1
    cfg.write_text(text.replace(default, 'target_modules = ["to_q", "linear"]'), encoding="utf-8")
    r = CliRunner().invoke(main, ["-C", str(project.root), "train", "--force"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "Error: [train] target_modules entry 'linear' has no kohya name (it matches norm_out.linear)" in r.output
    assert 'Hint: set [train] target_modules in flywheel.toml to entries from that list' in r.output
    assert project.catalog.query("SELECT COUNT(*) FROM lora_runs")[0][0] == 0
