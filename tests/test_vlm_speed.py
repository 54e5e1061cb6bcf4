"""The VLM fast path (issue 15): same captions and scores as before on CPU, the static-cache decode gives the
same answers, the pixel budget reaches the processor, ``[models] vlm_compile`` reaches the adapter, and the
caption benchmark's CI mode runs its whole code path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flywheel.config import ModelsConfig
from flywheel.models.base import ChatRequest
from flywheel.models.qwen_vl import QwenVLModel
from flywheel.models.vlm_speed import cache_length, image_kwargs, use_compiled_decode

# Captions (10 new tokens) and P(yes) of the tiny twin (seed 0) written by the adapter BEFORE the fast path
# (commit 4078495, batch_size 3), per pixel budget: the plain CPU path must keep giving exactly these.
GOLDEN = {
    1024 * 1024: ([".\bulnoswerfitto\ufffdful", "era\ufffd5\ufffd\ufffdgeswer^\ufffdron",
                   "era\ufffd\ufffd\u0013noing\u0004his\ufffdswer", "era\ufffd5\ufffd\ufffdgeswer^^\ufffd"],
                  [0.457675775, 0.495537014, 0.47383557, 0.497950625]),
    56 * 56 * 2: ([".\ufffdtch#\ufffdtch#\ufffdtch#", "era\ufffd5ntera\ufffd5ntera\ufffd",
                   "era\ufffd\ufffd\u0013noing\u0004his\ufffdswer", "era\ufffd5We\ufffd;\u001ba\ufffd"],
                  [0.46255821, 0.485446184, 0.473835592, 0.484283394]),
}


def _requests() -> list[ChatRequest]:
    # Sizes over and under the budgets, two images in one prompt, an RGBA image and a text-only prompt.
    return [ChatRequest("Describe the image.", [Image.new("RGB", (300, 200), "red")]),
            ChatRequest("Same person? Answer yes or no.",
                        [Image.new("RGB", (64, 64), "blue"), Image.new("RGBA", (90, 120), "green")], system="You judge."),
            ChatRequest("Answer yes or no: is the sky blue?"),
            ChatRequest("Describe.", [Image.effect_mandelbrot((333, 251), (-2, -1.2, 1, 1.2), 50).convert("RGB")])]


def _adapter(tiny_vlm, budget: int, **kw) -> QwenVLModel:
    """A second adapter over the session's tiny model (the shared fixture is never mutated)."""
    return QwenVLModel(tiny_vlm.model, tiny_vlm.processor, model_id="tiny", device="cpu", max_pixels=budget,
                       batch_size=3, **kw)


@pytest.mark.parametrize("budget", sorted(GOLDEN))
def test_cpu_captions_and_scores_are_the_same_as_before_the_fast_path(tiny_vlm, budget):
    vlm = _adapter(tiny_vlm, budget)
    assert vlm.compiled_decode is False  # "auto" on CPU: the plain path
    captions, p_yes = GOLDEN[budget]
    assert vlm.generate(_requests(), max_new_tokens=10) == captions
    got = [p["yes"] for p in vlm.option_probabilities(_requests(), ["yes", "no"])]
    assert got == pytest.approx(p_yes, abs=1e-6)


