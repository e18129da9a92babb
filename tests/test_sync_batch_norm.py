"""masknorm.MaskedSyncBatchNorm across real processes (gloo on 127.0.0.1).

Modelled on torch's SyncBatchNorm tests: each rank runs its own batch (other
sizes, lengths, all padding, N = 0) and the results must be those of
MaskedBatchNorm1d on the concatenation of every rank's batch, computed here in
the parent process in float64: outputs, input gradients, weight and bias
gradients (summed over ranks; DDP averages them), running statistics and
num_batches_tracked. Padded positions hold NaN in the input and in the
incoming gradient, so any leak shows.

The ranks are persistent worker processes (one pool of 2 and one of 3 per
module, started once: importing torch dominates), each with a gloo process
group whose timeout bounds every collective; the parent waits a bounded time
for every answer and replaces a pool that stopped answering.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import masknorm

MULTIPROCESS = pytest.mark.slow  # the tests that spawn 2- and 3-process groups

PG_TIMEOUT_S = 20  # every collective of the workers' process groups
# The collectives of the scenarios whose failure is a hang (a rank missing a
# collective): they run on a group with this timeout, right after a barrier,
# so that the ranks enter them together and a hang is reported in seconds.
HANG_TIMEOUT_S = 5
START_TIMEOUT_S = 180  # a worker's imports and process-group setup (a busy 2-core machine)
RUN_TIMEOUT_S = 90  # one scenario on every rank

F64 = torch.float64

# --------------------------------------------------------------------------
# data, shared by the workers and the parent (deterministic per seed and rank)
# --------------------------------------------------------------------------

# A rank's batch: (N, L, kind); L None is 2-D (N, C) input with an (N,) mask.
# kind: "lengths" (random lengths, or random padded rows for 2-D), "full"
# (all-False mask), "nomask" (padding_mask=None), "allpad", "one" (exactly one
# valid position), "far" (all valid, the values shifted by 100 * rank - 50: rank
# means far apart).
Spec = Tuple[int, Optional[int], str]


def _batch(seed: int, rank: int, spec: Spec, C: int, channels_last: bool, dtype: torch.dtype = F64,
           fill: float = float("nan")):
    """(input, padding_mask or None, grad_output) of one rank; ``fill`` at padding."""
    N, L, kind = spec
    g = torch.Generator().manual_seed(1000 * seed + rank)
    shape = (N, C) if L is None else ((N, L, C) if channels_last else (N, C, L))
    offset = torch.linspace(-3, 5, C, dtype=F64)
    offset = offset.view(1, C) if L is None else (offset.view(1, 1, C) if channels_last else offset.view(1, C, 1))
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + offset
    grad = torch.randn(shape, generator=g, dtype=F64)
    mshape = (N,) if L is None else (N, L)
    if kind == "lengths":
        if L is None:
            mask = torch.rand(mshape, generator=g) < 0.3
        else:
            lengths = torch.randint(1, L + 1, (N,), generator=g)
            mask = torch.arange(L).view(1, L) >= lengths.view(N, 1)
    elif kind in ("full", "nomask"):
        mask = torch.zeros(mshape, dtype=torch.bool)
    elif kind == "far":
        mask = torch.zeros(mshape, dtype=torch.bool)
        x = x + (100.0 * rank - 50.0)
    elif kind == "allpad":
        mask = torch.ones(mshape, dtype=torch.bool)
    elif kind == "one":
        mask = torch.ones(mshape, dtype=torch.bool)
        mask.view(-1)[0] = False
    else:
        raise ValueError(kind)
    expand = mask.view(N, 1) if L is None else (mask.unsqueeze(-1) if channels_last else mask.unsqueeze(1))
    x = x.masked_fill(expand, fill).to(dtype)
    grad = grad.masked_fill(expand, fill).to(dtype)
    return x, (None if kind == "nomask" else mask), grad


def _init_params(bn: nn.Module, seed: int) -> None:
    """The same weight and bias on every rank and in the reference."""
    g = torch.Generator().manual_seed(7 + seed)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(1 + 0.5 * torch.randn(bn.weight.shape, generator=g, dtype=F64))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=F64))


def _bn_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        momentum=kw.get("momentum", 0.1), affine=kw.get("affine", True),
        track_running_stats=kw.get("track", True), bias=kw.get("bias", True),
        channels_last=kw.get("channels_last", False), dtype=F64,
    )


def _mask_or_false(x: torch.Tensor, mask: Optional[torch.Tensor], spec: Spec) -> torch.Tensor:
    return mask if mask is not None else torch.zeros((spec[0],) if spec[1] is None else spec[:2], dtype=torch.bool)


def _concat(parts, specs: Sequence[Spec], channels_last: bool):
    """One batch from the ranks' batches: 3-D ones padded (NaN, mask True) to the longest length."""
    L = None if specs[0][1] is None else max(s[1] for s in specs)
    xs, ms, gs = [], [], []
    for (x, m, g), spec in zip(parts, specs):
        m = _mask_or_false(x, m, spec)
        if L is not None and spec[1] < L:
            extra = L - spec[1]
            dim = 1 if channels_last else 2
            pad_shape = list(x.shape)
            pad_shape[dim] = extra
            x = torch.cat([x, x.new_full(pad_shape, float("nan"))], dim)
            g = torch.cat([g, g.new_full(pad_shape, float("nan"))], dim)
            m = torch.cat([m, m.new_ones(m.shape[0], extra)], 1)
        xs.append(x), ms.append(m), gs.append(g)
    return torch.cat(xs), torch.cat(ms), torch.cat(gs)


def _slice(t: torch.Tensor, r: int, specs: Sequence[Spec], channels_last: bool) -> torch.Tensor:
    """Rank r's part of a concatenated batch."""
    start = sum(s[0] for s in specs[:r])
    N, L, _ = specs[r]
    part = t[start:start + N]
    if L is not None:
        part = part[:, :L] if channels_last else part[:, :, :L]
    return part


