"""Training checkpoints that resume as if the run never stopped.

A checkpoint is a folder ``checkpoint-000250/`` holding, all in safetensors + JSON (never pickles):
- ``lora.safetensors``: the trainable LoRA parameters, by name;
- ``optimizer.safetensors`` + ``state.json``: every optimizer state tensor, flattened, plus the param
  groups, the LR scheduler state, the step, the epoch's data order and position, the losses so far, and
  the RNG states (torch CPU, CUDA, and the training generator that draws noise, t and caption dropout).
It is written to a temporary folder and renamed, so a kill mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, st in state_dict["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, *, lora: dict, optimizer, lr_scheduler, generator,
                    data: dict, losses: list[dict], keep: int = 2) -> Path:
    import torch
    from safetensors.torch import save_file

    final = run_dir / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=run_dir))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        rng = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file({**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}}, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(), "data": data,
                 "losses": losses}
        (tmp / "state.json").write_text(json.dumps(state, default=float), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint at step %d: %s", step, final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / "state.json").is_file())


def load_checkpoint(path: Path, *, params: dict, optimizer, lr_scheduler, generator) -> dict:
    """Restore LoRA weights, optimizer, scheduler and RNG in place; returns the JSON state (step, data, losses)."""
    import torch
    from safetensors.torch import load_file

    lora = load_file(str(path / "lora.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(lora[name].to(p.device, p.dtype))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    rng = {k[4:]: tensors.pop(k) for k in list(tensors) if k.startswith("rng.")}
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["generator"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return state
