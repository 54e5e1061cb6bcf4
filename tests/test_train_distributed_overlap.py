"""The gradient all_reduce of ``--gpus N`` overlaps the backward: two gloo processes run ``Ranks.step`` on a small
LoRA'd stack (4 frozen Linear blocks with a rank-4 LoRA each; one bucket per block), with every
``dist.all_reduce`` and ``Tensor.backward`` call logged in order. The real model's sums are compared with one
process in tests/test_train_distributed.py; here the same comparison is made on this stack, within float32
reduction order (1e-6)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

WIDTH, RANK, BLOCKS = 16, 4, 4
BUCKET_BYTES = 2 * WIDTH * RANK * 4  # one block's two LoRA matrices in fp32: one bucket per block
N_BUCKETS = BLOCKS
# The optimizer steps each rank runs: the global micro-batches (row ids of DATA) of each step.
STEPS = {
    "full": [[0, 1, 2, 3]],              # no accumulation: each rank has 2 items
    "accumulate": [[4, 5, 6, 7], [8, 9, 10, 11]],  # gradient_accumulation 2
    "uneven": [[0, 2, 4, 6], [9]],       # the last global batch holds 1 item: rank 0 has none of it
}


@dataclasses.dataclass
class ToyBatch:
    latents: Any  # (n, WIDTH): batch-first, as ``distributed._slice`` expects


class ToyFamily:
    """The two things ``Ranks.step`` asks of a model family: a sequence length for the t shift, and the loss."""

    def image_seq_len(self, lat) -> int:
        return 256

    def loss(self, model, batch, noise, sigmas, guidance: float = 1.0):
        t = sigmas.to(batch.latents.dtype).view(-1, 1)
        return ((model((1 - t) * batch.latents + t * noise) - (noise - batch.latents)) ** 2).mean()


def toy_model():
    """Frozen Linear blocks, each with a LoRA pair registered right after it (peft's order: block by block), so
    the backward finishes the buckets last block first. ``on_block0_grad`` is called when the backward reaches
    block 0's output, i.e. with every later block done and block 0 (the last bucket) still to go."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(WIDTH, WIDTH).requires_grad_(False)
            self.lora_a = torch.nn.Parameter(torch.randn(RANK, WIDTH) * 0.3)
            self.lora_b = torch.nn.Parameter(torch.randn(WIDTH, RANK) * 0.3)

        def forward(self, x):
            return torch.tanh(self.base(x) + x @ self.lora_a.T @ self.lora_b.T)

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(BLOCKS))
            self.on_block0_grad = None

        def forward(self, x):
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i == 0 and self.on_block0_grad is not None:
                    x.register_hook(self.on_block0_grad)
            return x

    torch.manual_seed(0)
    return Stack()


def run_steps(ranks, events: list | None = None) -> dict:
    """Every step of STEPS on this rank (a fresh model each), as ``flywheel.train`` calls ``Ranks.step``."""
    import torch

    torch.manual_seed(1)
    data = torch.randn(12, WIDTH)
    out = {}
    for name, micro in STEPS.items():
        model = toy_model()
        if events is not None:
            model.on_block0_grad = lambda g: events.append(("block 0 grad",))
            events.append(("step", name))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        loss = ranks.step(ToyFamily(), model, optimizer, micro, lambda ids: ToyBatch(data[ids]),
                          torch.Generator().manual_seed(0), params=params, max_grad_norm=1.0)
        out[name] = {"loss": float(loss), "lora": {n: p.detach().clone() for n, p in model.named_parameters()
                                                   if p.requires_grad}}
    return out