def _packed(x: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The valid positions as (n, C) rows."""
    if x.dim() == 3 and not channels_last:
        x = x.transpose(1, 2)
    return x[~mask]


# A rank's batch of 4-D or 5-D input: (N, spatial); its mask covers every
# spatial dim ("all") or only the last ("time"; random lengths).
SpatialSpec = Tuple[int, Tuple[int, ...]]


def _spatial_batch(seed: int, rank: int, spec: SpatialSpec, C: int, mask_dims: str):
    """(input (N, C, *spatial), padding_mask, grad_output), NaN at padding."""
    N, spatial = spec
    g = torch.Generator().manual_seed(1000 * seed + rank)
    shape = (N, C, *spatial)
    offset = torch.linspace(-3, 5, C, dtype=F64).view(1, C, *([1] * len(spatial)))
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + offset + rank
    grad = torch.randn(shape, generator=g, dtype=F64)
    T = spatial[-1]
    if mask_dims == "time":
        mask = torch.arange(T).view(1, T) >= torch.randint(1, T + 1, (N, 1), generator=g)
        full = mask.view(N, *([1] * (len(spatial) - 1)), T).expand(N, *spatial)
    else:
        mask = full = torch.rand((N, *spatial), generator=g) < 0.3
    x = x.masked_fill(full.unsqueeze(1), float("nan"))
    grad = grad.masked_fill(full.unsqueeze(1), float("nan"))
    return x, mask, grad


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, C, *spatial) as a rank passes it: contiguous, in channels-last memory, or (N, *spatial, C)."""
    if layout == "memory_format":
        return t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.movedim(1, -1).contiguous() if layout == "channels_last" else t


# --------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------

_SCENARIOS: Dict[str, Callable[..., Dict[str, Any]]] = {}


def _scenario(fn):
    _SCENARIOS[fn.__name__] = fn
    return fn


class _Ctx:
    def __init__(self, rank: int, world_size: int, groups: Dict[str, Any]):
        self.rank, self.world_size, self.groups = rank, world_size, groups


def _error(e: BaseException) -> Dict[str, str]:
    return {"type": type(e).__name__, "message": str(e)}


def _step(ctx: _Ctx, bn: nn.Module, seed: int, spec: Spec, C: int, channels_last: bool, dtype=F64):
    x, m, g = _batch(seed, ctx.rank, spec, C, channels_last, dtype)
    x.requires_grad_()
    y = bn(x, m)
    y.backward(g)
    return y.detach(), x.grad


@_scenario
def train(ctx: _Ctx, C: int, plan: List[List[Spec]], seed: int = 0, group: Any = None,
          dtype: str = "float64", into_tensor: bool = False, generic: bool = False, **kw) -> Dict[str, Any]:
    """len(plan) training steps of one MaskedSyncBatchNorm; plan[step][rank] is this rank's batch.
    ``into_tensor``: gather with all_gather_into_tensor, as on NCCL; ``generic``: the ops run
    their ATen-op kernels (those of devices without fused kernels), not the CPU ones."""
    if into_tensor or generic:
        from masknorm import _C, distributed

        real = distributed._gathers_into_tensor
        distributed._gathers_into_tensor = lambda group: into_tensor or real(group)
        _C._force_generic_kernels(generic)
        try:
            return train(ctx, C, plan, seed, group, dtype, **kw)
        finally:
            distributed._gathers_into_tensor = real
            _C._force_generic_kernels(False)
    group_name = group[ctx.rank] if isinstance(group, list) else group
    bn = masknorm.MaskedSyncBatchNorm(C, process_group=ctx.groups[group_name], **_bn_kwargs(kw))
    _init_params(bn, seed)
    out: Dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": []}
    for step, specs in enumerate(plan):
        y, dx = _step(ctx, bn, seed + step, specs[ctx.rank], C, kw.get("channels_last", False), getattr(torch, dtype))
        out["y"].append(y), out["dx"].append(dx)
        out["dw"].append(None if bn.weight is None else bn.weight.grad.clone())
        out["db"].append(None if bn.bias is None else bn.bias.grad.clone())
        bn.zero_grad()
    out["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    return out


@_scenario
def train_spatial(ctx: _Ctx, C: int, plan: List[List[SpatialSpec]], layout: str, mask_dims: str,
                  seed: int = 0) -> Dict[str, Any]:
    """Training steps of a MaskedSyncBatchNorm on 4-D/5-D input in ``layout``; outputs and
    input gradients returned as (N, C, *spatial). Then an in-place ReLU on its output."""
    bn = masknorm.MaskedSyncBatchNorm(C, channels_last=layout == "channels_last", dtype=F64)
    _init_params(bn, seed)
    out: Dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": [], "strides_kept": []}
    for step, specs in enumerate(plan):
        x, m, g = _spatial_batch(seed + step, ctx.rank, specs[ctx.rank], C, mask_dims)
        xin = _in_layout(x, layout).requires_grad_()
        y = bn(xin, m)
        y.backward(_in_layout(g, layout))
        memory = torch.contiguous_format if layout != "memory_format" else (
            torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        out["strides_kept"].append(y.is_contiguous(memory_format=memory) or y.numel() == 0)  # empty: any format
        back = (lambda t: t.movedim(-1, 1)) if layout == "channels_last" else (lambda t: t)
        out["y"].append(back(y.detach())), out["dx"].append(back(xin.grad))
        out["dw"].append(bn.weight.grad.clone()), out["db"].append(bn.bias.grad.clone())
        bn.zero_grad()
    out["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    # an in-place op on the output (ReLU(inplace=True) after the norm, as conv nets have it)
    x, m, _ = _spatial_batch(seed, ctx.rank, plan[0][ctx.rank], C, mask_dims)
    xin = _in_layout(x, layout).requires_grad_()
    torch.relu_(bn(xin, m)).sum().backward()
    out["relu_grad_finite"] = bool(xin.grad.isfinite().all())
    return out


def _jagged_batch(seed: int, rank: int, lengths: Sequence[int], C: int):
    """(jagged input (N, j, C), the tokens' grad_output (T, C)) of one rank."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.nested.nested_tensor([torch.randn(n, C, generator=g, dtype=F64) * 2 + rank for n in lengths],
                                   layout=torch.jagged)
    return x, torch.randn(sum(lengths), C, generator=g, dtype=F64)


@_scenario
def train_jagged(ctx: _Ctx, C: int, plan: List[List[List[int]]], seed: int = 0) -> Dict[str, Any]:
    """Training steps of a MaskedSyncBatchNorm on jagged (N, j, C) input; outputs and input
    gradients as the tokens (T, C), and the offsets of the output."""
    bn = masknorm.MaskedSyncBatchNorm(C, dtype=F64)
    _init_params(bn, seed)
    out: Dict[str, Any] = {"y": [], "dx": [], "offsets_kept": [], "dw": [], "db": []}
    for step, lengths in enumerate(plan):
        x, g = _jagged_batch(seed + step, ctx.rank, lengths[ctx.rank], C)
        x.requires_grad_()
        y = bn(x)
        y.values().backward(g)
        out["offsets_kept"].append(y.is_nested and torch.equal(y.offsets(), x.offsets()))
        out["y"].append(y.values().detach()), out["dx"].append(x.grad.values())
        out["dw"].append(bn.weight.grad.clone()), out["db"].append(bn.bias.grad.clone())
        bn.zero_grad()
    out["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    return out


@_scenario
def failing_forward(ctx: _Ctx, C: int, plan: List[List[Spec]], mismatch: str = "", seed: int = 0,
                    **kw) -> Dict[str, Any]:
    """A forward that must raise on every rank; then a good step, to show the ranks are still in step.
    The forward runs on the group with the short timeout (HANG_TIMEOUT_S), after a barrier: a rank
    waiting in a collective that another rank skipped gives up there ("hung")."""
    cl = kw.get("channels_last", False)
    features = C + ctx.rank if mismatch == "num_features" else C
    bn = masknorm.MaskedSyncBatchNorm(features, process_group=ctx.groups["hang"], **_bn_kwargs(kw))
    x, m, _ = _batch(seed, ctx.rank, plan[0][ctx.rank], C, cl)
    if mismatch == "mask" and ctx.rank == 1:
        m = torch.zeros(m.shape[0] + 1, *m.shape[1:], dtype=torch.bool)
    if mismatch == "channels" and ctx.rank == 1:
        x = x.narrow(1 if x.dim() == 2 or not cl else 2, 0, C - 1)
    if mismatch == "spatial_mask":  # (N, C, 1, L) input; rank 1's time mask one position too long
        x = x.unsqueeze(2)
        if ctx.rank == 1:
            m = torch.zeros(m.shape[0], m.shape[1] + 1, dtype=torch.bool)
    out: Dict[str, Any] = {"buffers_before": {k: v.clone() for k, v in bn.named_buffers()}, "hung": False}
    dist.barrier()
    start = time.monotonic()
    with _Collectives() as seen:
        try:
            bn(x, m)
            out["error"] = None
        except Exception as e:  # noqa: BLE001  (the test looks at it)
            out["error"] = _error(e)
    out["seconds"] = time.monotonic() - start
    out["collectives"] = seen.ops
    # the expected errors come at once; one after the timeout is a collective given up on
    out["hung"] = out["error"] is not None and out["seconds"] >= HANG_TIMEOUT_S * 0.9
    out["buffers_after"] = {k: v.clone() for k, v in bn.named_buffers()}
    good = masknorm.MaskedSyncBatchNorm(C, **_bn_kwargs(kw))
    _init_params(good, seed)
    out["after"] = _step(ctx, good, seed + 1, (3, 5, "lengths"), C, cl)
    return out


class _Collectives(TorchDispatchMode):
    """Records the c10d ops (the collectives every torch.distributed call dispatches) run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _collectives(fn: Callable[[], Any]) -> Tuple[Any, List[str]]:
    with _Collectives() as mode:
        result = fn()
    return result, mode.ops


@_scenario
def count_collectives(ctx: _Ctx, C: int, **kw) -> Dict[str, Any]:
    """The collectives of each forward and backward: training steps, eval, no input gradient."""
    cl = kw.get("channels_last", False)
    bn = masknorm.MaskedSyncBatchNorm(C, **_bn_kwargs(kw))
    counts = {}
    for step in range(3):
        x, m, g = _batch(step, ctx.rank, (4, 6, "lengths"), C, cl)
        x.requires_grad_()
        y, counts[f"forward {step}"] = _collectives(lambda: bn(x, m))
        _, counts[f"backward {step}"] = _collectives(lambda: y.backward(g))
    x, m, g = _batch(9, ctx.rank, (4, 6, "lengths"), C, cl)  # weight and bias gradients only
    y, counts["forward, input without grad"] = _collectives(lambda: bn(x, m))
    _, counts["backward, input without grad"] = _collectives(lambda: y.backward(g))
    bn.eval()
    x.requires_grad_()
    y, counts["eval forward"] = _collectives(lambda: bn(x, m))
    _, counts["eval backward"] = _collectives(lambda: y.backward(g))
    return {"counts": counts}


class ConvNet(nn.Module):
    """A convolutional front end: Conv1d -> BatchNorm1d (masked) -> ReLU -> Conv1d."""

    def __init__(self, c_in: int, C: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, C, 3, padding=1)
        self.norm = nn.BatchNorm1d(C, momentum=None)
        self.head = nn.Conv1d(C, 2, 1)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x), padding_mask=padding_mask)))


