"""``[compute]``: where the batch stages run (this process, or a pool of model-holding Ray actors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flywheel.config_base import Section


class ComputeConfig(Section):
    backend: Literal["local", "ray"] = Field(
        "local", description="'local': this process; 'ray': enrich, caption, judge, generate and the evaluation "
        "renders run on a pool of Ray actors, each holding the model (pip install 'character-flywheel[ray]').")
    address: str = Field(
        "", description="The Ray cluster: '' starts a local one for the run; 'auto' joins the one started on "
        "this machine (`ray start --head`); 'ray://HOST:10001' a remote head.")
    actors: int = Field(0, ge=0, description="Model replicas per stage; 0 = as many as the cluster's GPUs "
                        "(or CPUs, without GPUs) allow at the resources below.")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs each replica holds; unset = 1 when the cluster has GPUs, else 0.")
    cpus_per_actor: float = Field(1.0, ge=0, description="CPUs each replica holds.")
    retries: int = Field(2, ge=0, le=20, description="Attempts after the first for a unit whose actor died or "
                         "raised; then its items are recorded as failed with the error and the run goes on.")
    local_cpus: int = Field(0, ge=0, description="CPUs of a local cluster started for the run; 0 = all of them.")
