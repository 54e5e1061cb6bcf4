"""ScriptedVLM: a test double for ``VisionLanguageModel`` that answers from queues a test fills.

It is deliberately not a model: it never looks at the images. A test enqueues the exact text (or
option probabilities) the "model" returns, runs a stage, then asserts on the answers' effect and on
the prompts the stage sent (``requests``). An empty queue raises, so a stage that asks more questions
than the test expected fails loudly instead of receiving a made-up answer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flywheel.errors import ModelOutputError
from flywheel.models.base import ChatRequest

# An answer is either a fixed value or a function of the request (e.g. to echo part of the prompt).
TextAnswer = str | Callable[[ChatRequest], str]
ProbAnswer = Mapping[str, float] | Callable[[ChatRequest, list[str]], Mapping[str, float]]


@dataclass
class RecordedCall:
    """One request the scripted model received, with the method and arguments it came through."""

    method: str  # "generate" or "option_probabilities"
    request: ChatRequest
    kwargs: dict[str, Any] = field(default_factory=dict)


class ScriptedVLM:
    """A ``VisionLanguageModel`` whose answers are scripted by the test (see module docstring)."""

    def __init__(self, model_id: str = "scripted-vlm"):
        self.model_id = model_id
        self._texts: deque[TextAnswer] = deque()
        self._probs: deque[ProbAnswer] = deque()
        self.calls: list[RecordedCall] = []

    # -- scripting ---------------------------------------------------------------------------------
    def enqueue(self, *texts: TextAnswer | Iterable[TextAnswer]) -> ScriptedVLM:
        """Queue answers for ``generate``, one per request, in order. Accepts strings, callables or lists."""
        for item in texts:
            if isinstance(item, str) or callable(item):
                self._texts.append(item)
            else:
                self._texts.extend(item)
        return self

    def enqueue_probabilities(self, *answers: ProbAnswer | Iterable[ProbAnswer]) -> ScriptedVLM:
        """Queue answers for ``option_probabilities``: mappings like ``{"yes": 0.9, "no": 0.1}``."""
        for item in answers:
            if isinstance(item, Mapping) or callable(item):
                self._probs.append(item)
            else:
                self._probs.extend(item)
        return self

    @property
    def pending(self) -> tuple[int, int]:
        """(generate answers, probability answers) still queued; tests assert both reach zero."""
        return len(self._texts), len(self._probs)

    @property
    def requests(self) -> list[ChatRequest]:
        return [c.request for c in self.calls]

    def prompts(self, method: str | None = None) -> list[str]:
        """The text of every request received (optionally only those of one method)."""
        return [c.request.text for c in self.calls if method is None or c.method == method]

    # -- VisionLanguageModel -----------------------------------------------------------------------
    def generate(self, requests: list[ChatRequest], *, max_new_tokens: int = 128, seed: int | None = None) -> list[str]:
        out = []
        for req in requests:
            self.calls.append(RecordedCall("generate", req, {"max_new_tokens": max_new_tokens, "seed": seed}))
            if not self._texts:
                raise ModelOutputError(
                    f"ScriptedVLM.generate got a request but its queue is empty (prompt: {req.text[:80]!r})",
                    hint="the stage asked more questions than the test scripted: enqueue() one answer per request",
                )
            answer = self._texts.popleft()
            out.append(answer(req) if callable(answer) else answer)
        return out

    def option_probabilities(self, requests: list[ChatRequest], options: list[str]) -> list[dict[str, float]]:
        out = []
        for req in requests:
            self.calls.append(RecordedCall("option_probabilities", req, {"options": list(options)}))
            if not self._probs:
                raise ModelOutputError(
                    "ScriptedVLM.option_probabilities got a request but its queue is empty "
                    f"(prompt: {req.text[:80]!r})",
                    hint="enqueue_probabilities() one mapping per request, e.g. {'yes': 0.9, 'no': 0.1}",
                )
            answer = self._probs.popleft()
            probs = dict(answer(req, list(options)) if callable(answer) else answer)
            missing = [o for o in options if o not in probs]
            if missing:
                raise ModelOutputError(
                    f"scripted probabilities {probs} lack options {missing}",
                    hint=f"give a probability for every option asked: {options}",
                )
            # Renormalise over the options asked, as the protocol promises of a real adapter.
            total = sum(float(probs[o]) for o in options)
            out.append({o: (float(probs[o]) / total if total > 0 else 1.0 / len(options)) for o in options})
        return out

    def params(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "scripted": True}
