"""What the generative editors share after loading: editor LoRAs and a fixed flow-matching shift.

An editor LoRA is a mapping, the shape of ``[[enrich.loras]]`` and of the presets' ``loras`` setting:
``{"hub": "owner/name", "weight": "file.safetensors", "scale": 1.0}`` (one file of a hub repo) or
``{"path": "/abs/file.safetensors", "scale": 0.8}``. Hub files are fetched one at a time through the HF
cache (a LoRA repo often holds several GB of variants; only the named file is needed), honouring
HF_HUB_OFFLINE, and only ``.safetensors`` files are ever loaded. What was loaded, from where and at which
scale goes into the adapter's ``params()``, so it lands in the catalog with every edit.

Few-step ("Lightning" / turbo) LoRAs are distilled with a fixed sampling shift, not the base model's
resolution-dependent one: ``set_scheduler_shift`` pins it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flywheel.errors import ConfigError, ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)


def lora_label(spec: Mapping[str, Any]) -> str:
    """``owner/name/file.safetensors`` for a hub LoRA, the path for a local one."""
    return f"{spec['hub']}/{spec['weight']}" if spec.get("hub") else str(spec["path"])


def resolve_lora(spec: Mapping[str, Any]) -> Path:
    """The local .safetensors file of an editor LoRA (downloaded into the HF cache if it is a hub file)."""
    if spec.get("hub"):
        return fetch_hub_file(str(spec["hub"]), str(spec["weight"]))
    path = Path(str(spec["path"])).expanduser()
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"editor LoRA {path} is not a .safetensors file",
                             hint="Flywheel loads safetensors only (pickles can run code when loaded)")
    if not path.is_file():
        raise ModelNotFoundError(f"editor LoRA not found: {path}",
                                 hint="fix path in [[enrich.loras]] (relative paths start at the project folder)")
    return path


def fetch_hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repo, from the HF cache or downloaded into it (unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    from flywheel.models.hub import hub_cache_dir, is_offline

    if not filename.endswith(".safetensors"):
        raise ModelLoadError(f"editor LoRA {repo_id}/{filename} is not a .safetensors file",
                             hint="Flywheel loads safetensors only (pickles can run code when loaded)")
    cache = hub_cache_dir()
    looked_in = cache / ("models--" + repo_id.replace("/", "--"))
    what, fetch = f"editor LoRA {repo_id}/{filename}", f"hf download {repo_id} {filename}"
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=str(cache), local_files_only=is_offline()))
    except LocalEntryNotFoundError:  # not cached, and offline on purpose or the hub could not be reached
        if is_offline():
            raise ModelNotFoundError(f"{what} is not downloaded: looked in {looked_in} (HF_HUB_OFFLINE is set)",
                                     hint=f"run `{fetch}` on a machine with internet (same HF_HOME), or give "
                                     "[[enrich.loras]] a local path") from None
        raise ModelNotFoundError(f"{what} is not in {looked_in} and the Hugging Face Hub could not be reached",
                                 hint=f"check the network (proxy, HF_ENDPOINT), then run `{fetch}`") from None
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        raise ModelNotFoundError(f"{what}: the repo is gated (its licence must be accepted first)",
                                 hint=f"accept it on https://huggingface.co/{repo_id}, run `hf auth login`, "
                                 f"then `{fetch}`") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{what}: there is no hub repo {repo_id} (or it is private)",
                                 hint="check hub in [[enrich.loras]] or the preset (`flywheel models list`)") from None
    except EntryNotFoundError:
        raise ModelNotFoundError(f"{what}: the repo {repo_id} has no file {filename}",
                                 hint=f"see the file names on https://huggingface.co/{repo_id}/tree/main") from None
    except (HfHubHTTPError, OSError) as err:
        raise ModelNotFoundError(f"{what} could not be fetched into {looked_in}: {type(err).__name__}: {err}",
                                 hint=f"run `{fetch}` and read its error") from None


def apply_loras(pipe, specs: Sequence[Mapping[str, Any]], *, model_id: str, quantization: str,
                dtype: Any = None) -> list[dict[str, Any]]:
    """Load every editor LoRA into ``pipe`` at its scale; returns what ``params()`` records.

    On plain (bf16 / fp32) weights the LoRAs are fused into the base and their layers dropped, so each
    denoising step costs what the base costs; quantized weights keep separate LoRA layers instead (in the
    compute ``dtype`` on an fp8 base: peft creates them in the base weights' dtype, and fp8 cannot matmul).
    """
    if not specs:
        return []
    if quantization == "fp8":
        log.warning("%s: editor LoRAs on an fp8 base (weights cast to fp8 without scales) are known to give grid "
                    "artifacts with few-step Lightning LoRAs (Qwen-Image-Lightning, issue #32); prefer "
                    "quantization = 'none', 'int8' or 'nf4' for the editor", model_id)
    names, scales, records = [], [], []
    for i, spec in enumerate(specs):
        path, name = resolve_lora(spec), f"editor_lora_{i}"
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True)
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            raise ModelLoadError(f"cannot load editor LoRA {lora_label(spec)} into {model_id}: {err}".split("\n")[0],
                                 hint="is it a LoRA for this editor model (e.g. a Qwen-Image-Edit-2511 LoRA on "
                                 "Qwen-Image-Edit-2511)?") from None
        names.append(name)
        scales.append(float(spec.get("scale", 1.0)))
        records.append({"source": lora_label(spec), "path": str(path), "scale": scales[-1]})
    if quantization == "fp8" and dtype is not None:
        for component in pipe.components.values():
            for param_name, param in getattr(component, "named_parameters", lambda: [])():
                if "lora_" in param_name:
                    param.data = param.data.to(dtype)
    pipe.set_adapters(names, scales)
    if quantization == "none":
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)  # the scales set above are part of each adapter
        pipe.unload_lora_weights()  # drop the LoRA layers; the fused weights stay
        for record in records:
            record["fused"] = True
    log.info("%s: editor LoRAs %s", model_id, ", ".join(f"{r['source']} x{r['scale']}" for r in records))
    return records


def set_scheduler_shift(pipe, shift: float) -> None:
    """Sample with the fixed shift ``shift`` (sigma -> s*sigma / (1 + (s-1)*sigma)) that few-step LoRAs were
    distilled with: the flow-matching scheduler's resolution-dependent shift is pinned to log(shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ConfigError(f"scheduler_shift only applies to flow-matching editors, not {type(pipe.scheduler).__name__}",
                          hint="remove scheduler_shift from [enrich] for this editor")
    config = {**pipe.scheduler.config, "base_shift": math.log(shift), "max_shift": math.log(shift), "shift": 1.0,
              "shift_terminal": None, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
