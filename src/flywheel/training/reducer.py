"""Sum the LoRA gradients over the ranks while the backward runs: gradient buckets, as PyTorch DDP's Reducer does.

The LoRA parameters are split into buckets of about ``BUCKET_BYTES`` in *reverse* registration order, the order
in which the backward produces their gradients (last blocks first). Before the last micro-batch's backward of
an optimizer step, every parameter's ``.grad`` becomes a view of its slot in its bucket's flat fp32 buffer
(DDP's ``gradient_as_bucket_view``), so autograd accumulates the gradient straight into the bucket: no copy per
parameter in the backward and none back afterwards, which matters because a FLUX step is CPU (launch) bound and
a FLUX LoRA has some 380 parameters. A hook on every parameter (``Tensor.register_post_accumulate_grad_hook``)
counts the finished ones; once a bucket is complete, and every bucket before it has been sent, an async
``dist.all_reduce`` sends it, so the link works while the backward computes the earlier blocks. After the
backward, ``finish`` sends what is left and waits for every bucket; the gradients already are the sums.

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
        self.bucket_of: dict[int, int] = {}  # id(param) -> bucket
        self.view: dict[int, object] = {}  # id(param) -> its slot, shaped like it
        for b, ps in enumerate(self.buckets):
            self.flat.append(torch.empty(sum(p.numel() for p in ps) + (b == len(self.buckets) - 1),
                                         dtype=torch.float32, device=device))
            offset = 0
            for p in ps:
                self.bucket_of[id(p)] = b
                self.view[id(p)] = self.flat[b][offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        # Gradients live in the buckets (``_bind``) when they can: fp32 parameters, as the trainer's LoRA is.
        self.as_view = {id(p): p.dtype == torch.float32 for p in self.params}
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]
        self.armed = False
        self._reset()

    def covers(self, params: list) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def arm(self, total) -> None:
        """Before the last micro-batch's backward: its gradients accumulate into the buckets, which are sent one
        by one as they are complete. ``total`` is this rank's loss for the whole step (known before that backward)."""
        self._reset()
        self._bind()
        self.flat[-1][-1:].copy_(total.detach().reshape(1))
        self.armed = True

    def finish(self, total):
        """After the backward (or instead of it, on a rank without items): send the buckets not sent yet, in
        order, wait for all; every parameter's gradient is then the sum over the ranks. Returns the summed loss
        (the same on every rank)."""
        if not self.armed:  # no backward on this rank: its buckets as arm() leaves them
            self.arm(total)
        self.armed = False
        for b in range(self.next, len(self.buckets)):
            for p in self.buckets[b]:
                if id(p) not in self.done:  # no gradient in this backward: its current one (or zeros) is sent
                    self._put(p)
            self.pending[b] = 0
        self._send_ready()
        for work in self.works:
            work.wait()
        for p in self.params:
            if not self.as_view[id(p)]:  # not fp32: the sum comes back as a copy in the parameter's dtype
                p.grad = self.view[id(p)].to(p.dtype)
        loss = self.flat[-1][-1].clone()  # the buffers are reused by the next step
        self._reset()
        return loss

    def _bind(self) -> None:
        """Each fp32 parameter's gradient becomes its slot: zeros, or what earlier micro-batches accumulated
        (moved in once, unless it already is the slot)."""
        if all(p.grad is None for p in self.params):  # the usual case (zero_grad(set_to_none=True)): no copy
            for flat in self.flat:
                flat.zero_()
            for p in self.params:
                if self.as_view[id(p)]:
                    p.grad = self.view[id(p)]
            return
        for p in self.params:
            self._put(p)

    # --- inside the backward ---------------------------------------------------------------------------------
    def _ready(self, p) -> None:
        """Post-accumulate-grad hook: ``p.grad`` is final for this backward."""
        if not self.armed:
            return  # an earlier micro-batch of gradient accumulation: nothing is sent
        if id(p) in self.done:  # its bucket may be on the wire already: a second accumulation would be lost
            raise StageError("a LoRA parameter received its gradient twice in one backward, so its bucket's sum "
                             "would miss a part", hint="this is a bug in flywheel's multi-GPU training (e.g. a "
                             "reentrant activation checkpoint); train without --gpus meanwhile")
        if not self._in_slot(p):  # autograd replaced the gradient instead of accumulating into the slot
            self._put(p)
        self.done.add(id(p))
        self.pending[self.bucket_of[id(p)]] -= 1
        self._send_ready()

    def _in_slot(self, p) -> bool:
        g, view = p.grad, self.view[id(p)]
        return g is not None and g.data_ptr() == view.data_ptr() and self.as_view[id(p)]

    def _put(self, p) -> None:
        """``p.grad`` (zeros if none) into its slot; fp32 parameters then use the slot as their gradient."""
        if self._in_slot(p):
            return
        view = self.view[id(p)]
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad)
        if self.as_view[id(p)]:
            p.grad = view

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
