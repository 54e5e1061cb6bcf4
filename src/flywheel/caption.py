"""``flywheel caption``: a training caption for every image, written by the VLM under a caption policy.

The policy (``[caption]`` in flywheel.toml) says what captions describe (what varies between images:
setting, lighting, pose, style, framing) and what they leave out (the character's fixed traits, which
the trigger word learns to carry). Every caption contains the trigger word: when the model leaves it
out it is put at the start, and the fix is logged. Listed identity traits are flagged (or stripped).
When the VLM's answer is unusable, or ``mode = "template"``, a template caption is built from how the
image was made (the edit recipe's or the generation's prompt).

An image is captioned once per policy version: the policy's fingerprint (prompt, lists, mode and
captioner) is recorded with the operation that wrote the caption, so changing any of them re-captions,
and re-running with the same policy does nothing. Captions a human wrote are never replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from flywheel.catalog.queries import EFFECTIVE_DECISION
from flywheel.compute import Outcome, UnitFailed, map_calls
from flywheel.config import CaptionConfig, Config
from flywheel.errors import ModelOutputError, StageError
from flywheel.models.base import ChatRequest, VisionLanguageModel
from flywheel.progress import ProgressFn, no_progress
from flywheel.project import Project

log = logging.getLogger(__name__)

_LABEL_RE = re.compile(r"^\s*(?:caption|answer|description)\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’"


@dataclass
class CaptionResult:
    policy: str  # fingerprint of the caption policy used
    written: list[tuple[int, str]] = field(default_factory=list)  # (image id, 'vlm' or 'template')
    fell_back: list[int] = field(default_factory=list)  # VLM output unusable -> template (or nothing)
    failed: list[int] = field(default_factory=list)  # unusable and no template fallback: no caption written
    trigger_inserted: list[int] = field(default_factory=list)
    flagged_traits: dict[int, list[str]] = field(default_factory=dict)

    def count(self, source: str) -> int:
        return sum(1 for _, s in self.written if s == source)


def policy_fingerprint(cfg: CaptionConfig, trigger: str, model: str | None) -> str:
    """Short hash of everything that shapes a caption (the captioner too); a new value means 'caption again'."""
    fields = cfg.model_dump(include={"mode", "vary", "identity_traits", "strip_identity_traits", "prompt"})
    blob = json.dumps({"trigger": trigger, "model": model if cfg.mode == "vlm" else None, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_prompt(cfg: CaptionConfig, trigger: str) -> str:
    traits = ""
    if cfg.identity_traits:
        traits = f"Do not mention these fixed traits: {', '.join(cfg.identity_traits)}. "
    return cfg.prompt.format(trigger=trigger, vary=", ".join(cfg.vary), traits=traits)


def has_trigger(text: str, trigger: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", text) is not None


def clean_caption(raw: str, trigger: str, cfg: CaptionConfig) -> tuple[str | None, list[str], bool]:
    """(caption or None if unusable, identity traits found, whether the trigger had to be inserted)."""
    text = " ".join(raw.split())  # one line: sidecar .txt files and trainers expect a single line
    text = _LABEL_RE.sub("", text).strip().strip(_QUOTES).strip()
    if sum(ch.isalpha() for ch in text.replace(trigger, "")) < 3:
        return None, [], False
    found = [t for t in cfg.identity_traits if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text, re.IGNORECASE)]
    if found and cfg.strip_identity_traits:
        for trait in found:
            text = re.sub(rf"\s*(?<!\w){re.escape(trait)}(?!\w)", "", text, flags=re.IGNORECASE)
        text = re.sub(r"\s*,(\s*,)+", ",", re.sub(r"\s+([,.;])", r"\1", text)).strip(" ,;")
    inserted = not has_trigger(text, trigger)
    if inserted:
        # "A woman ..." -> "fw_x, a woman ...": lower-case a capitalised first word, but not "I" or "NYC".
        first = text.split(" ", 1)[0]
        if first != "I" and first[:1].isupper() and (len(first) == 1 or first[1:].islower()):
            text = text[0].lower() + text[1:]
        text = f"{trigger}, {text}"
    return text, found, inserted


# Edit instructions -> what the result shows ("Change the background to a forest" -> "a forest in the
# background"). Covers the imperative forms the shipped recipes use; anything else is kept as written.
_REWRITES = [(re.compile(p, re.IGNORECASE), r) for p, r in [
    (r"^change the background to (.+)$", r"\1 in the background"),
    (r"^make the lighting (?:look )?(?:like )?(.+)$", r"\1 lighting"),
    (r"^make (?:this|it) look like (.+)$", r"looking like \1"),
    (r"^(?:convert|turn|redraw) (?:this|it) (?:in)?(?:to|as) (.+)$", r"as \1"),
    (r"^(?:change (?:the )?camera angle to|change to|zoom out to|zoom in to) (.+)$", r"\1"),
    (r"^light the scene with (.+)$", r"lit by \1"),
    (r"^(?:give (?:this|it)|add) (.+)$", r"with \1"),
]]
_KEEP_CLAUSE = re.compile(r",?\s*\b(?:keep|keeping|preserve|maintain)\b.*$", re.IGNORECASE)
_SUBJECT = re.compile(r"\bthe (?:character|person|subject)\b", re.IGNORECASE)


def template_caption(trigger: str, kind: str, params: dict[str, Any]) -> str:
    """A caption from how the image was made: the edit recipe's or the generation's prompt."""
    text = str(params.get("caption") or params.get("prompt") or "").strip()
    if has_trigger(text, trigger) or (kind == "synthetic" and text):
        return text.rstrip(".")  # a generation prompt already describes the picture
    clause = _KEEP_CLAUSE.sub("", re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]).strip().rstrip(".!?")
    if not clause:
        return f"a photo of {trigger}"
    for pattern, replacement in _REWRITES:
        if pattern.match(clause):
            clause = pattern.sub(replacement, clause)
            break
    else:
        clause = clause[0].lower() + clause[1:] if clause[1:2].islower() else clause
    if _SUBJECT.search(clause):
        return _SUBJECT.sub(trigger, clause)
    return f"{trigger}, {clause}"


def with_camera_angle(text: str, made_with: dict[str, Any]) -> str:
    """An edit from a camera recipe states its angle in the caption ("seen from slightly to the left"), also
    when the VLM did not say it: the angle is what varies, so the caption must carry it (coverage, issue 16)."""
    angle = str(made_with.get("caption") or "").strip().rstrip(".")
    if made_with.get("axis") != "camera" or not angle or angle.lower() in text.lower():
        return text
    return f"{text.rstrip().rstrip('.')}, {angle}"


def pending_images(project: Project, policy: str) -> list[dict[str, Any]]:
    """Training images without a caption from this policy, without a human caption, and not rejected."""
    rows = project.catalog.query(
        f"""SELECT i.id, i.sha256, i.kind, o.params_json AS made_with FROM images i
            LEFT JOIN operations o ON o.id = i.operation_id
            WHERE NOT EXISTS (SELECT 1 FROM captions c JOIN operations co ON co.id = c.operation_id
                              WHERE c.image_id = i.id AND json_extract(co.params_json, '$.policy') = ?)
              AND NOT EXISTS (SELECT 1 FROM captions c WHERE c.image_id = i.id AND c.source = 'human')
              AND COALESCE({EFFECTIVE_DECISION}, '') != 'rejected'
              AND i.purpose = 'train'  -- evaluation images never enter a training set: no caption needed
            ORDER BY i.id""",
        (policy,),
    )
    return [dict(r) for r in rows]


def caption(project: Project, cfg: Config | None = None, vlm: VisionLanguageModel | None = None,
            progress: ProgressFn | None = None, pool=None) -> CaptionResult:
    """Caption every image that has no caption from the current policy. Returns what was written."""
    config = cfg or project.config
    ccfg, trigger = config.caption, config.project.trigger
    progress = progress or no_progress

    # 1. Plan: the policy's fingerprint decides which images still need a caption.
    policy = policy_fingerprint(ccfg, trigger, vlm.model_id if vlm is not None else config.models.captioner)
    prompt = build_prompt(ccfg, trigger)
    todo = pending_images(project, policy)
    result = CaptionResult(policy=policy)
    if not todo and not project.catalog.query("SELECT 1 FROM images LIMIT 1"):
        raise StageError("nothing to caption: the project has no images yet",
                         hint="run `flywheel ingest PATH...` first")
    if not todo:
        log.info("caption: every image already has a caption from policy %s", policy)
        return result

    # 2. Load the captioner only when there is work for it (from the pool: the judge reuses it when
    #    [models] judge names the same model).
    from flywheel.models.pool import stage_pool

    with stage_pool(project, pool, "caption") as models:
        if ccfg.mode == "vlm" and vlm is None:
            vlm = models.vlm(config.models.captioner)
        return _caption(project, config, vlm, todo, policy, prompt, result, progress)


def _caption(project: Project, config: Config, vlm, todo, policy: str, prompt: str, result: CaptionResult,
             progress: ProgressFn) -> CaptionResult:
    ccfg, trigger = config.caption, config.project.trigger
    catalog = project.catalog
    run_params = {"policy": policy, "mode": ccfg.mode, "prompt": prompt, "images": len(todo)}
    with catalog.operation("caption", kind="stage_run", model=vlm.model_id if ccfg.mode == "vlm" else "template",
                           params=run_params) as run_id:
        progress(0, len(todo), "captions")
        batches = [todo[i:i + ccfg.batch_size] for i in range(0, len(todo), ccfg.batch_size)]
        # 3. Ask the VLM for each batch (one recorded call; here, or on Ray replicas: flywheel.compute), or
        #    use templates.
        if ccfg.mode == "vlm":
            if hasattr(vlm, "expect"):  # the stage's size decides whether compiling the decode step pays off
                vlm.expect(len(todo))
            calls = ((b, ([ChatRequest(text=prompt, images=[project.store.open_image(r["sha256"])]) for r in b],))
                     for b in batches)
            outcomes = map_calls(vlm, "generate", calls, max_new_tokens=ccfg.max_new_tokens)
        else:
            outcomes = (Outcome(b, [None] * len(b)) for b in batches)
        done = 0
        for out in outcomes:
            batch, answers, call_id = out.item, out.value, run_id
            if ccfg.mode == "vlm":
                call_id = _record_call(project, vlm, ccfg, policy, prompt, batch, out, run_id)
                if isinstance(out.error, UnitFailed):  # failed on the cluster after its retries: a re-run retries
                    result.failed.extend(r["id"] for r in batch)
                    continue
            # 4. Validate each answer; fall back to a template caption when it is unusable.
            with catalog.transaction():
                for row, answer in zip(batch, answers):
                    _write_caption(project, row, answer, trigger, ccfg, call_id, run_id, result)
            done += len(batch)
            progress(done, len(todo), "captions")
    log.info("caption: %d by the VLM, %d from templates, %d failed (policy %s)",
             result.count("vlm"), result.count("template"), len(result.failed), policy)
    return result


def _record_call(project: Project, vlm, ccfg: CaptionConfig, policy: str, prompt: str, batch, out: Outcome,
                 run_id: int) -> int:
    """The VLM call's operation row (its time, and its error if it failed); a local error stops the stage."""
    params = {"policy": policy, "prompt": prompt, "image_ids": [r["id"] for r in batch],
              "max_new_tokens": ccfg.max_new_tokens, **vlm.params()}
    call_id = project.catalog.start_operation("caption", model=vlm.model_id, params=params, parent_id=run_id)
    err = out.error
    if err is None and len(out.value) != len(batch):  # zip() would pair captions with the wrong images
        err = ModelOutputError(f"{vlm.model_id} returned {len(out.value)} captions for {len(batch)} images",
                               hint="this is a bug in the model adapter; report it with the model name")
    project.catalog.finish_operation(call_id, "ok" if err is None else "failed", int(out.seconds * 1000),
                                     None if err is None else f"{type(err).__name__}: {err}")
    if err is not None and not isinstance(err, UnitFailed):
        raise err
    return call_id


