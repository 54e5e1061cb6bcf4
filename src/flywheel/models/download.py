"""Downloads from the Hugging Face Hub: only the files the loader reads, and errors that say what went wrong.

Each way a download fails has its own one-line error and next step: not downloaded while HF_HUB_OFFLINE
is set; the hub cannot be reached (HF_HUB_OFFLINE is not set); a gated repo (licence, ``hf auth login``);
a repo or file that does not exist. The exception classes are huggingface_hub's own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flywheel.errors import ModelNotFoundError
from flywheel.models.hub import (
    LAYOUT_FILES,
    allow_patterns,
    check_weights,
    hub_cache_dir,
    is_offline,
    read_json,
)

log = logging.getLogger(__name__)


def fetch_command(repo_id: str, *, diffusers: bool | None = None) -> str:
    """The ``hf download`` line for what Flywheel loads (a diffusers repo: its component folders only)."""
    if diffusers is None:
        from flywheel.models.presets import PRESETS

        diffusers = any(p.hub_id == repo_id and p.family != "qwen_vl" for p in PRESETS.values())
    return f'hf download {repo_id} --include model_index.json --include "*/*"' if diffusers else f"hf download {repo_id}"


def snapshot(repo_id: str, label: str, trust_remote_code: bool) -> Path:
    # 1. The layout first (two small files): model_index.json means diffusers, config.json transformers.
    folder = _download(repo_id, label, LAYOUT_FILES, fetch_command(repo_id))
    index = folder / "model_index.json"
    model_index = read_json(index) if index.is_file() else None
    # 2. Then exactly the files that layout's loader reads.
    fetch = fetch_command(repo_id, diffusers=model_index is not None)
    if not is_offline():
        log.info("%s: fetching what the loader reads from the Hugging Face Hub into %s (cached files are kept)",
                 label, hub_cache_dir())
    folder = _download(repo_id, label, allow_patterns(model_index, trust_remote_code=trust_remote_code), fetch)
    check_weights(folder, label, fetch=fetch)
    return folder


def _download(repo_id: str, label: str, patterns: list[str], fetch: str) -> Path:
    """``snapshot_download`` with each way it fails turned into its own one-line error and what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    looked_in = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    page = f"https://huggingface.co/{repo_id}"
    offline = is_offline()
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(hub_cache_dir()), allow_patterns=patterns,
                                      local_files_only=offline))
    except LocalEntryNotFoundError as err:  # not (fully) in the cache, and the hub was not asked or not reached
        partly = "only partly downloaded" if type(err).__name__ == "IncompleteSnapshotError" else "not downloaded"
        if offline or _is_offline_error(err.__cause__):
            raise ModelNotFoundError(
                f"model '{label}' ({repo_id}) is {partly}: looked in {looked_in}, and HF_HUB_OFFLINE is set, "
                "so the hub was not asked",
                hint=f"run `{fetch}` on a machine with internet (same HF_HOME), unset HF_HUB_OFFLINE, "
                "or set the model to a local folder",
            ) from None
        raise ModelNotFoundError(
            f"model '{label}' ({repo_id}) is {partly} (looked in {looked_in}) and the Hugging Face Hub cannot be "
            f"reached: {_short(err.__cause__ or err)}",
            hint=f"check the network or proxy (HTTPS_PROXY) and retry, or run `{fetch}` where there is internet "
            "and copy the HF cache here (same HF_HOME)",
        ) from None
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        raise ModelNotFoundError(
            f"model '{label}' ({repo_id}) is gated: its licence must be accepted on {page} by the account "
            "whose token Flywheel uses",
            hint=f"accept the licence on {page}, then `hf auth login` (or set HF_TOKEN) and retry",
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelNotFoundError(
            f"model '{label}': the Hugging Face Hub has no repository {repo_id} (or it is private to another account)",
            hint=f"check the id on {page} or pick a preset (`flywheel models list`); private repositories need "
            "`hf auth login`",
        ) from None
    except EntryNotFoundError as err:
        raise ModelNotFoundError(
            f"model '{label}' ({repo_id}): a file the loader needs is missing on the hub: {_short(err)}",
            hint=f"check the repository's files on {page}, or point the model at a complete local folder",
        ) from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        login = " (not logged in, or the token is invalid)" if status == 401 else ""
        raise ModelNotFoundError(
            f"model '{label}' ({repo_id}): the Hugging Face Hub refused the download{login}: {_short(err)}",
            hint="`hf auth login` (or set HF_TOKEN) and retry" if status == 401 else "retry later, or check "
            "https://status.huggingface.co",
        ) from None
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise ModelNotFoundError(
            f"model '{label}' ({repo_id}) could not be downloaded: the Hugging Face Hub cannot be reached: {_short(err)}",
            hint=f"check the network or proxy (HTTPS_PROXY) and retry, or run `{fetch}` where there is internet",
        ) from None


def _is_offline_error(err: BaseException | None) -> bool:
    return err is not None and type(err).__name__ == "OfflineModeIsEnabled"


def _is_network_error(err: BaseException | None) -> bool:
    """Connection failures from any HTTP stack huggingface_hub has used (requests, httpx, httpx2)."""
    names = {"ConnectionError", "TransportError", "TimeoutException", "ConnectTimeout", "ProxyError"}
    while err is not None:
        if isinstance(err, (ConnectionError, TimeoutError)) or names & {c.__name__ for c in type(err).__mro__}:
            return True
        err = err.__cause__
    return False


def _short(err: BaseException) -> str:
    """One line of an exception, for a one-line error."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:200]}"
