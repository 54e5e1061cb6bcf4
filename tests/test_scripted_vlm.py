"""ScriptedVLM: the test double stages are tested with; it must fail loudly, never invent answers."""

from __future__ import annotations

import pytest
from PIL import Image

from flywheel.errors import ModelOutputError
from flywheel.models.base import ChatRequest, VisionLanguageModel
from flywheel.testing.scripted import ScriptedVLM


def req(text: str) -> ChatRequest:
    return ChatRequest(text=text, images=[Image.new("RGB", (8, 8))])


def test_answers_come_back_in_order_and_every_request_is_recorded():
    vlm = ScriptedVLM().enqueue("first", ["second", lambda r: f"echo {r.text}"])
    assert isinstance(vlm, VisionLanguageModel)
    assert vlm.generate([req("a"), req("b")], max_new_tokens=7) == ["first", "second"]
    assert vlm.generate([req("c")]) == ["echo c"]
    assert vlm.prompts() == ["a", "b", "c"]
    assert vlm.calls[0].kwargs["max_new_tokens"] == 7 and len(vlm.requests[0].images) == 1
    assert vlm.pending == (0, 0)


def test_an_empty_queue_raises_a_clear_error():
    vlm = ScriptedVLM().enqueue("only one")
    with pytest.raises(ModelOutputError, match="queue is empty") as err:
        vlm.generate([req("a"), req("unexpected question")])
    assert "enqueue" in err.value.hint and "unexpected question" in str(err.value)
    with pytest.raises(ModelOutputError, match="queue is empty"):
        vlm.option_probabilities([req("a")], ["yes", "no"])


def test_probabilities_are_renormalised_over_the_options_asked():
    vlm = ScriptedVLM().enqueue_probabilities({"yes": 0.6, "no": 0.2, "maybe": 0.2}, lambda r, o: {"yes": 1, "no": 3})
    first, second = vlm.option_probabilities([req("q1"), req("q2")], ["yes", "no"])
    assert first == pytest.approx({"yes": 0.75, "no": 0.25})
    assert second == pytest.approx({"yes": 0.25, "no": 0.75})
    assert vlm.calls[1].kwargs["options"] == ["yes", "no"] and vlm.prompts("option_probabilities") == ["q1", "q2"]


def test_a_scripted_answer_missing_an_option_is_an_error():
    vlm = ScriptedVLM().enqueue_probabilities({"yes": 1.0})
    with pytest.raises(ModelOutputError, match="lack options"):
        vlm.option_probabilities([req("q")], ["yes", "no"])
