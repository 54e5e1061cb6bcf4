"""A LoRA that does not load says, in one line, which LoRAs the model takes: a FLUX.2 klein model asks for a
klein LoRA from the klein base of its size, a FLUX.1 model for a FLUX.1 LoRA (the klein hint used to name
FLUX.1), and a LoRA of other layer sizes is that error, not a torch traceback."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flywheel.errors import ModelLoadError
from flywheel.models import load_text_to_image
from flywheel.models.base import TextToImageRequest

KLEIN_HINT = ("is it a FLUX.2 klein LoRA (diffusers, kohya or ComfyUI keys) trained on the klein base of this size "
              "(FLUX.2-klein-base-4B for klein 4B, FLUX.2-klein-base-9B for 9B)?")
FLUX1_HINT = "is it a FLUX.1 LoRA (diffusers or kohya keys) trained on FLUX.1-dev or this base?"


def _lora(path, in_features: int, module: str = "transformer_blocks.0.attn.to_q", out_features: int = 32):
    """A diffusers-format LoRA file on one attention projection, rank 4."""
    save_file({f"transformer.{module}.lora_A.weight": torch.randn(4, in_features),
               f"transformer.{module}.lora_B.weight": torch.randn(out_features, 4)}, str(path))
    return str(path)


def test_klein_lora_errors_name_the_klein_base_and_fit_one_line(tmp_path):
    klein = load_text_to_image("tiny-flux2-klein-base")
    other_size = _lora(tmp_path / "other_size.safetensors", 7)  # e.g. a 9B LoRA on the 4B model
    with pytest.raises(ModelLoadError) as err:
        klein.load_lora(other_size, name="other")
    (message,) = err.value.args
    assert message.startswith(f"cannot load LoRA {other_size} into tiny-flux2-klein-base: Error(s) in loading "
                              "state_dict for Flux2Transformer2DModel: size mismatch for transformer_blocks.0.attn.to_q")
    assert "\n" not in message and err.value.hint == KLEIN_HINT
    not_lora = tmp_path / "not_lora.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32)}, str(not_lora))
    with pytest.raises(ModelLoadError, match="Invalid adapter checkpoint") as err:
        klein.load_lora(str(not_lora), name="nl")
    assert err.value.hint == KLEIN_HINT
    # The failed loads left nothing behind: a LoRA of the right size loads and renders.
    klein.load_lora(_lora(tmp_path / "right.safetensors", 32), name="right")
    (image,) = klein.generate([TextToImageRequest("a photo", width=64, height=64, seed=0)])
    assert image.size == (64, 64) and [lo["name"] for lo in klein.loras] == ["right"]


def test_flux1_lora_errors_name_flux1(tmp_path):
    flux = load_text_to_image("tiny-flux")
    elsewhere = _lora(tmp_path / "elsewhere.safetensors", 32, module="no_such_block.0.proj")
    with pytest.raises(ModelLoadError, match="Target modules .* not found in the base model") as err:
        flux.load_lora(elsewhere, name="x")
    assert "\n" not in err.value.args[0] and err.value.hint == FLUX1_HINT
