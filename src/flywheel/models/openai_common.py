"""What every OpenAI-compatible adapter shares: the client, the key, errors, and one catalog row per call.

A role uses a service when ``[models]`` names it ``"api"`` or ``"api:<model>"`` (``flywheel.config_api``).
The ``openai`` client does the HTTP work, the retries with backoff on 408/409/429/5xx and connection errors
(honouring ``Retry-After`` / ``retry-after-ms`` up to its cap) and the timeouts; ``[api]`` sets how many
retries and how long. Requests of one batch run ``concurrency`` at a time in threads; their catalog rows are
written afterwards from the calling thread (SQLite writes stay on one thread).

The key is read from the environment variable ``[api] api_key_env`` names and lives only in the client:
error text is scrubbed of it (servers echo keys in 401 messages), and the endpoint is recorded without
credentials or query strings.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from flywheel.errors import ApiError, ConfigError, MissingExtraError

if TYPE_CHECKING:
    from flywheel.catalog.db import Catalog
    from flywheel.config_api import ApiConfig

log = logging.getLogger(__name__)

PREFIX = "api"
# Error codes (OpenAI, DashScope) and words that mean "the service will not do this for policy reasons".
REFUSAL_CODES = {"content_policy_violation", "moderation_blocked", "data_inspection_failed", "content_filter"}
_REFUSAL_WORDS = re.compile(r"content[ _-]policy|safety system|moderation|inappropriate content", re.IGNORECASE)
_KEYLIKE = re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-*.]{6,}|Bearer\s+\S+")  # OpenAI-style keys, bearer tokens


def is_api_spec(spec: str) -> bool:
    return spec == PREFIX or spec.startswith(PREFIX + ":")


class Refused(ApiError):
    """The service refused the request (content policy); ``reason`` is its own words, scrubbed."""

    def __init__(self, message: str, *, reason: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.reason = reason


@dataclass
class CallRecord:
    """One HTTP call as the catalog records it (``params.action = "api_call"``): never the key."""

    endpoint: str
    api: str  # chat.completions / images.edit / images.generate
    model: str
    latency_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    refusal: str | None = None
    answer_from: str | None = None  # yes/no questions: "logprobs" or "answer text"

    def params(self) -> dict[str, Any]:
        out = {"action": "api_call", "endpoint": self.endpoint, "api": self.api, "model": self.model,
               "latency_s": round(self.latency_s, 3), "usage": self.usage, "images": self.images,
               "estimated_cost_usd": round(self.cost_usd, 6)}
        if self.refusal is not None:
            out["refusal"] = self.refusal
        if self.answer_from is not None:
            out["answer_from"] = self.answer_from
        return out


Recorder = Callable[[CallRecord], None]


class ApiClient:
    """The ``openai`` client for one endpoint and model, with key scrubbing, call records and a thread pool."""

    def __init__(self, cfg: ApiConfig, model: str, *, recorder: Recorder | None = None):
        try:
            import openai
        except ImportError:
            raise MissingExtraError("openai", "api", "an OpenAI-compatible service ([api])") from None
        self.cfg, self.model, self.recorder = cfg, model, recorder
        self.endpoint = public_endpoint(cfg.base_url)
        secret = ""
        if cfg.api_key_env:
            secret = os.environ.get(cfg.api_key_env, "")
            if not secret:
                raise ConfigError(f"[api] api_key_env = '{cfg.api_key_env}', but that environment variable is not set",
                                  hint=f"export {cfg.api_key_env}=<your key for {self.endpoint}>, or set "
                                  "api_key_env = \"\" for a local server that needs no key")
        self._secret = secret
        # A local server without auth still gets a placeholder: the client refuses an empty key.
        self.client = openai.OpenAI(api_key=secret or "no-key", base_url=cfg.base_url, timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)

    # -- running calls ---------------------------------------------------------------------------------
    def run_all(self, api: str, fn: Callable[[Any, CallRecord], Any], items: list[Any]) -> list[Any]:
        """``fn(item, record)`` for every item, ``concurrency`` at a time; one catalog row per call. A failed
        call fails the batch with an ``ApiError`` (after the other calls finish and are recorded)."""
        import openai

        records = [CallRecord(self.endpoint, api, self.model) for _ in items]

        def one(i: int) -> tuple[Any, BaseException | None]:
            t0 = time.perf_counter()
            try:
                return fn(items[i], records[i]), None
            except (openai.APIError, ApiError, ValueError, OSError) as err:  # raised once every call is recorded
                return None, self.translate(err)
            finally:
                records[i].latency_s = time.perf_counter() - t0

        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, max(1, len(items)))) as pool:
            results = list(pool.map(one, range(len(items))))
        for rec, (_, err) in zip(records, results):
            if err is not None:
                rec.error = str(err).split("\n")[0]
                if isinstance(err, Refused):
                    rec.refusal = err.reason
            rec.cost_usd = self.cost(rec)
            if self.recorder is not None:
                self.recorder(rec)
        for _, err in results:
            if err is not None:
                raise err
        return [r for r, _ in results]

    def close(self) -> None:
        """Close the HTTP connections (the pool calls its adapters' ``close`` when it releases them)."""
        self.client.close()

    def cost(self, rec: CallRecord) -> float:
        u = rec.usage
        tokens_in = u.get("prompt_tokens", u.get("input_tokens", 0)) or 0
        tokens_out = u.get("completion_tokens", u.get("output_tokens", 0)) or 0
        return (tokens_in * self.cfg.cost_per_1k_input_tokens + tokens_out * self.cfg.cost_per_1k_output_tokens) / 1000 \
            + rec.images * self.cfg.cost_per_image

    # -- errors ----------------------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """``text`` without the key (whole or in a server's 'sk-ab***yz' echo) and without bearer tokens."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return _KEYLIKE.sub("***", text)

    def translate(self, err: Exception) -> ApiError:
        """An ``openai`` exception as a one-line ``ApiError`` naming the endpoint and model (never the key)."""
        import openai

        where = f"{PREFIX}:{self.model} at {self.endpoint}"
        retries = f"after {self.cfg.max_retries} retr{'y' if self.cfg.max_retries == 1 else 'ies'}"
        if isinstance(err, ApiError):
            return err
        if isinstance(err, openai.APITimeoutError):
            return ApiError(f"{where}: no answer within {self.cfg.timeout_s:g} s ({retries})",
                            hint="re-run to retry what failed (finished work is kept); or raise [api] timeout_s")
        if isinstance(err, openai.APIConnectionError):
            return ApiError(f"{where}: cannot connect ({retries})",
                            hint="check [api] base_url and that the server is running; re-run to retry")
        if isinstance(err, openai.APIStatusError):
            body = err.body if isinstance(err.body, dict) else {}
            inner = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
            code = str(inner.get("code") or body.get("code") or "")
            message = self.scrub(" ".join(str(inner.get("message") or err.message).split()))[:300]
            if code in REFUSAL_CODES or (err.status_code == 400 and _REFUSAL_WORDS.search(message)):
                return Refused(f"{where} refused the request (content policy): {message}", reason=message,
                               hint="the service will not process this image or prompt; the judge or a "
                               "local editor can take it instead")
            if err.status_code in (401, 403):
                return ApiError(f"{where}: HTTP {err.status_code}: {message}",
                                hint=f"check the key in the environment variable {self.cfg.api_key_env or '(none)'} "
                                "([api] api_key_env) and that it may use this model")
            if err.status_code == 429 or err.status_code >= 500:
                return ApiError(f"{where}: HTTP {err.status_code} {retries}: {message}",
                                hint="the service is busy or failing; re-run later to retry what failed "
                                "(finished work is kept), or lower [api] concurrency")
            return ApiError(f"{where}: HTTP {err.status_code}: {message}",
                            hint="check [api] model names and settings against the service's documentation")
        if isinstance(err, (openai.APIError, ValueError, OSError)):  # e.g. a body that is not the API's JSON or
            return ApiError(f"{where}: unusable response: {self.scrub(str(err))[:200]}",  # an image PIL cannot read
                            hint="the server's answer is not what the OpenAI API returns; check [api] base_url")
        raise err  # anything else is a bug: keep its traceback


def public_endpoint(url: str) -> str:
    """``url`` without user:password@ and without a query string or fragment (they can carry keys)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def usage_dict(usage: Any) -> dict[str, Any]:
    """The response's usage object as plain numbers (nested detail objects dropped)."""
    if usage is None:
        return {}
    data = usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
    return {k: v for k, v in data.items() if isinstance(v, (int, float))}


# -- the pool's side: the upload notice and the per-call rows --------------------------------------------
def record_call(catalog: Catalog | None, stage: str, rec: CallRecord) -> None:
    """One operation row per HTTP call, under the stage's newest running row (the call that made it)."""
    if catalog is None:
        return
    parent = catalog.query("SELECT id FROM operations WHERE stage = ? AND status = 'running' ORDER BY id DESC LIMIT 1",
                           (stage,))
    op = catalog.start_operation(stage, model=f"{PREFIX}:{rec.model}", params=rec.params(),
                                 parent_id=parent[0]["id"] if parent else None)
    catalog.finish_operation(op, "failed" if rec.error else "ok", int(rec.latency_s * 1000), rec.error)


def upload_notice(catalog: Catalog | None, cfg: ApiConfig) -> dict[str, Any]:
    """Say which endpoint receives the images, once per project and endpoint; the keys for the load row."""
    endpoint = public_endpoint(cfg.base_url)
    if catalog is not None and catalog.query(
            "SELECT 1 FROM operations WHERE json_extract(params_json, '$.upload_notice') = ? LIMIT 1", (endpoint,)):
        return {}
    log.warning("images will be sent to %s ([api] base_url): the service receives every image this project "
                "captions, judges or edits through it (shown once per project and endpoint)", endpoint)
    return {"upload_notice": endpoint}


def pool_extras(pool: Any, spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(load keyword arguments, load-row keys) for an API spec loaded by ``ModelPool``: its ``[api]`` section
    and a recorder that writes rows under the pool's current stage; the upload notice."""
    from flywheel.config_api import ApiConfig

    cfg = getattr(pool, "api_cfg", None) or ApiConfig()
    return ({"api": cfg, "recorder": lambda rec: record_call(pool.catalog, pool.stage, rec)},
            upload_notice(pool.catalog, cfg))


def load_api(spec: str, role: str | None, *, api: ApiConfig | None = None, recorder: Recorder | None = None,
             **overrides: Any):
    """The adapter for an ``api`` / ``api:<model>`` spec in ``role`` (vlm or editor)."""
    from flywheel.config_api import ApiConfig

    cfg = api or ApiConfig()
    named = spec.partition(":")[2]
    if overrides:  # [enrich] steps / guidance / LoRAs, or tune-judge's quantized local copy
        raise ConfigError(f"'{spec}' is a service: the local model settings {sorted(overrides)} do not apply to it",
                          hint="remove them from [enrich], or use a local preset for this role (tune-judge trains "
                          "a local VLM: `flywheel models list`)")
    if role in (None, "vlm"):
        from flywheel.models.openai_vlm import OpenAIVLM

        return OpenAIVLM(cfg, named or cfg.vlm_model, recorder=recorder)
    if role == "editor":
        from flywheel.models.openai_images import OpenAIImageEditor

        return OpenAIImageEditor(cfg, named or cfg.editor_model, recorder=recorder)
    raise ConfigError(f"'{spec}' cannot be the {role} model: a service cannot load the LoRA this role trains",
                      hint="use a local base (e.g. flux-dev); the hosted generator serves describe-then-generate")
