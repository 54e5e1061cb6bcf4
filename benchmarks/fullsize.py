"""Random-weight copies of the default presets' hub repos, in a Hugging Face cache layout, for benchmarks.

Speed and memory do not depend on weight values, and the GPU machine cannot reach the Hub, so
``benchmarks/loop.py`` builds each repo it needs here and points ``HF_HUB_CACHE`` at the result with
``HF_HUB_OFFLINE=1``: Flywheel then resolves the presets by hub id exactly as on a user's machine
(``models--Owner--Name/refs/main`` -> ``snapshots/<rev>/``), with the same on-disk layout as the real repos
(model_index.json and one subfolder per component for diffusers repos; sharded safetensors with their
index; tokenizer and processor files). Full size by default; ``tiny=True`` writes the same layout with the
tiny architectures of ``flywheel.testing.tiny`` (a CPU dry run of the same path).

Tokenizers are trained locally (``flywheel.testing.tiny``): only sequence lengths matter for speed, and
the pipelines pad text to their real lengths (T5 512 tokens); the Qwen-VL processors keep Qwen's real
pixel budgets, so image token counts are the real ones. FLUX.1 Kontext shares FLUX.1-dev's components
through symlinks (same shapes; the real repos hold the same encoders and VAE), which keeps the disk use
within the GPU machine's 64 GB.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("benchmarks.fullsize")

FLUX_DEV, FLUX_KONTEXT = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Kontext-dev"
QWEN_EDIT, LIGHTNING = "Qwen/Qwen-Image-Edit-2511", "lightx2v/Qwen-Image-Edit-2511-Lightning"
QWEN2_VL_2B = "Qwen/Qwen2-VL-2B-Instruct"
QWEN3_VL_8B, QWEN3_VL_4B = "Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct"
KLEIN_4B, KLEIN_BASE_4B = "black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B"
LIGHTNING_FILE = "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"

FLUX_TRANSFORMER = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                        num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                        pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dense_act_fn="gelu_new",
              is_gated_act=True)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)
FLUX_VAE = dict(latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
QWEN2_VL_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2)
QWEN25_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31])
KLEIN_4B_TRANSFORMER = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)  # 3.88 B
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960)  # 4.02 B
QWEN3_VL_8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True})
QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                          deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
QWEN3_VL_4B_TEXT = dict(QWEN3_VL_8B_TEXT, hidden_size=2560, intermediate_size=9728)
QWEN3_VL_4B_VISION = dict(QWEN3_VL_8B_VISION, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
                          deepstack_visual_indexes=[5, 11, 17])
QWEN_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}  # Qwen's budget: 1024² -> 1225 tokens
LORA_RANK = 64
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2")


def snapshot_dir(cache: Path, repo_id: str) -> Path:
    """``<cache>/models--Owner--Name/snapshots/<rev>`` with ``refs/main`` pointing at it (huggingface_hub's layout)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def remove_repo(cache: Path, repo_id: str) -> None:
    shutil.rmtree(cache / ("models--" + repo_id.replace("/", "--")), ignore_errors=True)


def has_repo(cache: Path, repo_id: str) -> bool:
    return (snapshot_dir(cache, repo_id) / ".complete").exists()


def _done(snap: Path, t0: float, what: str) -> float:
    os.sync()  # written out before anything is timed (dirty pages slowed the first timed work, vlm_caption.py)
    (snap / ".complete").write_text(what)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in snap.rglob("*.safetensors") if not p.is_symlink()) / 1024**3
    log.info("built %s: %.1f GiB written in %.1f s", what, size, seconds)
    return seconds


