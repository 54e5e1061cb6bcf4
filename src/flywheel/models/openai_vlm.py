"""Captioner and judge over an OpenAI-compatible chat completions endpoint (``[models] captioner = "api:..."``).

Works with OpenAI vision models, Qwen-VL-Max through DashScope's compatible mode
(``base_url = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"``) and local servers (vLLM, SGLang,
Ollama, LM Studio) by ``[api] base_url``. Images go as base64 PNG data URLs, downscaled to
``[api] max_image_pixels``.

Yes/no questions read the first answer token's ``top_logprobs`` when the server returns them, like the local
Qwen-VL adapter reads its logits; a server without logprobs is asked for the answer text, which gives 1/0
probabilities, and each result says which it was (``OptionProbabilities.provenance``, recorded with the
score). A refusal (the message's ``refusal``, a ``content_filter`` finish, or a content-policy 400) is an
answer with its reason: empty text for ``generate`` (``Answer.refusal``), no probabilities for questions.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
from typing import Any, Self

from PIL import Image

from flywheel.config_api import ApiConfig
from flywheel.errors import ApiError
from flywheel.models.base import ChatRequest
from flywheel.models.openai_common import (
    PREFIX,
    ApiClient,
    CallRecord,
    Recorder,
    Refused,
    usage_dict,
)

log = logging.getLogger(__name__)

_FIRST_WORD = re.compile(r"[A-Za-z]+")


class Answer(str):
    """A chat answer; ``refusal`` is the service's reason when it refused (the text is then empty)."""

    refusal: str | None

    def __new__(cls, text: str, refusal: str | None = None) -> Self:
        obj = super().__new__(cls, text)
        obj.refusal = refusal
        return obj


class OptionProbabilities(dict):
    """P(option) like every VLM returns, plus ``provenance``: how they were read (logprobs or the answer
    text), or why there are none (a refusal or an answer that is none of the options: values are None)."""

    def __init__(self, probs: dict[str, float | None], provenance: dict[str, Any]):
        super().__init__(probs)
        self.provenance = provenance


def data_url(image: Image.Image, max_pixels: int) -> str:
    """The image as a base64 PNG data URL, downscaled (never upscaled) to ``max_pixels``."""
    image = image.convert("RGB")
    w, h = image.size
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def from_logprobs(logprobs: Any, options: list[str]) -> dict[str, float] | None:
    """P(option) from the first non-blank answer token's top logprobs, renormalised; None without any."""
    tokens = getattr(logprobs, "content", None) or []
    first = next((t for t in tokens if t.token.strip()), None)
    if first is None:
        return None
    mass = dict.fromkeys(options, 0.0)
    for cand in first.top_logprobs or [first]:
        word = cand.token.strip().lower()
        starts = [o for o in options if word and o.lower().startswith(word)]
        if len(starts) == 1:  # "y" or "Yes" count for yes; a token two options share tells nothing
            mass[starts[0]] += math.exp(cand.logprob)
    total = sum(mass.values())
    return {o: m / total for o, m in mass.items()} if total > 0 else None


def from_text(text: str, options: list[str]) -> str | None:
    """The option the answer's first word is (case-insensitive), or None."""
    match = _FIRST_WORD.search(text or "")
    word = match.group(0).lower() if match else ""
    return next((o for o in options if o.lower() == word), None)