def _convnet(c_in: int, C: int) -> ConvNet:
    torch.manual_seed(3)
    return ConvNet(c_in, C).to(F64)


@_scenario
def ddp_training(ctx: _Ctx, c_in: int, C: int, plan: List[List[Spec]], lr: float) -> Dict[str, Any]:
    """SGD steps of DistributedDataParallel(convert_model(ConvNet, sync_batch_norm=True))."""
    model = masknorm.convert_model(_convnet(c_in, C), sync_batch_norm=True)
    assert type(model.norm) is masknorm.MaskedSyncBatchNorm
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    losses = []
    for step, specs in enumerate(plan):
        x, m, target = _batch(step, ctx.rank, specs[ctx.rank], c_in, False, fill=0.0)
        loss = (ddp(x, m) * target[:, :2]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


class ConvNet2d(nn.Module):
    """Conv2d -> BatchNorm2d (masked over time) -> ReLU(inplace) -> Conv2d, on (N, C, F, T)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.relu(self.norm(self.conv(x), padding_mask=padding_mask)))


def _convnet_2d() -> ConvNet2d:
    torch.manual_seed(5)
    return ConvNet2d().to(F64)


def _conv_2d_batch(seed: int, rank: int, N: int):
    """(input (N, 2, 3, 6), time mask (N, 6), target (N, 2, 3, 6)), zeros at padding."""
    g = torch.Generator().manual_seed(100 * seed + rank)
    mask = torch.arange(6).view(1, 6) >= torch.randint(1, 7, (N, 1), generator=g)
    x = (torch.randn(N, 2, 3, 6, generator=g, dtype=F64) + rank).masked_fill(mask.view(N, 1, 1, 6), 0.0)
    return x, mask, torch.randn(N, 2, 3, 6, generator=g, dtype=F64)


@_scenario
def ddp_training_2d(ctx: _Ctx, sizes: List[List[int]], lr: float) -> Dict[str, Any]:
    """SGD steps of DistributedDataParallel(convert_model(ConvNet2d, sync_batch_norm=True))."""
    model = masknorm.convert_model(_convnet_2d(), sync_batch_norm=True)
    assert type(model.norm) is masknorm.MaskedSyncBatchNorm
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    losses = []
    for step, per_rank in enumerate(sizes):
        x, m, target = _conv_2d_batch(step, ctx.rank, per_rank[ctx.rank])
        loss = (ddp(x, m) * target).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _worker(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        groups: Dict[str, Any] = {None: None, "world": None}
        groups["hang"] = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=HANG_TIMEOUT_S))
        ctx = _Ctx(rank, world_size, groups)
        # A first training step, recording collectives: the one-time costs of a first synchronized
        # step (seconds on a busy machine) come here, not inside a timed scenario.
        with _Collectives():
            _step(ctx, masknorm.MaskedSyncBatchNorm(3), 0, (2, 4, "lengths"), 3, False, torch.float32)
        dist.barrier(group=groups["hang"])
        if world_size == 3:  # every rank creates every group
            groups["pair"] = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
            groups["solo"] = dist.new_group([2], timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        outbox.put((rank, "ready", None))
    except BaseException as e:  # noqa: BLE001
        outbox.put((rank, "error", (_error(e), traceback.format_exc())))
        return
    while True:
        message = inbox.get()
        if message is None:
            break
        name, kwargs = message
        try:
            buf = io.BytesIO()
            torch.save(_SCENARIOS[name](ctx, **kwargs), buf)
            outbox.put((rank, "ok", buf.getvalue()))
        except BaseException as e:  # noqa: BLE001  (reported to the parent)
            outbox.put((rank, "error", (_error(e), traceback.format_exc())))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Pool:
    """world_size worker processes in one gloo process group, running scenarios on request."""

    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.broken = False
        self.outbox = context.Queue()
        self.inboxes = [context.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            context.Process(target=_worker, args=(r, world_size, port, self.inboxes[r], self.outbox), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._collect("startup", START_TIMEOUT_S, expect="ready")

    def _collect(self, what: str, timeout: float, expect: str = "ok") -> List[Any]:
        results: List[Any] = [None] * self.world_size
        missing = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        while missing:
            try:
                rank, status, payload = self.outbox.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.broken = True
                    pytest.fail(f"{what}: no answer from rank(s) {sorted(missing)} within {timeout}s "
                                f"(exited: {dead})")
                continue
            missing.discard(rank)
            if status == "error":
                results[rank] = {"worker_error": payload}
            elif status == expect == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        return results

    def run(self, scenario: str, **kwargs: Any) -> List[Dict[str, Any]]:
        """Runs a scenario on every rank; a list of their results, by rank."""
        for q in self.inboxes:
            q.put((scenario, kwargs))
        results = self._collect(scenario, RUN_TIMEOUT_S)
        for r, res in enumerate(results):
            if "worker_error" in res:
                pytest.fail(f"rank {r}: {res['worker_error'][1]}")
        return results

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


@pytest.fixture(scope="module")
def pools():
    """get(world_size): a live pool of that many ranks (replaced if a test broke it)."""
    live: Dict[int, _Pool] = {}

    def get(world_size: int) -> _Pool:
        pool = live.get(world_size)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close()
            pool = live[world_size] = _Pool(world_size)
        return pool

    yield get
    for pool in live.values():
        pool.close()


# --------------------------------------------------------------------------
# the reference: MaskedBatchNorm1d on the concatenated batch, in this process
# --------------------------------------------------------------------------


def _reference(C: int, plan: List[List[Spec]], ranks: Sequence[int], seed: int = 0, dtype: str = "float64",
               **kw) -> Dict[str, Any]:
    cl = kw.get("channels_last", False)
    bn = masknorm.MaskedBatchNorm1d(C, **_bn_kwargs(kw))
    _init_params(bn, seed)
    out: Dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": [], "packed": []}
    for step, specs in enumerate(plan):
        specs = [specs[r] for r in ranks]
        parts = [_batch(seed + step, r, s, C, cl, getattr(torch, dtype)) for r, s in zip(ranks, specs)]
        x, m, g = _concat(parts, specs, cl)
        x.requires_grad_()
        y = bn(x, m)
        y.backward(g)
        out["y"].append([_slice(y.detach(), i, specs, cl) for i in range(len(ranks))])
        out["dx"].append([_slice(x.grad, i, specs, cl) for i in range(len(ranks))])
        out["dw"].append(None if bn.weight is None else bn.weight.grad.clone())
        out["db"].append(None if bn.bias is None else bn.bias.grad.clone())
        out["packed"].append(_packed(x.detach(), m, cl))
        bn.zero_grad()
    out["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    return out


def _close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, check_dtype=False, **kw)


def _check_against_reference(results, C, plan, ranks, tol=None, **kw):
    """Each rank in ``ranks`` against MaskedBatchNorm1d on their concatenated batches."""
    tol = tol or {}
    ref = _reference(C, plan, ranks, **kw)
    for step in range(len(plan)):
        for i, r in enumerate(ranks):
            for key in ("y", "dx"):
                got = results[r][key][step]
                assert not got.isnan().any(), f"NaN in rank {r}'s {key}, step {step}"
                _close(got, ref[key][step][i], msg=lambda s: f"rank {r} {key} step {step}: {s}", **tol)
        for key in ("dw", "db"):  # each rank's share; summed (DDP averages: the same up to 1/world_size)
            if ref[key][step] is None:
                assert all(results[r][key][step] is None for r in ranks)
                continue
            total = sum(results[r][key][step] for r in ranks)
            _close(total, ref[key][step], msg=lambda s: f"{key} step {step}: {s}", **tol)
    for r in ranks:
        assert results[r]["buffers"].keys() == ref["buffers"].keys()
        for name, value in ref["buffers"].items():
            _close(results[r]["buffers"][name], value, msg=lambda s: f"rank {r} {name}: {s}", **tol)
    return ref


# --------------------------------------------------------------------------
# tests: multi-process
# --------------------------------------------------------------------------


@MULTIPROCESS
@pytest.mark.parametrize("layout", ["2d", "3d", "3d_channels_last"])
def test_uneven_ranks_match_the_concatenated_batch(pools, layout):
    """Different batch sizes and lengths per rank, a rank without a mask: outputs,
    input/weight/bias gradients and running statistics of the concatenated batch."""
    two_d = layout == "2d"
    specs = [(5, None if two_d else 7, "lengths"), (3, None if two_d else 4, "nomask")]
    plan = [specs, [(2, specs[0][1], "lengths"), (6, specs[1][1], "lengths")]]
    kw = dict(C=6, plan=plan, channels_last=layout == "3d_channels_last")
    results = pools(2).run("train", **kw)
    ref = _check_against_reference(results, ranks=[0, 1], **kw)
    # and the concatenated batch is nn.BatchNorm1d on its valid positions (first step)
    packed = ref["packed"][0]
    bn = nn.BatchNorm1d(6, dtype=F64)
    _init_params(bn, 0)
    expected = bn(packed)
    got = torch.cat([_packed(results[r]["y"][0], _mask_of(r, specs[r], 6, kw["channels_last"]), kw["channels_last"])
                     for r in range(2)])
    _close(got, expected.detach())


def _check_parameter_grads(results, ref: nn.Module, step: int) -> None:
    """The ranks' weight and bias gradients of ``step``, summed, against the reference's; then clears those."""
    _close(sum(res["dw"][step] for res in results), ref.weight.grad)
    _close(sum(res["db"][step] for res in results), ref.bias.grad)
    ref.zero_grad()


def _check_buffers(results, ref: nn.Module) -> None:
    for res in results:
        for name, value in ref.named_buffers():
            _close(res["buffers"][name], value, msg=lambda m: f"{name}: {m}")


@MULTIPROCESS
@pytest.mark.parametrize("layout,mask_dims,dims", [
    ("contiguous", "all", 2), ("contiguous", "time", 2), ("memory_format", "time", 2), ("channels_last", "all", 2),
    ("contiguous", "time", 3), ("memory_format", "all", 3),
])
def test_spatial_input_matches_masked_batch_norm_2d_3d_on_the_concatenated_batch(pools, layout, mask_dims, dims):
    """(N, C, H, W) and (N, C, D, H, W) input, in either memory format or as (N, *spatial, C), with
    masks over all or the trailing spatial dims, each rank with its own batch size and last spatial
    size (its time axis): every rank's output and input gradient, the summed parameter gradients and
    the running statistics are MaskedBatchNorm2d/3d's on the concatenated batch, padded along that
    axis (MaskedBatchNorm2d/3d are checked against torch's in test_layouts.py); the output keeps
    the input's memory format, and an in-place op on it works."""
    C, lead = 5, ((4,) if dims == 2 else (2, 3))
    plan = [[(3, (*lead, 6)), (2, (*lead, 4))], [(1, (*lead, 5)), (0, (*lead, 5))],
            [(2, (*lead, 3)), (4, (*lead, 6))]]
    results = pools(2).run("train_spatial", C=C, plan=plan, layout=layout, mask_dims=mask_dims)
    ref = (masknorm.MaskedBatchNorm2d if dims == 2 else masknorm.MaskedBatchNorm3d)(C, dtype=F64)
    _init_params(ref, 0)
    for step, specs in enumerate(plan):
        T = max(spec[1][-1] for spec in specs)
        parts = []
        for r in range(2):  # padded to T: NaN in x and dy, True in the mask
            x, m, g = _spatial_batch(step, r, specs[r], C, mask_dims)
            extra = T - x.shape[-1]
            parts.append((torch.nn.functional.pad(x, (0, extra), value=float("nan")),
                          torch.nn.functional.pad(m, (0, extra), value=True),
                          torch.nn.functional.pad(g, (0, extra), value=float("nan"))))
        x = torch.cat([p[0] for p in parts]).requires_grad_()
        y = ref(x, torch.cat([p[1] for p in parts]))
        y.backward(torch.cat([p[2] for p in parts]))
        for r in range(2):
            rows = slice(sum(s[0] for s in specs[:r]), sum(s[0] for s in specs[:r + 1]))
            T_r = specs[r][1][-1]
            for key, expected in (("y", y.detach()[rows, ..., :T_r]), ("dx", x.grad[rows, ..., :T_r])):
                got = results[r][key][step]
                assert not got.isnan().any(), (r, key, step)
                _close(got, expected, msg=lambda m: f"rank {r} {key} step {step}: {m}")
            assert results[r]["strides_kept"][step]
        _check_parameter_grads(results, ref, step)
    _check_buffers(results, ref)
    assert all(res["relu_grad_finite"] for res in results)


@MULTIPROCESS
def test_ddp_training_of_a_conv_net_with_batch_norm_2d(pools):
    """A Conv2d -> BatchNorm2d -> ReLU(inplace) model, convert_model(sync_batch_norm=True) and
    DistributedDataParallel on 2 ranks, time-masked (N, C, F, T) batches: three SGD steps give
    the parameters, running statistics and losses of one process training MaskedBatchNorm2d on
    the concatenated batches (loss / 2: DDP averages the ranks' gradients)."""
    sizes, lr = [[3, 2], [1, 4], [2, 0]], 0.05
    results = pools(2).run("ddp_training_2d", sizes=sizes, lr=lr)
    model = masknorm.convert_model(_convnet_2d())
    assert type(model.norm) is masknorm.MaskedBatchNorm2d
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step, per_rank in enumerate(sizes):
        parts = [_conv_2d_batch(step, r, n) for r, n in enumerate(per_rank)]
        x, m, target = (torch.cat([p[i] for p in parts]) for i in range(3))
        loss = (model(x, m) * target).sum()
        opt.zero_grad()
        (loss / 2).backward()
        opt.step()
        _close(results[0]["losses"][step] + results[1]["losses"][step], loss.detach())
    for r in range(2):
        assert results[r]["state"].keys() == model.state_dict().keys()
        for name, value in model.state_dict().items():
            _close(results[r]["state"][name], value, msg=lambda m: f"rank {r} {name}: {m}")


@MULTIPROCESS
def test_jagged_input_matches_batch_norm_of_every_rank_tokens(pools):
    """Jagged (N, j, C) batches of other sizes and lengths per rank: outputs, input gradients,
    summed parameter gradients and running statistics are MaskedBatchNorm1d's over the tokens of
    every rank ((T, C), concatenated); the output keeps the input's structure."""
    C, plan = 4, [[[3, 1, 4], [2, 2]], [[5], [1, 3, 2, 2]]]
    results = pools(2).run("train_jagged", C=C, plan=plan)
    ref = masknorm.MaskedBatchNorm1d(C, dtype=F64)
    _init_params(ref, 0)
    for step, lengths in enumerate(plan):
        parts = [_jagged_batch(step, r, lengths[r], C) for r in range(2)]
        x = torch.cat([p[0].values() for p in parts]).requires_grad_()
        y = ref(x)
        y.backward(torch.cat([p[1] for p in parts]))
        split = [sum(n) for n in lengths]
        for r in range(2):
            assert results[r]["offsets_kept"][step]
            _close(results[r]["y"][step], y.detach().split(split)[r])
            _close(results[r]["dx"][step], x.grad.split(split)[r])
        _check_parameter_grads(results, ref, step)
    _check_buffers(results, ref)


def _mask_of(rank: int, spec: Spec, C: int, channels_last: bool, seed: int = 0) -> torch.Tensor:
    x, m, _ = _batch(seed, rank, spec, C, channels_last)
    return _mask_or_false(x, m, spec)


@MULTIPROCESS
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_three_ranks_low_precision_channels_last_momentum(pools, dtype):
    """3 ranks, float32 / bfloat16 input (float32 statistics, count packed as
    float32), momentum 0.5, no bias; against the same in one process."""
    plan = [[(4, 9, "lengths"), (2, 3, "full"), (3, 5, "lengths")],
            [(1, 2, "full"), (5, 8, "lengths"), (2, 9, "lengths")]]
    kw = dict(C=5, plan=plan, channels_last=True, momentum=0.5, bias=False, dtype=dtype)
    results = pools(3).run("train", **kw)
    assert results[0]["y"][0].dtype == getattr(torch, dtype)
    # bfloat16 outputs may round differently when float32 statistics differ in the last bit
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-2, atol=2e-2)
    _check_against_reference(results, ranks=[0, 1, 2], tol=tol, **kw)


@MULTIPROCESS
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_input_with_counts_in_the_thousands(pools, dtype):
    """bfloat16 / float16 input, per-rank valid counts 300, 517 and 2049, rank
    means 100 apart: the merged mean and unbiased variance (the running
    statistics after one step with momentum=None) are float64's on the same
    values to float32 accuracy, and the outputs are those values normalized.
    The counts travel as float32 (exact): rounded to the input dtype, 517 and
    2049 would be 516 and 2048 (bfloat16) or 2048 (float16), which moves the
    mean and variance by about 1e-4 relative, ten times the tolerance."""
    specs = [(20, 15, "far"), (11, 47, "far"), (3, 683, "far")]
    C = 3
    kw = dict(C=C, plan=[specs], momentum=None, dtype=dtype)
    results = pools(3).run("train", **kw)
    parts = [_batch(0, r, specs[r], C, False, getattr(torch, dtype)) for r in range(3)]
    rows = [_packed(x.double(), _mask_or_false(x, m, s), False) for (x, m, _), s in zip(parts, specs)]
    assert [len(r) for r in rows] == [300, 517, 2049]
    packed = torch.cat(rows)
    mean, var = packed.mean(0), packed.var(0)
    assert float((rows[2].mean(0) - rows[0].mean(0)).min()) > 150  # ranks far apart
    bn = masknorm.MaskedBatchNorm1d(C, dtype=F64)
    _init_params(bn, 0)
    invstd = (packed.var(0, unbiased=False) + bn.eps).rsqrt()
    for r in range(3):
        buffers = results[r]["buffers"]
        _close(buffers["running_mean"], mean, rtol=1e-5, atol=1e-4, msg=lambda m: f"rank {r} mean: {m}")
        _close(buffers["running_var"], var, rtol=1e-5, atol=0.0, msg=lambda m: f"rank {r} variance: {m}")
        assert int(buffers["num_batches_tracked"]) == 1
        x = parts[r][0].double()
        expected = (x - mean.view(1, C, 1)) * (invstd * bn.weight.detach()).view(1, C, 1) + bn.bias.detach().view(
            1, C, 1)
        y = results[r]["y"][0]
        assert y.dtype == getattr(torch, dtype)
        _close(y.double(), expected, rtol=1e-2, atol=2e-2, msg=lambda m: f"rank {r} output: {m}")


@MULTIPROCESS
@pytest.mark.parametrize("into_tensor,generic", [(True, False), (False, True), (True, True)])
def test_other_devices_paths(pools, into_tensor, generic):
    """What other backends and devices run, here on gloo and CPU: all_gather_into_tensor
    (NCCL's path), and the ops' generic ATen-op kernels (devices without fused kernels)."""
    plan = [[(4, 6, "lengths"), (0, 6, "lengths"), (2, 3, "allpad")], [(3, 5, "lengths")] * 3,
            [(2, 4, "allpad"), (0, 6, "lengths"), (2, 3, "allpad")]]
    kw = dict(C=3, plan=plan, channels_last=generic)
    results = pools(3).run("train", into_tensor=into_tensor, generic=generic, **kw)
    _check_against_reference(results, ranks=[0, 1, 2], **kw)


@MULTIPROCESS
def test_running_statistics_after_many_steps_are_those_of_all_the_data(pools):
    """momentum=None (cumulative average), 3 ranks with batch sizes and lengths
    changing every step: running_mean / running_var are the averages over the
    steps of the mean and unbiased variance of every rank's valid values."""
    steps = 16
    g = torch.Generator().manual_seed(5)
    plan = [[(int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g)), "lengths")
             for _ in range(3)] for _ in range(steps)]
    kw = dict(C=4, plan=plan, momentum=None)
    results = pools(3).run("train", **kw)
    ref = _check_against_reference(results, ranks=[0, 1, 2], **kw)
    mean = torch.stack([p.mean(0) for p in ref["packed"]]).mean(0)
    var = torch.stack([p.var(0) for p in ref["packed"]]).mean(0)
    for r in range(3):
        _close(results[r]["buffers"]["running_mean"], mean)
        _close(results[r]["buffers"]["running_var"], var)
        assert int(results[r]["buffers"]["num_batches_tracked"]) == steps


