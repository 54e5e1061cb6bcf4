"""The Qwen-VL adapter on tiny random Qwen2-VL / Qwen2.5-VL folders, loaded like real downloads."""

from __future__ import annotations

import pytest
from PIL import Image

from flywheel.config import ModelsConfig
from flywheel.errors import ConfigError, MissingExtraError, ModelLoadError
from flywheel.models import load_vlm
from flywheel.models.base import ChatRequest, VisionLanguageModel
from flywheel.models.qwen_vl import fit_pixels, quantization_config


def _requests() -> list[ChatRequest]:
    # Different image counts and sizes and one text-only prompt: the prompts pad to different lengths.
    return [
        ChatRequest("Describe the image.", [Image.new("RGB", (300, 200), "red")]),
        ChatRequest("Is it the same person? Answer yes or no.",
                    [Image.new("RGB", (64, 64), "blue"), Image.new("RGB", (90, 120), "green")], system="You judge."),
        ChatRequest("Answer yes or no: is the sky blue?"),
    ]


def test_tiny_vlm_loads_from_folder_and_generates(tiny_vlm):
    assert isinstance(tiny_vlm, VisionLanguageModel)
    out = tiny_vlm.generate(_requests(), max_new_tokens=5)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    params = tiny_vlm.params()
    assert params["device"] == "cpu" and params["dtype"] == "torch.float32" and params["quantization"] == "none"


@pytest.mark.parametrize("variant, cls", [("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                                          ("qwen3_vl", "Qwen3VLForConditionalGeneration")])
def test_newer_qwen_vl_families_load_through_the_same_adapter(tmp_path, variant, cls):
    from flywheel.testing.tiny.vlm import build_tiny_qwen2_vl

    folder = build_tiny_qwen2_vl(tmp_path / variant, variant)
    vlm = load_vlm(str(folder))
    assert type(vlm.model).__name__ == cls
    reqs = _requests()
    batched = vlm.generate(reqs, max_new_tokens=4)
    assert batched == [vlm.generate([r], max_new_tokens=4)[0] for r in reqs]  # left padding holds here too
    for probs in vlm.option_probabilities(reqs, ["yes", "no"]):
        assert probs["yes"] + probs["no"] == pytest.approx(1.0)


def test_batched_generation_equals_one_request_at_a_time(tiny_vlm):
    """Left padding: batching must not change any answer (right padding would)."""
    reqs = _requests()
    batched = tiny_vlm.generate(reqs, max_new_tokens=6)
    single = [tiny_vlm.generate([r], max_new_tokens=6)[0] for r in reqs]
    assert batched == single


def test_option_probabilities_are_the_first_token_distribution(tiny_vlm):
    """Batched scores equal a softmax over an unpadded single forward, summed over yes/Yes and no/No."""
    import torch

    reqs = _requests()
    got = tiny_vlm.option_probabilities(reqs, ["yes", "no"])
    tok = tiny_vlm.processor.tokenizer
    yes = [tok.convert_tokens_to_ids(t) for t in ("yes", "Yes")]
    no = [tok.convert_tokens_to_ids(t) for t in ("no", "No")]
    for req, scores in zip(reqs, got):
        inputs = tiny_vlm.encode([req])
        with torch.no_grad():
            p = torch.softmax(tiny_vlm.model(**inputs).logits[0, -1].float(), -1)
        expected_yes = float(p[yes].sum() / (p[yes].sum() + p[no].sum()))
        assert scores["yes"] == pytest.approx(expected_yes, abs=1e-4)
        assert scores["yes"] + scores["no"] == pytest.approx(1.0)


def test_options_that_share_a_first_token_are_refused(tiny_vlm):
    with pytest.raises(ConfigError, match="same token") as err:
        tiny_vlm.option_probabilities(_requests()[:1], ["no", "no way"])
    assert "different words" in err.value.hint
    with pytest.raises(ConfigError):
        tiny_vlm.option_probabilities(_requests()[:1], ["yes"])


def test_pixel_budget_sets_the_number_of_image_tokens(tiny_vlm_dir):
    big = ChatRequest("Describe.", [Image.new("RGB", (1000, 800), "white")])
    counts = {}
    for budget in (56 * 56, 112 * 112):
        vlm = load_vlm(str(tiny_vlm_dir), ModelsConfig(vlm_max_pixels=budget))
        assert vlm.params()["max_pixels"] == budget
        ids = vlm.encode([big])["input_ids"][0].tolist()
        counts[budget] = ids.count(vlm.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    # About one token per 28x28 pixels of the budget: 112² allows at most 16 (the processor's own
    # minimum of 56² pixels lifts the smaller budget a little above 4).
    assert counts[56 * 56] < counts[112 * 112] <= 16


def test_fit_pixels_downscales_to_the_budget_and_never_upscales():
    small = Image.new("RGB", (100, 50))
    assert fit_pixels(small, 1024 * 1024).size == (100, 50)
    out = fit_pixels(Image.new("RGBA", (4000, 3000)), 1024 * 1024)
    w, h = out.size
    assert w * h <= 1024 * 1024 and w % 28 == 0 and h % 28 == 0 and out.mode == "RGB"
    assert abs(w / h - 4 / 3) < 0.05


def test_seeded_sampling_is_reproducible(tiny_vlm_dir):
    vlm = load_vlm(str(tiny_vlm_dir), generation={"do_sample": True, "temperature": 1.5, "top_k": 0})
    reqs = _requests()[:2]
    assert vlm.generate(reqs, max_new_tokens=8, seed=7) == vlm.generate(reqs, max_new_tokens=8, seed=7)
    assert vlm.params()["generation"]["do_sample"] is True


def test_quantization_without_cuda_is_a_clear_error(tiny_vlm_dir):
    with pytest.raises(ConfigError, match="CUDA") as err:
        load_vlm(str(tiny_vlm_dir), ModelsConfig(quantization="nf4", device="cpu"))
    assert 'quantization = "none"' in err.value.hint


def test_nf4_builds_a_bitsandbytes_config_or_names_the_extra():
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError) as err:
            quantization_config("nf4", torch.bfloat16)
        assert "character-flywheel[gpu]" in err.value.hint
        return
    cfg = quantization_config("nf4", torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_compute_dtype == torch.bfloat16


def test_a_folder_that_is_not_a_vlm_is_refused(tmp_path, tiny_pix2pix_dir):
    with pytest.raises(ConfigError, match="captioner/judge"):
        load_vlm(str(tiny_pix2pix_dir))
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    (llm / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="'qwen2' model"):
        load_vlm(str(llm))


@pytest.mark.gpu
def test_nf4_on_gpu_generates(tiny_vlm_dir):
    vlm = load_vlm(str(tiny_vlm_dir), ModelsConfig(quantization="nf4", device="cuda"))
    assert vlm.params()["quantization"] == "nf4"
    assert len(vlm.generate(_requests(), max_new_tokens=4)) == 3