def _rank(rank: int, world: int, init: str, out_dir: str) -> None:
    """One spawned gloo rank: log the collectives and backward calls, run the steps, save what it saw."""
    from datetime import timedelta
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from flywheel.training import reducer
    from flywheel.training.distributed import Ranks

    torch.set_num_threads(1)
    reducer.BUCKET_BYTES = BUCKET_BYTES
    events: list = []
    all_reduce, backward = dist.all_reduce, torch.Tensor.backward

    def logged_all_reduce(tensor, *args, async_op: bool = False, **kwargs):
        events.append(("all_reduce", tensor.numel(), async_op))
        return all_reduce(tensor, *args, async_op=async_op, **kwargs)

    def logged_backward(self, *args, **kwargs):
        events.append(("backward",))
        backward(self, *args, **kwargs)
        events.append(("backward returned",))

    dist.all_reduce, torch.Tensor.backward = logged_all_reduce, logged_backward
    # A rank that misses a collective makes the other fail after 60 s instead of hanging the suite.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    result = run_steps(Ranks(rank=rank, world=world, group=True), events)
    dist.destroy_process_group()
    torch.save({"events": events, "result": result}, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Both ranks' logs and results (one spawn of two gloo processes for the module), and one process's."""
    import torch
    import torch.multiprocessing as mp

    from flywheel.training.distributed import Ranks

    out = tmp_path_factory.mktemp("overlap")
    ctx = mp.start_processes(_rank, args=(2, f"file://{out / 'rendezvous'}", str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo ranks did not finish within 180 s (a collective one rank never joined?)")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return {"ranks": ranks, "one": run_steps(Ranks())}


def steps_of(events: list) -> dict[str, list]:
    """The events of each step, by step name."""
    steps: dict[str, list] = {}
    for e in events:
        if e[0] == "step":
            steps[e[1]] = []
        else:
            steps[list(steps)[-1]].append(e)
    return steps


# The four buckets (last block first; the last one also carries the loss), sent asynchronously.
SENT = [("all_reduce", 2 * WIDTH * RANK, True)] * (N_BUCKETS - 1) + [("all_reduce", 2 * WIDTH * RANK + 1, True)]


def test_each_bucket_is_sent_while_the_backward_still_runs_and_the_sum_is_the_one_process_gradient(two_ranks):
    for rank in two_ranks["ranks"]:
        # Three buckets leave before the backward reaches block 0, the last one (block 0's) before it returns;
        # nothing is sent after it, and nothing blocking.
        assert steps_of(rank["events"])["full"] == [("backward",), *SENT[:3], ("block 0 grad",), SENT[3],
                                                    ("backward returned",)]
    for name in STEPS:
        one = two_ranks["one"][name]
        for rank in two_ranks["ranks"]:
            got = rank["result"][name]
            assert got["loss"] == pytest.approx(one["loss"], rel=1e-6)
            assert got["lora"].keys() == one["lora"].keys()
            for k in one["lora"]:
                assert (got["lora"][k] - one["lora"][k]).abs().max() < 1e-6, (name, k)
    # Identical on both ranks, bit for bit: every rank applies the same summed gradient.
    a, b = (r["result"] for r in two_ranks["ranks"])
    assert all(a[s]["lora"][k].equal(b[s]["lora"][k]) and a[s]["loss"] == b[s]["loss"] for s in a for k in a[s]["lora"])


def test_with_gradient_accumulation_only_the_last_micro_batch_communicates(two_ranks):
    for rank in two_ranks["ranks"]:
        assert steps_of(rank["events"])["accumulate"] == [
            ("backward",), ("block 0 grad",), ("backward returned",),  # micro-batch 1: its gradients stay local
            ("backward",), *SENT[:3], ("block 0 grad",), SENT[3], ("backward returned",)]


def test_a_rank_without_items_in_the_last_batch_joins_every_bucket_in_the_same_order(two_ranks):
    idle, busy = (steps_of(r["events"])["uneven"] for r in two_ranks["ranks"])
    # Rank 0 has none of the last global batch (1 item): no backward for it, and every bucket (zeros for
    # what it did not compute, its first micro-batch's gradient for the rest) afterwards, in bucket order.
    assert idle == [("backward",), ("block 0 grad",), ("backward returned",), *SENT]
    assert busy == [("backward",), ("block 0 grad",), ("backward returned",),
                    ("backward",), *SENT[:3], ("block 0 grad",), SENT[3], ("backward returned",)]


def test_a_gradient_accumulated_twice_in_one_backward_is_an_error_not_a_wrong_sum(monkeypatch):
    """Two reentrant checkpoints that share a LoRA weight accumulate it twice in one backward: its bucket may
    already be on the wire after the first, so the reducer stops instead of sending half the gradient."""
    import torch
    import torch.distributed as dist
    from torch.utils.checkpoint import checkpoint

    from flywheel.errors import StageError
    from flywheel.training.reducer import GradReducer

    sent = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, async_op=False: sent.append(t.clone()))
    w = torch.nn.Parameter(torch.full((3,), 2.0))
    reducer = GradReducer([w])
    reducer.arm(torch.zeros(()))
    x = torch.ones(3, requires_grad=True)
    y = checkpoint(lambda v: v * w, checkpoint(lambda v: v * w, x, use_reentrant=True), use_reentrant=True)
    with pytest.raises(StageError, match="received its gradient twice in one backward"):
        y.sum().backward()
    assert len(sent) == 1  # the bucket left after the first accumulation: the reason this must stop


def test_gradients_accumulate_in_the_buckets_with_no_copy_per_parameter(monkeypatch):
    """A FLUX step is launch-bound and its LoRA has ~380 parameters: the backward writes each gradient straight
    into its bucket (the gradient is a view of it), instead of a copy per parameter into the bucket and back."""
    import torch
    import torch.distributed as dist

    from flywheel.training.reducer import GradReducer

    class Done:
        def wait(self) -> None:
            pass

    sent = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, async_op=False: sent.append(t.numel()) or Done())
    copies = []
    copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: (copies.append(self.numel()),
                                                                              copy(self, src, *a, **k))[1])
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(6)]
    reducer = GradReducer(params, bucket_bytes=2 * 12 * 4)  # two parameters a bucket: three buckets
    storages = {f.untyped_storage().data_ptr() for f in reducer.flat}
    x = torch.randn(5, 3)
    for set_to_none in (True, False):  # both ways an optimizer leaves the gradients between steps
        loss = sum((x @ p.T).square().sum() for p in params)
        expected = torch.autograd.grad(loss, params, retain_graph=True)
        sent.clear(), copies.clear()
        reducer.arm(loss.detach())
        loss.backward()
        total = reducer.finish(loss.detach())
        assert sent == [24, 24, 25]  # the last bucket carries the loss
        assert copies == [1]  # the loss into its slot: no gradient was copied
        assert total == loss
        for p, g in zip(params, expected):
            assert torch.equal(p.grad, g)
            assert p.grad.untyped_storage().data_ptr() in storages
        torch.optim.SGD(params, lr=0.1).zero_grad(set_to_none=set_to_none)