@MULTIPROCESS
@pytest.mark.parametrize("empty", ["allpad", "N=0"])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d_channels_last"])
def test_a_rank_without_valid_positions(pools, empty, layout):
    """One rank all padding or with an empty batch: it contributes nothing,
    gets zeros (or an empty output), and the others get their batch's results."""
    L = None if layout == "2d" else 6
    other = (0, L, "lengths") if empty == "N=0" else (3, L, "allpad")
    plan = [[(4, L, "lengths"), other], [other, (5, L, "lengths")]]
    kw = dict(C=3, plan=plan, channels_last=layout == "3d_channels_last")
    results = pools(2).run("train", **kw)
    _check_against_reference(results, ranks=[0, 1], **kw)
    idle = results[1]["y"][0]
    assert idle.shape[0] == other[0] and bool((idle == 0).all()) and bool((results[1]["dx"][0] == 0).all())
    assert bool((results[1]["dw"][0] == 0).all()) and bool((results[1]["db"][0] == 0).all())


@MULTIPROCESS
@pytest.mark.parametrize("kinds", [("allpad", "allpad", "allpad"), ("allpad", "N=0", "allpad"), ("N=0",) * 3])
def test_every_rank_without_valid_positions(pools, kinds):
    """Zeros out, zero gradients, running statistics untouched (num_batches_tracked
    counts the batch, as MaskedBatchNorm1d does), no NaN anywhere."""
    specs = [(0, 4, "lengths") if k == "N=0" else (2, 4, "allpad") for k in kinds]
    kw = dict(C=4, plan=[specs], momentum=None)
    results = pools(3).run("train", **kw)
    ref = _check_against_reference(results, ranks=[0, 1, 2], **kw)
    fresh = {k: v for k, v in masknorm.MaskedBatchNorm1d(4, dtype=F64).named_buffers()}
    for r in range(3):
        res = results[r]
        for key in ("y", "dx", "dw", "db"):
            assert not res[key][0].isnan().any() and bool((res[key][0] == 0).all()), (r, key)
        assert torch.equal(res["buffers"]["running_mean"], fresh["running_mean"])
        assert torch.equal(res["buffers"]["running_var"], fresh["running_var"])
        assert int(res["buffers"]["num_batches_tracked"]) == int(ref["buffers"]["num_batches_tracked"]) == 1