class OpenAIVLM:
    """VisionLanguageModel over chat completions (see the module docstring)."""

    def __init__(self, cfg: ApiConfig, model: str, *, recorder: Recorder | None = None):
        self.cfg, self.model = cfg, model
        self.api = ApiClient(cfg, model, recorder=recorder)
        self.model_id = f"{PREFIX}:{model}"
        self.logprobs = cfg.logprobs  # turned off for the session when the server rejects the parameter

    def params(self) -> dict[str, Any]:
        return {"model": self.model_id, "family": "openai_api", "endpoint": self.api.endpoint,
                "max_image_pixels": self.cfg.max_image_pixels, "temperature": self.cfg.temperature,
                "logprobs": self.logprobs, "concurrency": self.cfg.concurrency, "timeout_s": self.cfg.timeout_s,
                "max_retries": self.cfg.max_retries}

    def close(self) -> None:
        self.api.close()

    # -- VisionLanguageModel ---------------------------------------------------------------------------
    def generate(self, requests: list[ChatRequest], *, max_new_tokens: int = 128, seed: int | None = None) -> list[str]:
        def one(req: ChatRequest, rec: CallRecord) -> Answer:
            choice, refusal = self._chat(req, rec, max_tokens=max_new_tokens, seed=seed)
            return Answer("", refusal) if refusal else Answer(choice.message.content or "")

        return self.api.run_all("chat.completions", one, requests)

    def option_probabilities(self, requests: list[ChatRequest], options: list[str]) -> list[dict[str, float]]:
        if len(options) < 2 or len(set(options)) != len(options):
            raise ValueError(f"option_probabilities needs at least two different options, got {options!r}")

        def one(req: ChatRequest, rec: CallRecord) -> OptionProbabilities:
            extra = {"logprobs": True, "top_logprobs": 20} if self.logprobs else {}
            choice, refusal = self._chat(req, rec, max_tokens=5, **extra)
            if refusal:
                return OptionProbabilities(dict.fromkeys(options), {"answer_from": None, "refusal": refusal})
            probs = from_logprobs(choice.logprobs, options) if extra else None
            if probs is not None:
                rec.answer_from = "logprobs"
                return OptionProbabilities(probs, {"answer_from": "logprobs"})
            rec.answer_from = "answer text"
            text = choice.message.content or ""
            chosen = from_text(text, options)
            if chosen is None:
                return OptionProbabilities(dict.fromkeys(options),
                                           {"answer_from": "answer text", "unusable_answer": text[:120]})
            return OptionProbabilities({o: float(o == chosen) for o in options},
                                       {"answer_from": "answer text (the server gave no logprobs)"})

        return self.api.run_all("chat.completions", one, requests)

    # -- one request ---------------------------------------------------------------------------------------
    def _chat(self, req: ChatRequest, rec: CallRecord, **kwargs: Any) -> tuple[Any, str | None]:
        """(first choice, None) or (None, the refusal's reason)."""
        import openai

        messages: list[dict[str, Any]] = [{"role": "system", "content": req.system}] if req.system else []
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(im, self.cfg.max_image_pixels)}}
                                         for im in req.images]
        content.append({"type": "text", "text": req.text})
        messages.append({"role": "user", "content": content})
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.cfg.temperature is not None:
            kwargs["temperature"] = self.cfg.temperature
        try:
            resp = self.api.client.chat.completions.create(model=self.model, messages=messages, **kwargs)
        except openai.BadRequestError as err:
            if "logprobs" in kwargs and "logprob" in str(err.message).lower():
                log.info("%s: the server takes no logprobs; yes/no answers are read from the text", self.model_id)
                self.logprobs = False
                kwargs = {k: v for k, v in kwargs.items() if k not in ("logprobs", "top_logprobs")}
                return self._chat(req, rec, **kwargs)
            return self._refused_or_raise(err, rec)
        except openai.APIStatusError as err:
            return self._refused_or_raise(err, rec)
        rec.usage = usage_dict(resp.usage)
        if not resp.choices:
            raise ApiError(f"{self.model_id} at {self.api.endpoint} returned no answer (no choices)",
                           hint="check that [api] base_url is an OpenAI-compatible chat completions server")
        choice = resp.choices[0]
        refusal = getattr(choice.message, "refusal", None) or (
            "the service's content filter stopped the answer" if choice.finish_reason == "content_filter" else None)
        if refusal:
            rec.refusal = self.api.scrub(str(refusal))[:300]
            log.warning("%s refused a request: %s", self.model_id, rec.refusal)
            return None, rec.refusal
        return choice, None

    def _refused_or_raise(self, err: Exception, rec: CallRecord) -> tuple[None, str]:
        translated = self.api.translate(err)
        if isinstance(translated, Refused):
            rec.refusal = translated.reason
            log.warning("%s refused a request: %s", self.model_id, translated.reason)
            return None, translated.reason
        raise translated
