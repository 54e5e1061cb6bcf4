"""Sum the LoRA gradients over the ranks while the backward runs: gradient buckets, as PyTorch DDP's Reducer does.

The LoRA parameters are split into buckets of about ``BUCKET_BYTES`` in *reverse* registration order, the order
in which the backward produces their gradients (last blocks first). On the last micro-batch of an optimizer
step, a hook on every parameter (``Tensor.register_post_accumulate_grad_hook``) copies its finished gradient
into its bucket's flat fp32 buffer; once a bucket is complete, and every bucket before it has been sent, an
async ``dist.all_reduce`` sends it, so the link works while the backward computes the earlier blocks. After the
backward, ``finish`` sends what is left, waits for every bucket and hands the sums back as the gradients.

Every rank sends the buckets in the same order (bucket 0, 1, ...; never out of order), which is what keeps
the collectives matched across ranks: a rank that had no items in this step (an uneven last batch) runs no
backward and sends every bucket in ``finish``, zeros for gradients it never produced; a parameter that got
no gradient in the backward is sent as zeros with the rest of its bucket. The loss rides in the last bucket.

Hand-rolled rather than ``torch.nn.parallel.DistributedDataParallel``, whose Reducer this follows:
- a rank with no item in a global batch runs no forward at all; DDP needs every rank to run a forward and a
  backward (or its ``Join`` context's shadow collectives) to reach its collectives;
- each rank's loss is already its share of the global mean, so the gradients are *summed*; DDP averages
  (divides by the world size), which a comm hook would have to undo;
- DDP wraps the module: ``family.loss`` (``transformer.dtype``), the sampler, the checkpoint and LoRA export
  code address the transformer itself and its parameter names, and the per-block ``torch.compile`` and
  activation checkpointing would run under the wrapper; and it broadcasts buffers every forward, which a
  frozen base does not need. Here the module is the one the one-process path trains, untouched.
"""

from __future__ import annotations

from flywheel.errors import StageError

# About PyTorch DDP's default bucket (bucket_cap_mb=25): a few buckets for a FLUX LoRA, so the first ones are
# sent while the backward still has most of the blocks to go, and each message is large enough for the link.
BUCKET_BYTES = 25 * 2**20


class GradReducer:
    """Async, bucketed all_reduce (sum) of the gradients of ``params`` over the process group."""

    def __init__(self, params: list, bucket_bytes: int | None = None):
        import torch

        cap = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        self.params = list(params)
        self.buckets: list[list] = [[]]  # parameters of each bucket, reverse registration order
        size = 0
        for p in reversed(self.params):
            if size and size + 4 * p.numel() > cap:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += 4 * p.numel()  # the buffers are fp32
        device = self.params[0].device
        self.flat = []  # one fp32 buffer per bucket, kept across steps; the last one ends with the loss
        self.slot: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, offset)
        for b, ps in enumerate(self.buckets):
            offset = 0
            for p in ps:
                self.slot[id(p)] = (b, offset)
                offset += p.numel()
            self.flat.append(torch.empty(offset + (b == len(self.buckets) - 1), dtype=torch.float32, device=device))
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]
        self.armed = False
        self._reset()

    def covers(self, params: list) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def arm(self, total) -> None:
        """Before the last micro-batch's backward: its gradients are sent bucket by bucket as they are ready.
        ``total`` is this rank's loss for the whole step (known before that backward)."""
        self._reset()
        self.flat[-1][-1:].copy_(total.detach().reshape(1))
        self.armed = True

    def finish(self, total):
        """After the backward (or instead of it, on a rank without items): send the buckets not sent yet, in
        order, wait for all, and set every parameter's gradient to the sum over the ranks. Returns the summed
        loss (the same on every rank)."""
        if not self.armed:
            self._reset()
            self.flat[-1][-1:].copy_(total.detach().reshape(1))
        self.armed = False
        for b in range(self.next, len(self.buckets)):
            for p in self.buckets[b]:
                if id(p) not in self.done:  # no gradient in this backward: its current one (or zeros) is sent
                    self._put(p)
            self.pending[b] = 0
        self._send_ready()
        for work in self.works:
            work.wait()
        for b, ps in enumerate(self.buckets):
            for p in ps:
                offset, n = self.slot[id(p)][1], p.numel()
                p.grad = self.flat[b][offset:offset + n].view_as(p).to(p.dtype)  # a view for fp32 parameters
        loss = self.flat[-1][-1].clone()  # the buffers are reused by the next step
        self._reset()
        return loss

    # --- inside the backward ---------------------------------------------------------------------------------
    def _ready(self, p) -> None:
        """Post-accumulate-grad hook: ``p.grad`` is final for this backward."""
        if not self.armed:
            return  # an earlier micro-batch of gradient accumulation: nothing is sent
        if id(p) in self.done:  # its bucket may be on the wire already: a second accumulation would be lost
            raise StageError("a LoRA parameter received its gradient twice in one backward, so its bucket's sum "
                             "would miss a part", hint="this is a bug in flywheel's multi-GPU training (e.g. a "
                             "reentrant activation checkpoint); train without --gpus meanwhile")
        self._put(p)
        self.pending[self.slot[id(p)][0]] -= 1
        self._send_ready()

    def _put(self, p) -> None:
        b, offset = self.slot[id(p)]
        dest = self.flat[b][offset:offset + p.numel()]
        if p.grad is None:
            dest.zero_()
        else:
            dest.copy_(p.grad.reshape(-1))
        self.done.add(id(p))

    def _send_ready(self) -> None:
        """Send the complete buckets in bucket order: every rank issues the same collectives in the same order."""
        import torch.distributed as dist

        while self.next < len(self.buckets) and self.pending[self.next] == 0:
            self.works.append(dist.all_reduce(self.flat[self.next], async_op=True))
            self.next += 1

    def _reset(self) -> None:
        self.pending = [len(ps) for ps in self.buckets]
        self.done: set[int] = set()
        self.next = 0
        self.works: list = []