def test_static_cache_decode_gives_the_same_captions_as_the_default_cache(tiny_vlm, tiny_vlm_dir, monkeypatch):
    """vlm_compile = "on": static KV cache, the compiled decode step (dynamo's eager backend keeps this test
    fast on CPU; inductor with CUDA graphs runs on a GPU) and the grouped-query decode attention: greedy
    answers are unchanged, also for a second batch of another size and prompt length (a new cache shape)."""
    import torch

    from flywheel.models import load_vlm
    from flywheel.models.vlm_speed import GQA_DECODE_ATTENTION

    plain = _adapter(tiny_vlm, 1024 * 1024)
    fresh = load_vlm(str(tiny_vlm_dir))  # its own model: the fast path switches the text decoder's attention
    fast = QwenVLModel(fresh.model, fresh.processor, model_id="tiny", device="cpu", max_pixels=1024 * 1024,
                       batch_size=3, compile="on")
    fast.compile_backend = "eager"
    text = fast.model.config.get_text_config()
    assert fast.compiled_decode and fast.params()["compiled_decode"] is True
    assert text._attn_implementation == GQA_DECODE_ATTENTION
    assert fast.model.config.vision_config._attn_implementation == "sdpa"  # the vision tower keeps its own
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: shapes.append(tuple(q.shape)) or sdpa(q, *a, **kw))
    calls = []
    run = fast.model.generate
    monkeypatch.setattr(fast.model, "generate", lambda **kw: calls.append(kw) or run(**kw))
    reqs = _requests()
    assert fast.generate(reqs, max_new_tokens=10) == plain.generate(reqs, max_new_tokens=10) == GOLDEN[1024 * 1024][0]
    # The short last batch (1 request) took the compiled shape (filled up with copies of its request, their
    # answers dropped), and its shorter prompt kept the longer cache: neither is a new shape to compile.
    assert [len(c["input_ids"]) for c in calls] == [3, 3]
    assert calls[1]["input_ids"].shape[1] < calls[0]["input_ids"].shape[1]
    assert calls[0]["max_cache_len"] == calls[1]["max_cache_len"]
    groups = text.num_attention_heads // text.num_key_value_heads
    # Decode steps ran with the query heads folded onto their key/value head (one query position each).
    assert (3, text.num_key_value_heads, groups, text.hidden_size // text.num_attention_heads) in shapes
    assert fast.generate(reqs[1:3], max_new_tokens=6) == plain.generate(reqs[1:3], max_new_tokens=6)


def test_vlm_compile_setting_resolves_per_device_and_reaches_the_adapter(tiny_vlm_dir):
    from flywheel.errors import ConfigError
    from flywheel.models import load_vlm

    from flywheel.models.vlm_speed import COMPILE_PAYS_OFF, COMPILE_PAYS_OFF_WARM

    assert use_compiled_decode("auto", "cuda", "none") and not use_compiled_decode("auto", "cpu", "none")
    # "auto" compiles for a stage big enough to win the compilation back, not for a handful of requests.
    assert use_compiled_decode("auto", "cuda", "none", requests=COMPILE_PAYS_OFF)
    assert not use_compiled_decode("auto", "cuda", "none", requests=COMPILE_PAYS_OFF - 1)
    assert use_compiled_decode("on", "cuda", "none", requests=1)
    # Compiled on this machine before (inductor's cache holds the graphs): compiling is cheap, and pays sooner.
    assert COMPILE_PAYS_OFF_WARM < COMPILE_PAYS_OFF
    assert use_compiled_decode("auto", "cuda", "none", requests=COMPILE_PAYS_OFF_WARM, warm=True)
    assert not use_compiled_decode("auto", "cuda", "none", requests=COMPILE_PAYS_OFF_WARM - 1, warm=True)
    assert not use_compiled_decode("auto", "cpu", "none", requests=10**6, warm=True)
    assert not use_compiled_decode("auto", "cuda", "nf4")  # bitsandbytes layers do not compile
    assert use_compiled_decode("on", "cpu", "none") and not use_compiled_decode("off", "cuda", "none")
    with pytest.raises(ConfigError, match="vlm_compile"):
        use_compiled_decode("fast", "cuda", "none")
    assert ModelsConfig().vlm_compile == "auto"
    vlm = load_vlm(str(tiny_vlm_dir), ModelsConfig(vlm_compile="off"))
    assert vlm.params()["compile"] == "off" and vlm.params()["compiled_decode"] is False
    with pytest.raises(ValueError, match="vlm_compile"):
        ModelsConfig(vlm_compile="yes")


def test_the_stage_size_decides_the_compiled_decode_once(tiny_vlm, monkeypatch):
    """``expect`` (the caption stage's size) or a call's own size decides; once compiled, a process stays
    compiled (the compilation is paid for). The threshold is patched: "auto" never compiles on a CPU."""
    from flywheel.models import vlm_speed

    monkeypatch.setattr(vlm_speed, "use_compiled_decode", lambda setting, device, quant, requests=None, warm=False:
                        setting == "auto" and requests is not None and requests >= 3)
    vlm = _adapter(tiny_vlm, 56 * 56 * 2)
    vlm.compile_backend = "eager"
    assert not vlm.compiled_decode
    vlm.expect(2)
    vlm.generate(_requests()[:1], max_new_tokens=2)
    assert not vlm.compiled_decode and vlm.params()["compiled_decode"] is False
    vlm.expect(5)
    vlm.generate(_requests()[:1], max_new_tokens=2)
    assert vlm.compiled_decode
    vlm.expect(1)
    vlm.generate(_requests()[:1], max_new_tokens=2)
    assert vlm.compiled_decode


def test_a_compiled_decode_step_is_remembered_in_the_compile_cache_it_depends_on(tmp_path):
    """The marker lives in inductor's cache folder, keyed by what the compiled step depends on: the same
    key finds it, another model, batch size or library version does not, and a wiped cache forgets it."""
    from flywheel.models.vlm_speed import compile_marker, compiled_before, remember_compiled

    key = {"model": "qwen2-vl-2b", "batch": 16, "torch": "2.11.0", "transformers": "5.17.0", "gpu": "H200"}
    marker = compile_marker(key, str(tmp_path))
    assert not compiled_before(marker)
    remember_compiled(marker, key)
    assert compiled_before(compile_marker(dict(key), str(tmp_path)))
    assert not compiled_before(compile_marker({**key, "batch": 64}, str(tmp_path)))
    assert not compiled_before(compile_marker({**key, "torch": "2.12.0"}, str(tmp_path)))
    assert not compiled_before(compile_marker(key, str(tmp_path / "wiped")))
    remember_compiled(compile_marker(key, "/proc/not-writable"), key)  # an unwritable cache is not an error
    assert not compiled_before(None)


def test_pixel_budget_reaches_the_processor_as_its_max_pixels(tiny_vlm):
    ip = tiny_vlm.processor.image_processor
    own = ip.size["longest_edge"]  # the model's own limit (112² for the tiny twin)
    assert image_kwargs(ip, 56 * 56 * 2, None) == {"size": {"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 2}}
    assert image_kwargs(ip, 10**8, None)["size"]["longest_edge"] == own  # a budget never raises the model's limit
    assert image_kwargs(ip, 56 * 56, "cpu")["device"] == "cpu"  # torchvision processors run where they are told
    # On a GPU images skip the PIL fit and the processor applies the budget: the same number of image tokens.
    vlm = _adapter(tiny_vlm, 56 * 56 * 2)
    req = [ChatRequest("Describe.", [Image.new("RGB", (1000, 800), "white")])]
    cpu = vlm.encode(req)
    vlm.device = "cuda"  # the GPU branch of encode; the model, so the processor's device, stays the CPU
    gpu = vlm.encode(req)
    assert gpu["pixel_values"].shape == cpu["pixel_values"].shape
    assert gpu["image_grid_thw"].tolist() == cpu["image_grid_thw"].tolist()
    assert int(cpu["image_grid_thw"].prod()) * 14 * 14 <= 56 * 56 * 2


def test_static_cache_lengths_are_rounded_up_so_similar_prompts_share_a_shape():
    assert cache_length(1255, 128) == cache_length(1300, 128) == 1536
    assert cache_length(128, 128) == 256 and cache_length(129, 128) == 512


@pytest.mark.slow
def test_caption_benchmark_ci_mode_runs_every_path(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vlm_caption.py"
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device: cpu" in proc.stdout and "goal 15 images/s" in proc.stdout
    paths = {(r["path"], r["batch"]) for r in json.loads(out.read_text())["rows"]}
    assert paths == {("preprocessing, CPU (before)", 3), ("preprocessing, model's device", 3),
                     ("flywheel caption, compiled decode", 2), ("flywheel caption, compiled decode", 3),
                     ("plain generate, static cache", 2), ("plain generate, static cache", 3),
                     ("plain generate, dynamic cache", 2), ("plain generate, dynamic cache", 3),
                     ("flywheel caption, decode not compiled", 2),
                     ("judge yes/no scoring", 2), ("judge yes/no scoring", 3)}