def _device_build(device: str, tiny: bool):
    import torch

    class Build:
        def __enter__(self):
            self.dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32 if tiny else torch.bfloat16)
            self.ctx = torch.device(device)
            self.ctx.__enter__()

        def __exit__(self, *exc):
            self.ctx.__exit__(*exc)
            torch.set_default_dtype(self.dtype)

    return Build()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_qwen2_vl(cache: Path, *, tiny: bool, device: str) -> float:
    """Qwen/Qwen2-VL-2B-Instruct: 2.2 B parameters, 2 shards, Qwen2VLProcessor with Qwen's pixel budget."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from flywheel.testing.tiny.tokenizers import QWEN2_VL_CHAT_TEMPLATE, qwen2_tokenizer
    from flywheel.testing.tiny.vlm import build_tiny_qwen2_vl

    t0, snap = time.perf_counter(), snapshot_dir(cache, QWEN2_VL_2B)
    if tiny:
        build_tiny_qwen2_vl(snap, "qwen2_vl")
        return _done(snap, t0, f"{QWEN2_VL_2B} (tiny)")
    tok = qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                     "<|vision_start|>", "<|vision_end|>")}
    cfg = Qwen2VLConfig(text_config=dict(QWEN2_VL_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                         pad_token_id=ids["<|endoftext|>"]),
                        vision_config=QWEN2_VL_VISION, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    with _device_build(device, tiny):
        model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(snap, safe_serialization=True, max_shard_size="4GB")
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=QWEN_PIXELS),
                     video_processor=Qwen2VLVideoProcessor(size=QWEN_PIXELS), tokenizer=tok,
                     chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(snap)
    del model
    _free()
    return _done(snap, t0, QWEN2_VL_2B)


def build_qwen3_vl_4b(cache: Path, *, tiny: bool, device: str) -> float:
    """Qwen/Qwen3-VL-4B-Instruct: 4.4 B parameters (the klein4b stack's captioner and judge)."""
    return build_qwen3_vl_8b(cache, tiny=tiny, device=device, repo=QWEN3_VL_4B, text=QWEN3_VL_4B_TEXT,
                             vision=QWEN3_VL_4B_VISION, tie=True)


def build_qwen3_vl_8b(cache: Path, *, tiny: bool, device: str, repo: str = QWEN3_VL_8B, text: dict | None = None,
                      vision: dict | None = None, tie: bool = False) -> float:
    """Qwen/Qwen3-VL-8B-Instruct: 8.8 B parameters (36-layer text model, 27-block vision tower with deepstack
    features, 16 px patches), Qwen3VLProcessor; ``repo``/``text``/``vision`` give the other sizes."""
    import torch
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)

    from flywheel.testing.tiny.tokenizers import QWEN2_VL_CHAT_TEMPLATE, qwen2_tokenizer
    from flywheel.testing.tiny.vlm import build_tiny_qwen2_vl

    t0, snap = time.perf_counter(), snapshot_dir(cache, repo)
    if tiny:
        build_tiny_qwen2_vl(snap, "qwen3_vl")
        return _done(snap, t0, f"{repo} (tiny)")
    tok = qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                     "<|vision_start|>", "<|vision_end|>")}
    cfg = Qwen3VLConfig(text_config=dict(text or QWEN3_VL_8B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                         pad_token_id=ids["<|endoftext|>"]),
                        vision_config=vision or QWEN3_VL_8B_VISION, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie)
    torch.manual_seed(0)
    with _device_build(device, tiny):
        model = Qwen3VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(snap, safe_serialization=True, max_shard_size="5GB")
    pixels = {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 1024}
    Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, size=pixels),
                     video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, size=pixels), tokenizer=tok,
                     chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(snap)
    del model
    _free()
    return _done(snap, t0, repo)


def build_flux_dev(cache: Path, *, tiny: bool, device: str) -> float:
    """black-forest-labs/FLUX.1-dev in its diffusers layout: transformer (11.9 B, 3 shards), T5-XXL (2 shards),
    CLIP-L, VAE, two tokenizers, scheduler; no root single-file checkpoints."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flywheel.testing.tiny.flux import build_tiny_flux

    t0, snap = time.perf_counter(), snapshot_dir(cache, FLUX_DEV)
    tiny_dir = build_tiny_flux(cache.parent / "tiny-flux")
    if tiny:
        shutil.copytree(tiny_dir, snap, dirs_exist_ok=True)
        return _done(snap, t0, f"{FLUX_DEV} (tiny)")
    pipe = FluxPipeline.from_pretrained(tiny_dir, use_safetensors=True)  # scheduler + tokenizers
    torch.manual_seed(0)
    with _device_build(device, tiny):
        pipe.transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        pipe.text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL))
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        pipe.vae = AutoencoderKL(**FLUX_VAE)
    pipe.save_pretrained(snap, safe_serialization=True, max_shard_size="10GB")
    del pipe
    _free()
    return _done(snap, t0, FLUX_DEV)


def link_flux_kontext(cache: Path) -> float:
    """black-forest-labs/FLUX.1-Kontext-dev: FLUX.1-dev's components (symlinked) under a FluxKontextPipeline index."""
    t0 = time.perf_counter()
    snap = _link_repo(cache, FLUX_DEV, FLUX_KONTEXT, _class_name="FluxKontextPipeline")
    return _done(snap, t0, f"{FLUX_KONTEXT} (components linked to FLUX.1-dev)")


def _link_repo(cache: Path, src_repo: str, repo: str, **index_changes) -> Path:
    """``repo`` as ``src_repo``'s component files (symlinked, as the HF cache links snapshots to blobs) under
    ``src_repo``'s model_index.json with ``index_changes``: the same shapes under another pipeline's name."""
    import json

    src, snap = snapshot_dir(cache, src_repo), snapshot_dir(cache, repo)
    index = {**json.loads((src / "model_index.json").read_text()), **index_changes}
    (snap / "model_index.json").write_text(json.dumps(index, indent=2))
    for file in src.rglob("*"):
        target = snap / file.relative_to(src)
        if file.is_file() and file.name not in ("model_index.json", ".complete") and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(file)
    return snap


