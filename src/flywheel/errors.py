"""Errors that teach: every Flywheel error says what went wrong and what to do about it.

The CLI prints ``str(error)`` and, when present, the ``hint`` on its own line, and exits non-zero
without a traceback. Anything that is not a ``FlywheelError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class FlywheelError(Exception):
    """Base class. ``hint`` is the actionable next step for the user."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # keep the hint visible in logs and pytest output too
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class ConfigError(FlywheelError):
    """flywheel.toml (or another config file) is missing, malformed, or has invalid values."""


class ProjectNotFoundError(FlywheelError):
    """No Flywheel project (flywheel.toml) at or above the given folder."""


class CatalogError(FlywheelError):
    """The SQLite catalog cannot be opened or migrated (e.g. written by a newer Flywheel)."""


class ImageRejected(FlywheelError):
    """An input image cannot be used; the message is the one-line reason shown to the user."""


class ModelNotFoundError(FlywheelError):
    """Model weights are missing (offline, wrong path, or not downloaded yet)."""


class ModelLoadError(FlywheelError):
    """Weights exist but cannot be loaded as the requested model family (wrong folder, unsafe format...)."""


class InsufficientMemoryError(FlywheelError):
    """Not enough GPU/CPU memory for the model as configured; the hint lists the options."""


class NoGPUError(FlywheelError):
    """A full-size model would run on the CPU because there is no CUDA GPU; the hint says what runs on CPU."""


class ModelOutputError(FlywheelError):
    """A model returned output Flywheel cannot use (e.g. a judge answer that is not the expected JSON)."""


class ApiError(ModelOutputError):
    """An OpenAI-compatible service failed a request (timeout, refusal, 429/5xx after retries, bad key).

    A ``ModelOutputError``, so enrich records the unit failed and goes on; a re-run retries what failed.
    The message names the endpoint and model, never the key."""


class StageError(FlywheelError):
    """A pipeline stage cannot run (missing prerequisite stage, empty dataset, ...)."""


class MissingExtraError(FlywheelError):
    """An optional dependency group is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed.",
            hint=f"pip install 'character-flywheel[{extra}]'  (or run ./scripts/setup.sh)",
        )


class ReviewError(FlywheelError):
    """A human review cannot be recorded or served (unknown image, unknown decision, unsafe server setup)."""


class StorageError(FlywheelError):
    """The project cannot be written: the disk is full, the project is read-only, or the catalog is busy."""


class CaptionError(FlywheelError):
    """A caption cannot be written (empty after cleaning, too long, unknown image, unreadable sidecar file)."""