@MULTIPROCESS
def test_subgroups_are_respected(pools):
    """Ranks 0 and 1 share statistics in their subgroup; rank 2, alone in its
    group (world size 1), computes exactly what MaskedBatchNorm1d computes."""
    plan = [[(3, 5, "lengths"), (4, 6, "lengths"), (2, 7, "lengths")]] * 2
    kw = dict(C=4, plan=plan, seed=2)
    results = pools(3).run("train", group=["pair", "pair", "solo"], **kw)
    _check_against_reference(results, ranks=[0, 1], **kw)
    alone = _reference(ranks=[2], **kw)
    for step in range(2):
        assert torch.equal(results[2]["y"][step], alone["y"][step][0])
        assert torch.equal(results[2]["dx"][step], alone["dx"][step][0])
        assert torch.equal(results[2]["dw"][step], alone["dw"][step])
    for name, value in alone["buffers"].items():
        assert torch.equal(results[2]["buffers"][name], value), name


@MULTIPROCESS
def test_global_count_of_one_raises_on_every_rank(pools):
    """One valid value over all ranks: nn.BatchNorm1d's ValueError on every rank,
    promptly, and the ranks stay in step."""
    plan = [[(2, 3, "one"), (0, 3, "lengths"), (3, 3, "allpad")]]
    pool = pools(3)
    results = pool.run("failing_forward", C=3, plan=plan)
    with pytest.raises(ValueError) as single:
        _reference(3, plan, [0, 1, 2])
    expected = str(single.value).split(": ", 1)[1]
    _check_errors(results, lambda r: ("ValueError", expected), pool)
    for res in results:  # running statistics untouched, as MaskedBatchNorm1d leaves them
        assert torch.equal(res["buffers_after"]["running_mean"], res["buffers_before"]["running_mean"])
        assert torch.equal(res["buffers_after"]["running_var"], res["buffers_before"]["running_var"])