def build_flux2_klein(cache: Path, *, tiny: bool, device: str) -> float:
    """black-forest-labs/FLUX.2-klein-4B (distilled, 4 steps) and FLUX.2-klein-base-4B (the one LoRAs train on):
    Flux2KleinPipeline folders with a 3.88 B transformer (2 shards), the Qwen3-4B text encoder, the FLUX.2 VAE.
    The base repo links the distilled one's files (same shapes; the real repos share encoder and VAE) under its
    own model_index.json (``is_distilled: false``)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flywheel.testing.tiny.flux2_klein import build_tiny_flux2_klein

    t0, snap = time.perf_counter(), snapshot_dir(cache, KLEIN_4B)
    tiny_dir = build_tiny_flux2_klein(cache.parent / "tiny-klein")
    if tiny:
        shutil.copytree(tiny_dir, snap, dirs_exist_ok=True)
    else:
        pipe = Flux2KleinPipeline.from_pretrained(tiny_dir, use_safetensors=True)  # scheduler + tokenizer
        torch.manual_seed(0)
        with _device_build(device, tiny):
            pipe.transformer = Flux2Transformer2DModel(**KLEIN_4B_TRANSFORMER)
            pipe.text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
            pipe.vae = AutoencoderKLFlux2()
        pipe.save_pretrained(snap, safe_serialization=True, max_shard_size="5GB")
        del pipe
        _free()
    seconds = _done(snap, t0, KLEIN_4B + (" (tiny)" if tiny else ""))
    (_link_repo(cache, KLEIN_4B, KLEIN_BASE_4B, is_distilled=False) / ".complete").write_text(KLEIN_BASE_4B)
    return seconds


def build_qwen_image_edit(cache: Path, *, tiny: bool, device: str) -> float:
    """Qwen/Qwen-Image-Edit-2511 (QwenImageEditPlusPipeline: 20.4 B transformer, Qwen2.5-VL-7B text encoder,
    Qwen-Image VAE, Qwen2VLProcessor) and the 4-step Lightning LoRA file of lightx2v's repo (rank 64 on the
    attention and MLP projections of every block, diffusers key names)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel)
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor)

    from flywheel.testing.tiny.qwen_image import build_tiny_qwen_image_edit

    t0, snap = time.perf_counter(), snapshot_dir(cache, QWEN_EDIT)
    tiny_dir = cache.parent / "tiny-qwen-image-edit"
    if not (tiny_dir / "model_index.json").exists():
        build_tiny_qwen_image_edit(tiny_dir)
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_dir, use_safetensors=True)
    if not tiny:
        te = pipe.text_encoder.config
        ids = {k: getattr(te, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                           "vision_end_token_id") if hasattr(te, k)}
        proc = pipe.processor
        pipe.processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=QWEN_PIXELS),
                                          tokenizer=proc.tokenizer, video_processor=proc.video_processor,
                                          chat_template=proc.chat_template)
        torch.manual_seed(0)
        with _device_build(device, tiny):
            pipe.transformer = QwenImageTransformer2DModel()  # the defaults are the released 20 B config
            pipe.text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION, **ids))
            pipe.vae = AutoencoderKLQwenImage()
    pipe.save_pretrained(snap, safe_serialization=True, max_shard_size="5GB")
    _lightning_lora(cache, pipe.transformer)
    del pipe
    _free()
    return _done(snap, t0, QWEN_EDIT + (" (tiny)" if tiny else ""))


def _lightning_lora(cache: Path, transformer) -> Path:
    import torch
    from safetensors.torch import save_file

    rank = LORA_RANK if transformer.config.num_layers > 8 else 4
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and name.endswith(LORA_TARGETS):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, dtype=torch.bfloat16) * 0.01
            state[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, dtype=torch.bfloat16)
    snap = snapshot_dir(cache, LIGHTNING)
    save_file(state, str(snap / LIGHTNING_FILE))
    (snap / ".complete").write_text(LIGHTNING)
    return snap / LIGHTNING_FILE


def preset_builders() -> dict:
    """Preset -> (hub repo that must be in the cache, the builder above that writes it): what the benchmarks
    that build a stack's models (``loop.py``, ``scaling.py``) look up."""
    def kontext(cache: Path, *, tiny: bool, device: str) -> float:
        seconds = 0.0 if has_repo(cache, FLUX_DEV) else build_flux_dev(cache, tiny=tiny, device=device)
        return seconds + link_flux_kontext(cache)

    return {"qwen-image-edit-2511-lightning": (QWEN_EDIT, build_qwen_image_edit),
            "flux-kontext-dev": (FLUX_KONTEXT, kontext),
            "flux-dev": (FLUX_DEV, build_flux_dev),
            "flux2-klein-4b": (KLEIN_4B, build_flux2_klein),
            "flux2-klein-base-4b": (KLEIN_BASE_4B, build_flux2_klein),
            "qwen2-vl-2b": (QWEN2_VL_2B, build_qwen2_vl),
            "qwen3-vl-4b": (QWEN3_VL_4B, build_qwen3_vl_4b),
            "qwen3-vl-8b": (QWEN3_VL_8B, build_qwen3_vl_8b)}
