"""Named model stacks: ``[models] stack = "flux1"`` picks every role's model at once.

A stack names a consistent set: the captioner and judge VLM, the editor (and the ``[enrich] backend`` that
drives it), and the base that LoRAs are trained on. LoRAs render on that base, unless its preset names
another model (``Preset.generate_with``: the klein bases render on the distilled klein of their size). Any role set explicitly in
``flywheel.toml`` wins over the stack (``ModelsConfig`` tells set keys from defaults with pydantic's
``model_fields_set``). The default stack is the set new projects have always had; docs/models.md gives the
reasoning, and the licence of each stack's models.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

ROLE_KEYS = ("captioner", "judge", "editor", "base")


@dataclass(frozen=True)
class Stack:
    name: str
    captioner: str
    judge: str
    editor: str
    base: str
    enrich_backend: str  # the [enrich] backend that drives this editor
    summary: str

    def roles(self) -> dict[str, str]:
        return {key: getattr(self, key) for key in ROLE_KEYS}


STACKS: dict[str, Stack] = {s.name: s for s in [
    Stack("flux1", "qwen2-vl-2b", "qwen2-vl-2b", "qwen-image-edit-2511-lightning", "flux-dev", "qwen-image-edit",
          "Qwen-Image-Edit-2511 + 4-step Lightning LoRA, FLUX.1-dev LoRAs, Qwen2-VL-2B captions and judge "
          "(FLUX.1-dev is non-commercial; the editor wants an 80 GB card in bf16)"),
    Stack("flux1-kontext", "qwen2-vl-2b", "qwen2-vl-2b", "flux-kontext-dev", "flux-dev", "flux-kontext",
          "FLUX.1 Kontext [dev] edits, FLUX.1-dev LoRAs: both fit 24 GB with fp8 + cpu_offload "
          "(configs/examples/gpu-24gb-flux1.toml); both non-commercial"),
    # Qwen3-VL-4B, not -8B: on the H200 capped at 24 GiB the 8B captioner ran out of memory at the default
    # vlm_batch_size of 16 (16.3 GiB of weights; docs/performance.md). Set captioner/judge to qwen3-vl-8b on a
    # bigger card.
    Stack("klein4b", "qwen3-vl-4b", "qwen3-vl-4b", "flux2-klein-4b", "flux2-klein-base-4b", "flux2-klein",
          "FLUX.2 klein 4B edits (4 steps, several references), LoRAs trained on klein-base 4B and rendered on "
          "klein 4B (4 steps), Qwen3-VL-4B captions and judge: Apache-2.0 end to end, each fits 24 GB"),
    Stack("tiny", "tiny", "tiny", "tiny", "tiny", "qwen-image-edit",
          "tiny random models of the flux1 stack's architectures, on the CPU: tests and demos only"),
    Stack("tiny-klein", "tiny-qwen3-vl", "tiny-qwen3-vl", "tiny-flux2-klein", "tiny-flux2-klein-base", "flux2-klein",
          "tiny random models of the klein4b stack's architectures, on the CPU: tests and demos only"),
]}
DEFAULT_STACK = "klein4b"


def get_stack(name: str) -> Stack | None:
    return STACKS.get(name)


def suggest_stack(name: str) -> str | None:
    close = difflib.get_close_matches(name, list(STACKS), n=1, cutoff=0.5)
    return close[0] if close else None