def _check_errors(results, expected: Callable[[int], Tuple[str, str]], pool: "_Pool"):
    hung = {r: res for r, res in enumerate(results) if res["hung"]}
    if hung:
        pool.broken = True  # collectives left unmatched: the next test gets fresh processes
        raised = [r for r, res in enumerate(results) if not res["hung"]]
        pytest.fail("hung: rank(s) " + ", ".join(
            f"{r} in {res['collectives'] or 'a collective'} of MaskedSyncBatchNorm's forward"
            for r, res in hung.items()) + f", given up after {HANG_TIMEOUT_S}s, while rank(s) {raised} raised "
            f"without taking part: {[results[r]['error'] for r in raised]}")
    for r, res in enumerate(results):
        kind, text = expected(r)
        assert res["error"] is not None, f"rank {r} did not raise"
        assert res["error"]["type"] == kind and text in res["error"]["message"], (r, res["error"])
        y, dx = res["after"]  # the next collective still pairs up: a good step works
        assert y.shape[0] == 3 and not y.isnan().any() and not dx.isnan().any()


@MULTIPROCESS
def test_num_features_mismatch_raises_on_every_rank(pools):
    pool = pools(2)
    results = pool.run("failing_forward", C=4, plan=[[(3, 5, "lengths")] * 2], mismatch="num_features")
    _check_errors(results, lambda r: ("ValueError", "num_features differs across the ranks of process_group: [4, 5]"),
                  pool)


