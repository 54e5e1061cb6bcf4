"""[train] speed options (flywheel.training.speed) on the CPU: every combination that runs here trains,
the CUDA-only ones are skipped with a log line, resume stays bit-exact, and the fp8 matmul arithmetic
(run through the fp8 kernels' CPU implementation) stays close to bf16."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from flywheel.config import TrainConfig
from flywheel.training import checkpoint, speed
from flywheel.training.flux_step import Batch, flow_matching_loss, sample_sigmas, train_step

TINY = {"attention_head_dim": 16, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 32,
        "num_attention_heads": 2, "num_layers": 2, "num_single_layers": 2, "patch_size": 1,
        "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}


def _model(dtype=torch.float32):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**TINY).to(dtype)
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    named = {n: p for n, p in tr.named_parameters() if p.requires_grad}
    for p in named.values():
        p.data = p.data.float()
    return tr.train(), named


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(1, 16, 8, 8, generator=g).to(dtype), torch.randn(1, 8, 32, generator=g).to(dtype),
                 torch.randn(1, 32, generator=g).to(dtype))


def _fixed_loss(tr, batch) -> float:
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(batch.latents.shape, generator=g).to(batch.latents.dtype)
    with torch.no_grad():
        return float(flow_matching_loss(tr, batch, noise, torch.tensor([0.3, 0.7])[:1]))


# Every value of every option at least once (fp8_matmul x compile x checkpointing x attention kernel).
COMBOS = [("auto", True, 1, "auto"), ("on", True, 2, "math"), ("off", False, 0, "math"), ("on", False, 1, "auto"),
          ("auto", False, 2, "auto")]


@pytest.mark.parametrize(("fp8", "compile_", "ckpt", "attn"), COMBOS)
def test_speed_options_train_on_cpu(fp8, compile_, ckpt, attn, caplog):
    cfg = TrainConfig(fp8_matmul=fp8, compile=compile_, gradient_checkpointing=ckpt > 0,
                      checkpoint_every_n_blocks=max(ckpt, 1), attention_backend=attn, learning_rate=3e-2)
    tr, named = _model()
    with caplog.at_level(logging.INFO, logger="flywheel.training.speed"):
        done = speed.apply(tr, cfg, "cpu", base_quantize="none")
        opt = torch.optim.AdamW(named.values(), lr=cfg.learning_rate, **speed.adamw_options(cfg, list(named.values())))
    # CUDA-only options: skipped with one line each, never applied, never an error.
    assert not done.fp8_matmul and done.compiled_blocks == 0
    assert ("compile" in done.skipped) == compile_ and ("fp8_matmul" in done.skipped) == (fp8 == "on")
    assert any("fused_optimizer skipped" in r.message for r in caplog.records)
    if compile_:
        assert any("[train] compile skipped: torch.compile of the blocks runs on CUDA only" in r.message
                   for r in caplog.records)
    assert done.checkpointed_blocks == {0: 0, 1: 4, 2: 2}[ckpt]
    assert done.attention_backend == ("math" if attn == "math" else "native")
    batch = _batch()
    before = _fixed_loss(tr, batch)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        train_step(tr, opt, batch, gen, params=list(named.values()))
    assert _fixed_loss(tr, batch) < 0.98 * before  # the LoRA learned the batch


def _train(steps, *, resume_at=None, tmp_path=None):
    """Checkpointed blocks (1 of 2) and the math attention kernel; returns the per-step losses."""
    cfg = TrainConfig(gradient_checkpointing=True, checkpoint_every_n_blocks=2, attention_backend="math")
    tr, named = _model()
    speed.apply(tr, cfg, "cpu")
    opt = torch.optim.AdamW(named.values(), lr=1e-2, **speed.adamw_options(cfg, list(named.values())))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    losses, start = [], 0
    if resume_at is not None and checkpoint.list_checkpoints(tmp_path):
        state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path)[-1], params=named, optimizer=opt,
                                           lr_scheduler=sched, generator=gen)
        start, losses = state["step"], [r["loss"] for r in state["losses"]]
    for step in range(start, steps):
        losses.append(float(train_step(tr, opt, _batch(), gen, params=list(named.values()), lr_scheduler=sched)))
        if resume_at is not None and step + 1 == resume_at and not checkpoint.list_checkpoints(tmp_path):
            checkpoint.save_checkpoint(tmp_path, step + 1, lora=named, optimizer=opt, lr_scheduler=sched,
                                       generator=gen, data={}, losses=[{"loss": v} for v in losses])
            return losses
    return losses


def test_resume_is_bit_exact_with_speed_options(tmp_path):
    straight = _train(6)
    first = _train(6, resume_at=3, tmp_path=tmp_path)
    assert len(first) == 3
    resumed = _train(6, resume_at=3, tmp_path=tmp_path)
    assert resumed == straight


@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_matmuls_stay_close_to_bf16(rowwise):
    from flywheel.training.fp8 import fp8_frozen_linear_cls

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    ref = lin(x)
    (gref,) = torch.autograd.grad(ref.float().pow(2).sum(), x)
    outs = {}
    for kernels in (False, True):
        m = fp8_frozen_linear_cls()(lin, rowwise=rowwise)
        m.force_scaled_mm = kernels  # True: the fp8 kernels (torch._scaled_mm) on the CPU, as on a GPU
        out = m(x)
        (g,) = torch.autograd.grad(out.float().pow(2).sum(), x)
        rel_out = float((out - ref).float().norm() / ref.float().norm())
        rel_g = float((g - gref).float().norm() / gref.float().norm())
        assert rel_out < 0.06 and rel_g < 0.08, (kernels, rel_out, rel_g)
        outs[kernels] = out.detach()
    assert not torch.equal(outs[False], outs[True])  # the fp8 path quantized the activations too


def test_speed_defaults_are_the_fast_path():
    cfg = TrainConfig()
    assert cfg.compile and cfg.fused_optimizer and cfg.fp8_matmul == "auto" and cfg.attention_backend == "auto"
    assert not speed.wants_fp8(cfg, "none", "cpu")
    assert not speed.wants_fp8(cfg, "int8", "cuda")


def test_fp8_base_layers_share_one_class_and_checkpointing_auto():
    """One FP8FrozenLinear class for every block (torch.compile guards on the class: one class per block
    compiled every block anew), and checkpoint_every_n_blocks = 0 checkpoints every block without fp8 matmuls."""
    from flywheel.training import quantize
    from flywheel.training.fp8 import fp8_frozen_linear_cls

    tr, _ = _model(torch.bfloat16)
    n = quantize.quantize_base(tr, "fp8", "cpu")
    kinds = {type(m) for m in tr.modules() if type(m).__name__ == "FP8FrozenLinear"}
    assert n > 8 and kinds == {fp8_frozen_linear_cls()}
    cfg = TrainConfig()
    assert cfg.checkpoint_every_n_blocks == 0
    assert speed.checkpoint_every(cfg, False) == 1 and speed.checkpoint_every(cfg, True) == 2
    assert speed.checkpoint_every(TrainConfig(checkpoint_every_n_blocks=3), True) == 3
    assert speed.checkpoint_every(TrainConfig(gradient_checkpointing=False), True) == 0
    assert speed.apply(tr, cfg, "cpu", base_quantize="fp8").checkpointed_blocks == 4


def test_auto_checkpointing_leaves_a_small_base_uncheckpointed_under_fp8_at_one_megapixel():
    """klein-base-4B with fp8 matmuls trains 1024² at 0.161 s / 13.7 GiB uncheckpointed vs 0.200 s / 9.5 GiB
    with every 2nd block (H200): 'auto' drops checkpointing there, and keeps it for FLUX.1-dev's 12 B, for
    more pixels per step, without fp8 matmuls, and when the user set a number."""
    cfg = TrainConfig()  # 1024², batch 1
    klein, flux1 = 3.9e9, 11.9e9
    assert speed.checkpoint_every(cfg, True, klein) == 0
    assert speed.checkpoint_every(cfg, True, flux1) == 2
    assert speed.checkpoint_every(cfg, False, klein) == 1
    assert speed.checkpoint_every(TrainConfig(batch_size=2), True, klein) == 2
    assert speed.checkpoint_every(TrainConfig(resolution=1536), True, klein) == 2
    assert speed.checkpoint_every(TrainConfig(resolution=512, batch_size=4), True, klein) == 0
    assert speed.checkpoint_every(TrainConfig(checkpoint_every_n_blocks=4), True, klein) == 4
    tr, _ = _model(torch.bfloat16)
    assert 0 < speed.base_parameters(tr) == sum(p.numel() for p in tr.parameters()) + sum(
        b.numel() for b in tr.buffers())


def test_compiled_big_base_recomputes_inside_blocks_instead_of_checkpointing_every_second_block():
    """FLUX.1-dev (12 B) with fp8 matmuls, compiled: selective recomputation (budget 0.5) measured 0.421 s and
    20.1 GiB at 1024² against 0.477 s / 23.3 GiB for every 2nd block (H200), so 'auto' picks it; not compiled
    (a CPU, compile = false) it still checkpoints every 2nd block; the small base and explicit settings win."""
    flux1, klein = 11.9e9, 3.9e9
    cfg = TrainConfig()
    assert cfg.activation_memory_budget == "auto"
    assert speed.checkpointing(cfg, True, flux1, compiled=True) == (0, 0.5)
    assert speed.checkpointing(cfg, True, flux1, compiled=False) == (2, 1.0)
    assert speed.checkpointing(cfg, True, klein, compiled=True) == (0, 1.0)
    assert speed.checkpointing(cfg, False, flux1, compiled=True) == (1, 1.0)
    assert speed.checkpointing(TrainConfig(activation_memory_budget=1.0), True, flux1, compiled=True) == (2, 1.0)
    assert speed.checkpointing(TrainConfig(activation_memory_budget=0.7), True, flux1, compiled=True) == (0, 0.7)
    assert speed.checkpointing(TrainConfig(checkpoint_every_n_blocks=3), True, flux1, compiled=True) == (3, 1.0)
    assert speed.checkpointing(TrainConfig(gradient_checkpointing=False), True, flux1, compiled=True) == (0, 1.0)
    with pytest.raises(ValidationError):
        TrainConfig(activation_memory_budget=0)


def test_samples_render_without_compiling_the_blocks_again():
    """Training compiles each block for grad mode and the buckets' shapes; a no-grad sample at 1024² would
    compile them all again (tens of seconds on the GPU) for two images. Samples run the blocks eagerly."""
    from torch._dynamo.utils import counters

    from flywheel.training import samples

    block = torch.nn.Linear(8, 8)
    block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False, backend="eager")
    block(torch.randn(2, 8)).sum().backward()  # the training graph
    compiled = counters["stats"]["unique_graphs"]
    with torch.no_grad(), samples.eager():
        block(torch.randn(3, 8))  # another shape, grad off: a new graph unless eager
    assert counters["stats"]["unique_graphs"] == compiled
    with torch.no_grad():
        block(torch.randn(3, 8))
    assert counters["stats"]["unique_graphs"] == compiled + 1  # what sampling cost before


def _shape_batch(h, w):
    g = torch.Generator().manual_seed(h * 100 + w)
    return Batch(torch.randn(1, 16, h, w, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g))


def test_compile_dynamic_traces_every_bucket_shape_into_one_graph_per_block_type():
    """Each static bucket shape compiles every block type again (~40 s on an H200); with compile_dynamic the
    blocks trace once with a symbolic sequence length, whole (fullgraph), and train on every shape. Dynamo's
    eager backend stands in for inductor on the CPU: it checks the tracing (graph breaks, shape guards), not
    inductor's kernels, which only the GPU benchmark runs (`train_step.py --variants default default+dyn`)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tr, named = _model()
    speed.wrap_blocks(tr, 0, compile=True, dynamic=True, backend="eager")
    opt = torch.optim.AdamW(named.values(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    graphs = []
    # Three buckets, three sequence lengths (25, 15, 14 tokens). The sizes avoid the tiny model's own dims:
    # dynamo gives equal sizes one symbol, and a sequence as long as a head would be specialised with it.
    # (Static graphs, the default, add 4 graphs per new length here: 4, 8, 12.)
    for h, w in [(10, 10), (6, 10), (4, 14)]:
        loss = train_step(tr, opt, _shape_batch(h, w), gen, params=list(named.values()))
        assert torch.isfinite(loss)
        graphs.append(counters["stats"]["unique_graphs"])
    # Per shape: 2 block types x (the first block of each type, whose input differs: no grad / another stride).
    assert graphs == [4, 4, 4], graphs
    torch._dynamo.reset()


def test_step_inputs_reach_the_device_with_the_values_of_a_plain_copy():
    """t, noise and the cached batch go to the GPU through pinned memory without a wait; the values (and on
    the CPU the path) are exactly a plain ``.to``'s, so resumed runs stay bit-exact."""
    from flywheel.training.families.flux1 import Flux1
    from flywheel.training.step import draw, to_device

    x = torch.randn(2, 16, 8, 8)
    out = to_device(x, "cpu", torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x.to(torch.bfloat16))
    lat = torch.zeros(1, 16, 8, 8, dtype=torch.bfloat16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sigmas, noise = draw(Flux1(), lat, g1, "shifted_sigmoid")
    ref_sigmas = sample_sigmas(1, g2, image_seq_len=Flux1().image_seq_len(lat), sampling="shifted_sigmoid")
    assert torch.equal(sigmas, ref_sigmas)
    assert noise.dtype == torch.bfloat16 and torch.equal(noise, torch.randn(lat.shape, generator=g2).to(torch.bfloat16))


@pytest.mark.gpu
def test_to_device_copies_asynchronously_from_pinned_memory_on_cuda():
    from flywheel.training.step import to_device

    x = torch.randn(4, 16, 64, 64)
    out = to_device(x, "cuda", torch.bfloat16)
    assert out.is_cuda and out.dtype == torch.bfloat16
    assert torch.equal(out.cpu(), x.to(torch.bfloat16))


def test_the_training_attention_kernel_stays_on_the_trained_model():
    """diffusers' set_attention_backend also sets the process-wide default: a model built after training (the
    pipelines of the same `flywheel run`) ran on the training kernel, and the plain path computed differently
    from a spawned --gpus worker (an order-dependent test failure). Only the trained model changes now."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    tr, _ = _model()
    done = speed.apply(tr, TrainConfig(attention_backend="math"), "cpu")
    assert done.attention_backend == "math"
    assert _AttentionBackendRegistry._active_backend == before
    procs = [m.processor for m in tr.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    assert procs and {str(p._attention_backend.value) for p in procs} == {"_native_math"}


@pytest.mark.gpu
def test_late_loss_reads_a_step_without_waiting_for_the_next():
    """The value read after more work was queued is the step's own loss, from pinned memory."""
    from flywheel.training.step import LateLoss

    x = torch.randn(2048, 2048, device="cuda")
    loss = (x * 2).sum()
    late = LateLoss(loss)
    for _ in range(20):  # the next step's work, queued behind the loss copy
        x = x @ x / 2048
    assert late.host.is_pinned()
    assert late.value() == float(loss)


def test_cuda_graphs_replay_compiled_blocks_unless_a_block_is_checkpointed():
    """'auto' puts CUDA graphs over the compiled blocks (FLUX.1-dev's forward was launch-bound on the H200);
    never without compile (a CPU), nor with torch.utils.checkpoint blocks; 'off' is off; on a CPU 'on' is
    skipped with a log line, not an error."""
    assert TrainConfig().cuda_graphs == "auto"
    assert speed.cuda_graphs(TrainConfig(), True, 0)
    assert not speed.cuda_graphs(TrainConfig(), False, 0)
    assert not speed.cuda_graphs(TrainConfig(), True, 2)
    assert not speed.cuda_graphs(TrainConfig(cuda_graphs="off"), True, 0)
    assert speed.cuda_graphs(TrainConfig(cuda_graphs="on"), True, 0)
    assert not speed.cuda_graphs(TrainConfig(gpus=2), True, 0)  # not measured with the gradient all_reduce yet
    assert speed.cuda_graphs(TrainConfig(gpus=2, cuda_graphs="on"), True, 0)
    tr, _ = _model()
    done = speed.apply(tr, TrainConfig(cuda_graphs="on"), "cpu")
    assert not done.cuda_graphs and "cuda_graphs" in done.skipped


@pytest.mark.gpu
def test_cuda_graphs_train_the_same_lora_as_the_compiled_blocks_alone():
    """Five steps with the blocks replayed as CUDA graphs give the losses and LoRA of the same compiled
    blocks launched one kernel at a time (the graphs replay the same kernels on the same inputs)."""
    runs = []
    for graphs in ("off", "on"):
        torch._dynamo.reset()
        tr, named = _model()
        tr.to("cuda")
        done = speed.apply(tr, TrainConfig(cuda_graphs=graphs, fp8_matmul="off", gradient_checkpointing=False),
                           "cuda")
        assert done.cuda_graphs == (graphs == "on")
        opt = torch.optim.AdamW(named.values(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        b = _batch()
        batch = Batch(*(t.cuda() for t in (b.latents, b.prompt_embeds, b.pooled)))
        losses = [float(train_step(tr, opt, batch, gen, params=list(named.values()))) for _ in range(5)]
        runs.append((losses, torch.cat([p.detach().flatten().cpu() for p in named.values()])))
    (l0, w0), (l1, w1) = runs
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert torch.allclose(w0, w1, rtol=1e-4, atol=1e-6)


def test_lora_computes_in_the_activations_dtype_with_fp32_weights_and_gradients():
    """lora_compute = "bf16": a bf16 model's LoRA branch multiplies in bf16 (as autocast would) while the LoRA's
    weights and their gradients stay fp32, so AdamW, checkpoints and the saved LoRA are unchanged. 'auto' is
    bf16 on CUDA and fp32 on a CPU (the CPU tests compare runs bit for bit)."""
    from flywheel.training.lora_compute import compute_in_input_dtype

    assert speed.lora_compute(TrainConfig(), "cuda") == "bf16" and speed.lora_compute(TrainConfig(), "cpu") == "fp32"
    assert speed.lora_compute(TrainConfig(lora_compute="bf16"), "cpu") == "bf16"
    tr, named = _model(torch.bfloat16)
    layer = tr.transformer_blocks[0].attn.to_q
    with torch.no_grad():  # a non-zero B, so the branch contributes
        for p in layer.lora_B.values():
            p.weight.normal_()
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base_layer(x) + (x @ a.bfloat16().T) @ b.bfloat16().T * layer.scaling["default"]
    assert compute_in_input_dtype(tr) == len([m for m in tr.modules() if hasattr(m, "lora_A")])
    got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    done = speed.apply(tr, TrainConfig(lora_compute="bf16", fp8_matmul="off"), "cpu")
    assert done.lora_compute == "bf16"
    loss = train_step(tr, torch.optim.AdamW(named.values(), lr=1e-3), _batch(torch.bfloat16), torch.Generator().manual_seed(0),
                      params=list(named.values()))
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in named.values())
