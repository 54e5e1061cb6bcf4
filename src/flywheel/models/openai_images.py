"""Editor and generator over an OpenAI-compatible images API: ``images.edit`` and ``images.generate``.

The editor is ``[enrich] backend = "api"`` with ``[models] editor = "api:<model>"`` (e.g. gpt-image-1);
the generator (e.g. DALL-E 3, which has no edit endpoint) serves describe-then-generate through
``load_api_generator(...).generate(prompt, size, seed)``. The services take no seed: the seed is recorded,
but a repeated request may give another image. A refusal (content policy) is an ``ApiError`` whose message
is the service's reason, so enrich records that unit failed with it and goes on.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import TYPE_CHECKING, Any

from PIL import Image

from flywheel.config_api import ApiConfig
from flywheel.errors import ApiError
from flywheel.models.base import EditRequest, TextToImageRequest
from flywheel.models.openai_common import (
    PREFIX,
    ApiClient,
    CallRecord,
    Recorder,
    record_call,
    usage_dict,
)

if TYPE_CHECKING:
    from flywheel.catalog.db import Catalog

log = logging.getLogger(__name__)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def size_text(size: str | tuple[int, int] | None, default: str) -> str:
    if size is None:
        return default
    return size if isinstance(size, str) else f"{int(size[0])}x{int(size[1])}"


class _ImagesBase:
    role = "images"

    def __init__(self, cfg: ApiConfig, model: str, *, recorder: Recorder | None = None):
        self.cfg, self.model = cfg, model
        self.api = ApiClient(cfg, model, recorder=recorder)
        self.model_id = f"{PREFIX}:{model}"

    def params(self) -> dict[str, Any]:
        return {"model": self.model_id, "family": "openai_api", "endpoint": self.api.endpoint,
                "size": self.cfg.image_size, "concurrency": self.cfg.concurrency, "timeout_s": self.cfg.timeout_s,
                "max_retries": self.cfg.max_retries, "seeded": False}

    def close(self) -> None:
        self.api.close()

    def _format(self) -> dict[str, Any]:
        # DALL-E answers with URLs unless asked for base64; gpt-image models always send base64 and reject the key.
        return {"response_format": "b64_json"} if self.model.startswith("dall-e") else {}

    def _image(self, resp: Any, rec: CallRecord) -> Image.Image:
        rec.usage, rec.images = usage_dict(getattr(resp, "usage", None)), 1
        data = (getattr(resp, "data", None) or [None])[0]
        if data is None:
            raise ApiError(f"{self.model_id} at {self.api.endpoint} returned no image",
                           hint="check [api] model names: the model may not make images")
        if getattr(data, "b64_json", None):
            raw = base64.b64decode(data.b64_json)
        elif getattr(data, "url", None):
            raw = self._download(data.url)
        else:
            raise ApiError(f"{self.model_id} at {self.api.endpoint} returned neither base64 nor a URL")
        with Image.open(io.BytesIO(raw)) as im:  # PIL's decompression-bomb limit applies
            return im.convert("RGB")

    def _download(self, url: str) -> bytes:
        import urllib.request

        if not url.startswith(("http://", "https://")):
            raise ApiError(f"{self.model_id} returned an image URL that is not http(s)")
        with urllib.request.urlopen(url, timeout=self.cfg.timeout_s) as r:
            return r.read()


class OpenAIImageEditor(_ImagesBase):
    """ImageEditor over ``images.edit`` (one request per edit, ``concurrency`` at a time)."""

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        def one(req: EditRequest, rec: CallRecord) -> Image.Image:
            resp = self.api.client.images.edit(model=self.model, image=("image.png", png_bytes(req.image), "image/png"),
                                               prompt=req.prompt, n=1, size=self.cfg.image_size, **self._format())
            return self._image(resp, rec)

        return self.api.run_all("images.edit", one, requests)


class OpenAIImageGenerator(_ImagesBase):
    """Text to image over ``images.generate``: ``generate(prompt, size, seed)`` -> one PIL image."""

    def generate(self, prompt: str, size: str | tuple[int, int] | None = None, seed: int | None = None) -> Image.Image:
        return self.generate_many([(prompt, size, seed)])[0]

    def generate_many(self, items: list[tuple[str, str | tuple[int, int] | None, int | None]]) -> list[Image.Image]:
        """Several prompts at once (``concurrency`` in flight); ``(prompt, size, seed)`` each."""
        def one(item: tuple[str, Any, int | None], rec: CallRecord) -> Image.Image:
            prompt, size, _seed = item  # no seed parameter exists in the API: kept for the caller's records
            resp = self.api.client.images.generate(model=self.model, prompt=prompt, n=1,
                                                   size=size_text(size, self.cfg.image_size), **self._format())
            return self._image(resp, rec)

        return self.api.run_all("images.generate", one, items)

    def generate_requests(self, requests: list[TextToImageRequest]) -> list[Image.Image]:
        return self.generate_many([(r.prompt, (r.width, r.height), r.seed) for r in requests])


def load_api_generator(api: ApiConfig | None = None, model: str | None = None, *, catalog: Catalog | None = None,
                       stage: str = "enrich") -> OpenAIImageGenerator:
    """The hosted generator of ``[api]`` (``generator_model`` unless ``model``), recording a row per call in
    ``catalog`` under ``stage``, and saying once per project which endpoint receives the prompts."""
    from flywheel.models.openai_common import upload_notice

    cfg = api or ApiConfig()
    if catalog is not None:
        notice = upload_notice(catalog, cfg)
        if notice:  # remembered like a load row's notice, so it is said once per project and endpoint
            with catalog.operation(stage, model=f"{PREFIX}:{model or cfg.generator_model}",
                                   params={"action": "load", "role": "generator", **notice}):
                pass
    return OpenAIImageGenerator(cfg, model or cfg.generator_model,
                                recorder=(lambda rec: record_call(catalog, stage, rec)) if catalog else None)