@MULTIPROCESS
@pytest.mark.parametrize("mismatch", ["mask", "channels", "spatial_mask"])
def test_a_bad_input_on_one_rank_raises_on_every_rank(pools, mismatch):
    """Rank 1's input is wrong: it raises its own error, the others a RuntimeError naming it, no hang
    (spatial_mask: 4-D input, whose mask is checked before the op, while flattening it)."""
    pool = pools(3)
    results = pool.run("failing_forward", C=4, plan=[[(3, 5, "lengths")] * 3], mismatch=mismatch)
    own = {"mask": ("RuntimeError", "padding_mask"), "channels": ("ValueError", "expected input with 4 channels"),
           "spatial_mask": ("RuntimeError", "expected padding_mask of shape (N, *spatial) = (3, 1, 5)")}[mismatch]
    _check_errors(results, lambda r: own if r == 1 else ("RuntimeError", "failed on rank(s) [1]"), pool)


@MULTIPROCESS
def test_collectives_per_step(pools):
    """Training: one all_gather in forward (plus the one-time num_features check
    on a module's first call), one all_reduce in backward (none when only weight
    and bias need gradients); eval: none."""
    results = pools(2).run("count_collectives", C=5)
    gather, reduce = ["allgather_.default"], ["allreduce_.default"]
    for res in results:
        counts = res["counts"]
        assert counts["forward 0"] == gather * 2, counts  # num_features check, statistics
        for step in (1, 2):
            assert counts[f"forward {step}"] == gather, counts
        for step in (0, 1, 2):
            assert counts[f"backward {step}"] == reduce, counts
        assert counts["forward, input without grad"] == gather and counts["backward, input without grad"] == [], counts
        assert counts["eval forward"] == counts["eval backward"] == [], counts


@MULTIPROCESS
def test_ddp_training_matches_single_process_training(pools):
    """convert_model(sync_batch_norm=True) + DistributedDataParallel on 2 ranks:
    three SGD steps give the parameters, running statistics and losses of one
    process training MaskedBatchNorm1d on the concatenated batches (loss / 2:
    DDP averages the ranks' gradients)."""
    c_in, C, lr = 3, 6, 0.05
    plan = [[(3, 7, "lengths"), (5, 4, "lengths")], [(2, 9, "lengths"), (0, 9, "lengths")],
            [(4, 5, "allpad"), (3, 6, "lengths")]]
    results = pools(2).run("ddp_training", c_in=c_in, C=C, plan=plan, lr=lr)
    model = masknorm.convert_model(_convnet(c_in, C))
    assert type(model.norm) is masknorm.MaskedBatchNorm1d
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step, specs in enumerate(plan):
        parts = [_batch(step, r, specs[r], c_in, False, fill=0.0) for r in range(2)]
        x, m, target = _concat(parts, specs, False)
        x, target = x.nan_to_num(0.0), target.nan_to_num(0.0)
        loss = (model(x, m) * target[:, :2]).sum()
        opt.zero_grad()
        (loss / 2).backward()
        opt.step()
        _close(results[0]["losses"][step] + results[1]["losses"][step], loss.detach())
    for r in range(2):
        state = results[r]["state"]
        assert state.keys() == model.state_dict().keys()
        for name, value in model.state_dict().items():
            _close(state[name], value, msg=lambda s: f"rank {r} {name}: {s}")
    assert int(results[0]["state"]["norm.num_batches_tracked"]) == len(plan)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_command(args: List[str], timeout: float) -> str:
    import subprocess

    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@MULTIPROCESS
def test_the_torchrun_example_runs():
    """examples/distributed_batch_norm.py under torchrun (torch.distributed.run), 2 processes: it
    trains and checks the synced output against MaskedBatchNorm1d on the concatenated batch."""
    out = _run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port", str(_free_port()), "examples/distributed_batch_norm.py"], timeout=240)
    assert "2 rank(s); norms: MaskedSyncBatchNorm, MaskedSyncBatchNorm" in out, out
    assert "synced output vs MaskedBatchNorm1d on the concatenated batch" in out, out


@MULTIPROCESS
def test_the_overhead_benchmark_runs():
    out = _run_command([sys.executable, "-m", "benchmarks.sync_overhead", "--quick"], timeout=240)
    assert "| allgather_, allreduce_ |" in out, out


# --------------------------------------------------------------------------
# tests: one process
# --------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_masked_batch_norm(channels_last, momentum):
    """No initialized process group: exactly MaskedBatchNorm1d (training and eval), no communication."""
    assert not dist.is_initialized()
    sync = masknorm.MaskedSyncBatchNorm(4, momentum=momentum, channels_last=channels_last, dtype=F64)
    plain = masknorm.MaskedBatchNorm1d(4, momentum=momentum, channels_last=channels_last, dtype=F64)
    _init_params(sync, 1), _init_params(plain, 1)
    for step, training in enumerate([True, True, False]):
        sync.train(training), plain.train(training)
        outs = []
        for bn in (sync, plain):
            x, m, g = _batch(step, 0, (3, 5, "lengths" if step else "nomask"), 4, channels_last)
            x.requires_grad_()
            y = bn(x, m)
            y.backward(g)
            outs.append((y, x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    for (name, a), (_, b) in zip(sync.named_buffers(), plain.named_buffers()):
        assert torch.equal(a, b), name


def test_module_signature_and_repr():
    bn = masknorm.MaskedSyncBatchNorm(
        8, 1e-3, None, True, False, None, None, torch.float64, bias=False, channels_last=True
    )
    assert isinstance(bn, masknorm.MaskedBatchNorm1d)
    assert bn.bias is None and bn.weight.dtype == F64 and bn.running_mean is None and bn.process_group is None
    torch_bn = nn.SyncBatchNorm(8, 1e-3, None, True, False, bias=False)
    assert repr(bn) == f"MaskedSyncBatchNorm({torch_bn.extra_repr()}, channels_last=True)"
    assert bn.state_dict().keys() == nn.SyncBatchNorm(8, bias=False, track_running_stats=False).state_dict().keys()


def test_convert_sync_batchnorm_keeps_state():
    """nn.BatchNorm1d, nn.SyncBatchNorm, MaskedBatchNorm1d (channels_last kept),
    MaskedSyncBatchNorm and nn.BatchNorm2d become MaskedSyncBatchNorm on the given
    group with the same Parameter and buffer objects and mode; other norms and
    subclasses with their own forward stay."""

    class Custom(nn.BatchNorm1d):
        def forward(self, input):  # noqa: D401
            return input

    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.SyncBatchNorm(4, eps=1e-3, bias=False),
        masknorm.MaskedBatchNorm1d(4, channels_last=True), masknorm.MaskedSyncBatchNorm(4, affine=False),
        nn.BatchNorm2d(4), Custom(4), nn.LayerNorm(4),
    )
    model[2].eval()
    before = {i: (dict(m.named_parameters()), dict(m.named_buffers()), m.training) for i, m in enumerate(model)}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    group = object()  # any value: conversion only stores it
    converted = masknorm.MaskedSyncBatchNorm.convert_sync_batchnorm(model, group)
    assert converted is model
    for i in (1, 2, 3, 4, 5):
        m = model[i]
        assert type(m) is masknorm.MaskedSyncBatchNorm and m.process_group is group, i
        params, buffers, training = before[i]
        assert all(dict(m.named_parameters())[k] is v for k, v in params.items()) and len(params) == len(
            dict(m.named_parameters()))
        assert all(dict(m.named_buffers())[k] is v for k, v in buffers.items())
        assert m.training == training
    assert model[1].momentum is None and model[2].eps == 1e-3 and model[2].bias is None and model[2].weight is not None
    assert model[3].channels_last and not model[1].channels_last and not model[4].affine
    assert type(model[6]) is Custom and type(model[7]) is nn.LayerNorm and not model[5].channels_last
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    single = masknorm.MaskedSyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2))
    assert type(single) is masknorm.MaskedSyncBatchNorm and single.process_group is None