def _write_caption(project: Project, row: dict[str, Any], answer: str | None, trigger: str, ccfg: CaptionConfig,
                   call_id: int, run_id: int, result: CaptionResult) -> None:
    image_id = row["id"]
    text, source, op_id = None, "vlm", call_id
    if answer is not None:
        text, found, inserted = clean_caption(answer, trigger, ccfg)
        if text is None:
            log.warning("caption: image %d: unusable VLM output %r", image_id, answer[:120])
            result.fell_back.append(image_id)
        else:
            if inserted:
                log.warning("caption: image %d: the VLM left out the trigger %r; inserted it at the start",
                            image_id, trigger)
                result.trigger_inserted.append(image_id)
            if found:
                action = "stripped" if ccfg.strip_identity_traits else "kept (set caption.strip_identity_traits)"
                log.warning("caption: image %d mentions identity traits %s: %s", image_id, found, action)
                result.flagged_traits[image_id] = found
    made_with = json.loads(row["made_with"]) if row["made_with"] else {}
    if text is not None:
        text = with_camera_angle(text, made_with)
    if text is None and (ccfg.mode == "template" or ccfg.template_fallback):
        text, source, op_id = template_caption(trigger, row["kind"], made_with), "template", run_id
    if text is None:
        result.failed.append(image_id)
        return
    project.catalog.insert("captions", {"image_id": image_id, "text": text, "source": source, "operation_id": op_id})
    result.written.append((image_id, source))
