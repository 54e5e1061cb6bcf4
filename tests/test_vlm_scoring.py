"""The judge's yes/no scoring keeps only the last position's logits, and scores exactly as before."""

from __future__ import annotations

import pytest
from PIL import Image

from flywheel.models.base import ChatRequest


def _requests() -> list[ChatRequest]:
    red, blue = Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (64, 96), (30, 30, 200))
    return [ChatRequest("Is the picture red? Answer yes or no.", images=[red]),
            ChatRequest("Is this a long question about a blue picture? Answer yes or no.", images=[blue]),
            ChatRequest("Yes or no: is the sky green?")]


def test_option_probabilities_compute_only_the_last_logits_and_match_the_full_computation(tiny_vlm):
    import torch

    reqs = _requests()
    shapes = []
    hook = tiny_vlm.model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        got = tiny_vlm.option_probabilities(reqs, ["yes", "no"])
    finally:
        hook.remove()
    vocab = tiny_vlm.model.config.get_text_config().vocab_size
    assert shapes == [(len(reqs), 1, vocab)]  # one position per request, not the whole sequence

    # The full computation (every position's logits, batched the same way) gives the same probabilities.
    token_sets = tiny_vlm._option_tokens(["yes", "no"])
    inputs = tiny_vlm.encode(reqs)
    with torch.inference_mode():
        full = tiny_vlm.model(**inputs).logits
    assert full.shape[1] == inputs["input_ids"].shape[1] > 1
    probs = torch.softmax(full[:, -1, :].float(), dim=-1)
    for row, scores in zip(probs, got):
        mass = [float(row[list(ids)].sum()) for ids in token_sets]
        assert scores["yes"] == pytest.approx(mass[0] / sum(mass), abs=1e-6)
        assert scores["no"] == pytest.approx(mass[1] / sum(mass), abs=1e-6)