class _Positive(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs() + 0.1


def test_convert_sync_batchnorm_leaves_parametrized_norms_alone():
    """A batch norm parametrized with torch.nn.utils.parametrize (here its
    weight) is left as it is, parametrization working, as convert_model
    leaves it: torch's SyncBatchNorm.convert_sync_batchnorm cannot convert it
    either (it raises TypeError, the weight being no Parameter). The
    plain norms around it and inside a parametrized parent are converted."""
    from torch.nn.utils import parametrize

    def model():
        torch.manual_seed(0)
        parametrized = nn.BatchNorm1d(4)
        parametrize.register_parametrization(parametrized, "weight", _Positive())
        parent = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        parametrize.register_parametrization(parent[0], "weight", _Positive())
        return nn.Sequential(nn.BatchNorm1d(4), parametrized, parent)

    with pytest.raises(TypeError, match="weight"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model())
    m = model()
    parametrized, original = m[1], m[1].parametrizations.weight.original
    converted = masknorm.MaskedSyncBatchNorm.convert_sync_batchnorm(m)
    assert converted is m
    assert type(m[0]) is masknorm.MaskedSyncBatchNorm and type(m[2][1]) is masknorm.MaskedSyncBatchNorm
    assert m[1] is parametrized and parametrize.is_parametrized(m[1], "weight")
    assert m[1].parametrizations.weight.original is original
    assert parametrize.is_parametrized(m[2][0], "weight") and isinstance(m[2][0], nn.Linear)
    torch.testing.assert_close(m[1].weight, original.abs() + 0.1)
    x = torch.randn(6, 4)
    y = m(x)  # no process group: the converted modules compute MaskedBatchNorm1d's
    y.sum().backward()
    assert original.grad is not None and torch.isfinite(y).all()


@pytest.fixture
def one_rank_world(monkeypatch):
    """A gloo process group of one rank in this process (an in-memory store),
    and a record of every collective torch.distributed is asked for."""
    calls: List[str] = []
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "barrier", "reduce_scatter",
                 "all_to_all", "gather", "scatter", "reduce"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield calls
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("group", ["world", "new_group"])
def test_a_one_rank_group_does_not_communicate(one_rank_world, group):
    """With a group of one rank the module is MaskedBatchNorm1d, bit for bit,
    and issues no collective: none through torch.distributed's functions,
    none dispatched as a c10d op."""
    process_group = dist.new_group([0]) if group == "new_group" else None
    one_rank_world.clear()
    sync = masknorm.MaskedSyncBatchNorm(4, process_group=process_group, dtype=F64)
    plain = masknorm.MaskedBatchNorm1d(4, dtype=F64)
    _init_params(sync, 1), _init_params(plain, 1)
    outs = []
    for bn in (sync, plain):
        with _Collectives() as seen:
            for step in range(2):
                x, m, g = _batch(step, 0, (3, 5, "lengths"), 4, False)
                x.requires_grad_()
                y = bn(x, m)
                y.backward(g)
                outs.append((y, x.grad))
        if bn is sync:
            assert seen.ops == [] and one_rank_world == [], (seen.ops, one_rank_world)
    for (a, ga), (b, gb) in zip(outs[:2], outs[2:]):
        assert torch.equal(a, b) and torch.equal(ga, gb)
    for (name, a), (_, b) in zip(sync.named_buffers(), plain.named_buffers()):
        assert torch.equal(a, b), name


def test_convert_model_sync_batch_norm():
    model = nn.Sequential(nn.BatchNorm1d(4), masknorm.MaskedBatchNorm1d(4), nn.LayerNorm(4), nn.SyncBatchNorm(4),
                          nn.BatchNorm2d(4), masknorm.MaskedBatchNorm3d(4))
    masknorm.convert_model(model, sync_batch_norm=True, layer_norm=False)
    assert [type(m) for m in model] == [masknorm.MaskedSyncBatchNorm, masknorm.MaskedSyncBatchNorm, nn.LayerNorm,
                                        masknorm.MaskedSyncBatchNorm, masknorm.MaskedSyncBatchNorm,
                                        masknorm.MaskedSyncBatchNorm]
    plain = masknorm.convert_model(nn.Sequential(nn.BatchNorm1d(4), nn.SyncBatchNorm(4)))
    assert [type(m) for m in plain] == [masknorm.MaskedBatchNorm1d, nn.SyncBatchNorm]
    with pytest.raises(ValueError, match="batch_norm=True"):
        masknorm.convert_model(nn.BatchNorm1d(4), batch_norm=False, sync_batch_norm=True)
    with pytest.raises(ValueError, match="sync_batch_norm"):
        masknorm.convert_model(nn.BatchNorm1d(4), process_group=object())


def test_public_names_have_docstrings_and_hints():
    import inspect
    import typing

    assert "MaskedSyncBatchNorm" in masknorm.__all__
    cls = masknorm.MaskedSyncBatchNorm
    for fn in (cls, cls.forward, cls.convert_sync_batchnorm, cls.__init__, masknorm.convert_model):
        assert (fn.__doc__ or "").strip() or fn is cls.__init__
    for fn in (cls.__init__, cls.forward, cls.convert_sync_batchnorm, masknorm.convert_model):
        hints = typing.get_type_hints(fn)
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        assert all(p in hints for p in params) and "return" in hints, fn
