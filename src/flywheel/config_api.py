"""``[api]``: hosted or local OpenAI-compatible services (OpenAI, DashScope, vLLM, SGLang, Ollama, LM Studio).

A role uses the service when ``[models]`` names it ``"api"`` (this section's model for the role) or
``"api:<model>"`` (that model); ``[enrich] backend = "api"`` makes edits through the images edit endpoint.
The key is read from the environment variable named by ``api_key_env``; the key itself never goes in
flywheel.toml, the catalog or the logs (docs/api.md).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from flywheel.config_base import Section


class ApiConfig(Section):
    """``[api]``: endpoint, models per role, limits and prices of an OpenAI-compatible service."""

    base_url: str = Field("https://api.openai.com/v1",
                          description="The service's OpenAI-compatible root, e.g. http://localhost:8000/v1 (vLLM).")
    api_key_env: str = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the key; "
                             "'' for local servers that need none. Never the key itself.")
    vlm_model: str = Field("gpt-4o-mini", description="Captioner / judge model when [models] says \"api\".")
    editor_model: str = Field("gpt-image-1", description="Images edit model when [models] editor = \"api\".")
    generator_model: str = Field("dall-e-3", description="Images generation model (describe-then-generate).")
    image_size: str = Field("1024x1024", description="size of edited / generated images, as the service takes it.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds per HTTP request before it counts as failed.")
    max_retries: int = Field(2, ge=0, le=20, description="Retries on 408/409/429/5xx and connection errors "
                             "(the openai client's backoff: 0.5 s doubling to 8 s, or the server's Retry-After).")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    max_image_pixels: int = Field(1024 * 1024, ge=64 * 64, description="Images sent to a VLM are downscaled to this.")
    logprobs: bool = Field(True, description="Ask for token logprobs on yes/no questions (else the answer text "
                           "is read, and the score says so).")
    temperature: float | None = Field(0.0, ge=0.0, le=2.0, description="Sent with chat requests; unset = the "
                                      "server's default (for models that reject it).")
    cost_per_1k_input_tokens: float = Field(0.0, ge=0.0, description="USD, for the cost estimate in the catalog.")
    cost_per_1k_output_tokens: float = Field(0.0, ge=0.0, description="USD, for the cost estimate in the catalog.")
    cost_per_image: float = Field(0.0, ge=0.0, description="USD per edited or generated image, for the estimate.")

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url {v!r} must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _a_name(cls, v: str) -> str:
        # A pasted key here would end up in the catalog's config copies: only a variable name is accepted.
        if v and not v.replace("_", "").isalnum():
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), not the key")
        if v.startswith(("sk-", "sk_")):
            raise ValueError("api_key_env looks like a key: put the key in an environment variable and name it here")
        return v
