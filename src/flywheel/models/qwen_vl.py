"""Qwen-VL family adapter (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the captioner and the judge.

Loaded through ``AutoModelForImageTextToText`` / ``AutoProcessor`` so every Qwen-VL generation the
installed transformers knows works without a per-version class. Requests run in batches with left
padding (every prompt ends where generation starts), images are downscaled to a pixel budget first
(vision tokens grow with pixels: ~1 token per 28x28), and ``option_probabilities`` reads the first
answer token's distribution so the judge gets calibrated yes/no scores, not only text.

On a GPU the fast path (``flywheel.models.vlm_speed``) preprocesses images there and, for a stage with enough
requests (``expect``), decodes with a static KV cache and a compiled step (``[models] vlm_compile``); on CPU
the plain path runs, unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.errors import ConfigError, MissingExtraError, ModelLoadError
from flywheel.models.base import ChatRequest
from flywheel.models.hub import check_gpu_memory, count_parameters, estimate_bytes, pick_device, read_json

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "nf4", "int8")


def quantization_config(quantization: str, compute_dtype: Any):
    """BitsAndBytesConfig for "nf4"/"int8" (transformers 5 dropped the bare ``load_in_4bit=True`` kwarg)."""
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}", hint=f"use one of {', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingExtraError("bitsandbytes", "gpu", f"{quantization} quantization") from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def fit_pixels(image: Image.Image, max_pixels: int, multiple: int = 28) -> Image.Image:
    """Downscale (never upscale) to at most ``max_pixels``, keeping the aspect ratio; RGB.

    Sides are floored to ``multiple`` (patch x merge size) so the processor's own rounding cannot push
    the image back over the budget.
    """
    image = image.convert("RGB")
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(multiple, int(w * scale) // multiple * multiple), max(multiple, int(h * scale) // multiple * multiple))
    return image.resize(size, Image.Resampling.BICUBIC)


class QwenVLModel:
    """VisionLanguageModel for the Qwen-VL family."""

    def __init__(self, model, processor, *, model_id: str, device: str, max_pixels: int, batch_size: int = 8,
                 quantization: str = "none", generation: dict[str, Any] | None = None, compile: str = "auto"):
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # batched generation: all prompts end at the same column
        self.model_id = model_id
        self.device = device
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.quantization = quantization
        # Extra ``generate`` kwargs (do_sample/temperature/top_p, repetition_penalty, min_new_tokens...).
        self.generation = dict(generation or {})
        self.adapter: str | None = None  # a judge LoRA from `flywheel tune-judge`, once loaded
        self.compile = compile
        self._prompts: dict[tuple[str | None, str, int], str] = {}
        self.compile_backend = "inductor"  # tests swap in "eager" to check the static-cache path quickly on CPU
        self.compiled_decode = False
        self._expected = 0  # requests the current stage announced (``expect``)
        self._batch_shape = self._cache_len = 0  # the compiled step's shape so far: kept where possible
        self._marked = False  # this process's compiled decode is noted on disk (``_compile_record``)
        self._use_compiled(self._wants_compiled(0))
        ip = processor.image_processor
        self.pixel_multiple = getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, model_id: str | None = None, device: str = "auto",
                        quantization: str = "none", dtype: str | None = None, max_pixels: int = 1024 * 1024,
                        batch_size: int = 8, trust_remote_code: bool = False, attn_implementation: str | None = None,
                        generation: dict[str, Any] | None = None, compile: str = "auto") -> QwenVLModel:
        """Load a local HF folder (use ``flywheel.models.load_vlm`` for presets and hub ids)."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(path)
        label = model_id or str(folder)
        device = pick_device(device)
        if quantization != "none" and device != "cuda":
            raise ConfigError(f"quantization = {quantization!r} needs a CUDA GPU (bitsandbytes); this run is on {device}",
                              hint='set quantization = "none" in [models], or run on a GPU')
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
        quant = quantization_config(quantization, torch_dtype)
        config = read_json(folder / "config.json")
        if "vision_config" not in config:
            raise ModelLoadError(f"{label} is a {config.get('model_type', 'unknown')!r} model, not a vision-language model",
                                 hint="captioner and judge need a Qwen-VL model, e.g. the qwen2-vl-2b preset")
        if device == "cuda":
            n_params, _ = count_parameters(folder)
            precision = quantization if quantization != "none" else str(torch_dtype).removeprefix("torch.")
            check_gpu_memory(label, estimate_bytes(n_params, precision), torch.cuda.mem_get_info()[0],
                             precision=precision, n_params=n_params)
        kwargs: dict[str, Any] = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
        if quant is not None:
            kwargs["quantization_config"] = quant
        if device == "cuda":
            kwargs["device_map"] = "cuda"
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"cannot load {label} as a Qwen-VL model from {folder}: {err}",
                                 hint="check that the folder is a complete Qwen-VL download (config, tokenizer, "
                                 "preprocessor and *.safetensors files)") from None
        log.info("loaded %s on %s (%s, quantization=%s)", label, device, torch_dtype, quantization)
        return cls(model, processor, model_id=label, device=device, max_pixels=max_pixels, batch_size=batch_size,
                   quantization=quantization, generation=generation, compile=compile)

    # -- VisionLanguageModel ---------------------------------------------------------------------------------
    def generate(self, requests: list[ChatRequest], *, max_new_tokens: int = 128, seed: int | None = None) -> list[str]:
        """Batched chat generation, ``batch_size`` requests per call; greedy unless ``generation`` samples."""
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        tok = self.processor.tokenizer
        gen = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, do_sample=False)
        gen.update(self.generation)
        self._use_compiled(self._wants_compiled(max(self._expected, len(requests))))
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            n = len(chunk)
            if self.compiled_decode:  # a short batch takes the compiled shape (a new one would compile again)
                self._batch_shape = max(self._batch_shape, n)
                chunk = chunk + [chunk[-1]] * (self._batch_shape - n)
            inputs = self.encode(chunk)
            fast = self._decode_kwargs(inputs["input_ids"].shape[1], max_new_tokens)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, **{**fast, **gen})  # explicit `generation` kwargs win
            if self.compiled_decode and not self._marked and self.device == "cuda":
                from flywheel.models.vlm_speed import remember_compiled

                remember_compiled(*self._compile_record)
                self._marked = True
            new = ids[:n, inputs["input_ids"].shape[1]:]  # left padding: every answer starts at the same column
            out.extend(t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True))
        return out

    def expect(self, requests: int) -> None:
        """The stage about to call ``generate`` will send ``requests`` requests in all: with ``vlm_compile =
        "auto"`` that decides whether compiling the decode step pays off (``vlm_speed.COMPILE_PAYS_OFF``)."""
        self._expected = max(0, int(requests))

    def option_probabilities(self, requests: list[ChatRequest], options: list[str]) -> list[dict[str, float]]:
        """P(first answer token starts each option), renormalised over ``options``.

        Each option counts its own first token and, when it is a single token, its capitalised form too
        ("yes" also counts "Yes"), because instruction-tuned models often capitalise a one-word answer.
        """
        import torch

        token_sets = self._option_tokens(options)
        results: list[dict[str, float]] = []
        for start in range(0, len(requests), self.batch_size):
            inputs = self.encode(requests[start:start + self.batch_size])
            with torch.inference_mode():
                # One forward pass, no decoding. Left padding: the last column is the next token, and only its
                # logits are needed. Without logits_to_keep=1 the model materialises full-vocabulary logits for
                # every position (~6 GB at batch 8 with ~150k-token vocabularies and image tokens); without
                # use_cache=False it also keeps every layer's keys and values for a next step that never comes.
                logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
                probs = torch.softmax(logits, dim=-1)
                # Each option's mass in one gather and one copy to the host (not a sync per row and option).
                masses = torch.stack([probs[:, sorted(ids)].sum(dim=-1) for ids in token_sets], dim=-1).cpu()
            for row in masses.tolist():
                mass = [float(m) for m in row]
                total = sum(mass)
                if total <= 0:  # underflow only; keep the contract (a distribution over options)
                    results.append({o: 1.0 / len(options) for o in options})
                    continue
                results.append({o: m / total for o, m in zip(options, mass)})
                log.debug("option mass %.3f of the first token went to %s", total, options)
        return results

    def params(self) -> dict[str, Any]:
        return {"model": self.model_id, "family": "qwen_vl", "device": self.device, "dtype": str(self.model.dtype),
                "quantization": self.quantization, "max_pixels": self.max_pixels, "batch_size": self.batch_size,
                "generation": self.generation or "greedy", "adapter": self.adapter,
                "compile": self.compile, "compiled_decode": self.compiled_decode}

    def load_adapter(self, path: str | Path, *, adapter_id: str) -> None:
        """Put a LoRA adapter (a peft folder with ``adapter_model.safetensors``) on the model, for inference.

        ``model_id`` becomes ``<base>+<adapter_id>``, so every score and operation names the tuned judge.
        """
        from peft import PeftModel

        folder = Path(path)
        if self.adapter is not None:
            raise ConfigError(f"{self.model_id} already has the adapter {self.adapter}",
                              hint="load the base model again to use another adapter")
        if not (folder / "adapter_model.safetensors").is_file():  # peft would fall back to a pickle
            raise ModelLoadError(f"{folder} holds no adapter_model.safetensors",
                                 hint="point at a folder written by `flywheel tune-judge` (safetensors only)")
        self.model = PeftModel.from_pretrained(self.model, str(folder), is_trainable=False).eval()
        self.adapter = adapter_id
        self.model_id = f"{self.model_id}+{adapter_id}"
        log.info("judge adapter %s loaded from %s", adapter_id, folder)

    # -- helpers ---------------------------------------------------------------------------------------------
    def encode(self, requests: list[ChatRequest]):
        """The model inputs for a batch of requests (chat template, images at the pixel budget, left padding):
        exactly what ``generate`` and ``option_probabilities`` feed the model, so judge tuning trains on it."""
        from flywheel.models.vlm_speed import image_kwargs

        # On a GPU the processor resizes, normalises and patchifies there, to the pixel budget it is given;
        # on CPU images are fitted with PIL first (the processor then keeps their size), as before.
        on_gpu = self.device == "cuda"
        texts, images = [], []
        for r in requests:
            texts.append(self._prompt(r.system, r.text, len(r.images)))
            if on_gpu:  # no copy for images already in RGB (the usual case): a 1024² copy costs milliseconds
                images.extend(im if im.mode == "RGB" else im.convert("RGB") for im in r.images)
            else:
                images.extend(fit_pixels(im, self.max_pixels, self.pixel_multiple) for im in r.images)
        kwargs = image_kwargs(self.processor.image_processor, self.max_pixels, str(self.model.device) if on_gpu else None)
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt",
                                **(kwargs if images else {}))
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs and self.model.dtype != inputs["pixel_values"].dtype and self.quantization == "none":
            # The vision tower casts to its dtype first thing: casting here halves the float32 batch's memory.
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _prompt(self, system: str | None, text: str, n_images: int) -> str:
        """The chat-templated prompt, rendered once per (system, text, image count): a batch asks one question."""
        key = (system, text, n_images)
        if key not in self._prompts:
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
            if len(self._prompts) >= 256:  # judge prompts embed captions: keep the memo small
                self._prompts.clear()
            self._prompts[key] = self.processor.apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)
        return self._prompts[key]

    def _wants_compiled(self, requests: int) -> bool:
        from flywheel.models.vlm_speed import COMPILE_PAYS_OFF_WARM, compiled_before, use_compiled_decode

        if self.compiled_decode:
            return True
        warm = (self.compile == "auto" and self.device == "cuda" and requests >= COMPILE_PAYS_OFF_WARM
                and compiled_before(self._compile_record[0]))
        return use_compiled_decode(self.compile, self.device, self.quantization, requests=requests, warm=warm)

    @functools.cached_property
    def _compile_record(self) -> tuple[Path | None, dict[str, Any]]:
        """(the marker file, its key): where this machine notes that it compiled this decode step
        (``vlm_speed.compile_marker``), worked out once per adapter."""
        import torch
        import transformers

        from flywheel.models.vlm_speed import compile_marker

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        key = {"model": self.model_id, "batch": self.batch_size, "dtype": str(self.model.dtype),
               "torch": torch.__version__, "transformers": transformers.__version__, "gpu": gpu}
        return compile_marker(key), key

    def _use_compiled(self, wanted: bool) -> None:
        """Switch to the compiled decode once it is wanted, and stay there: its compilation is then paid for."""
        if wanted and not self.compiled_decode:
            from flywheel.models.vlm_speed import use_gqa_decode_attention

            self.compiled_decode = True
            use_gqa_decode_attention(self.model)  # decode steps read each key/value head once, not once per query head
            log.info("%s: static KV cache and a compiled decode step (vlm_compile=%s, %d requests expected)",
                     self.model_id, self.compile, self._expected)

    def _decode_kwargs(self, prompt_len: int, max_new_tokens: int) -> dict[str, Any]:
        """Static cache + compiled decode step where ``vlm_compile`` resolved on; nothing otherwise. The cache
        length never shrinks in a process: a shorter one would be a new shape, compiled again."""
        if not self.compiled_decode or self.generation.get("num_beams", 1) != 1:
            return {}
        from flywheel.models.vlm_speed import cache_length, decode_kwargs

        self._cache_len = max(self._cache_len, cache_length(prompt_len, max_new_tokens))
        return decode_kwargs(self.device, self._cache_len, backend=self.compile_backend)

    def _option_tokens(self, options: list[str]) -> list[set[int]]:
        if len(options) < 2 or len(set(options)) != len(options):
            raise ConfigError(f"option_probabilities needs at least two different options, got {options!r}",
                              hint='e.g. options=["yes", "no"]')
        tok = self.processor.tokenizer
        sets: list[set[int]] = []
        for option in options:
            ids = tok.encode(option, add_special_tokens=False)
            if not ids:
                raise ConfigError(f"option {option!r} encodes to no tokens", hint="use a non-empty word")
            chosen = {ids[0]}
            cap = tok.encode(option.capitalize(), add_special_tokens=False)
            if len(ids) == 1 and len(cap) == 1:
                chosen.add(cap[0])
            sets.append(chosen)
        for i, a in enumerate(sets):
            for j in range(i + 1, len(sets)):
                if a & sets[j]:
                    raise ConfigError(
                        f"options {options[i]!r} and {options[j]!r} start with the same token, so the first answer "
                        "token cannot tell them apart",
                        hint="use options that start with different words, e.g. yes/no or A/B",
                    )
        return sets
