"""The padding study: the padding problem on a real training run.

    python examples/padding_study.py            # default setting, about 3 minutes on 2 CPU cores
    python examples/padding_study.py --quick    # seconds: checks that it runs, not a result
    python examples/padding_study.py --help

Trains the same small post-norm transformer encoder on a synthetic
variable-length sequence-classification task with four norms (stock
nn.BatchNorm1d on the padded batch, MaskedBatchNorm1d, MaskedLayerNorm, stock
nn.LayerNorm) under two padding regimes (length-bucketed batches with little
padding, shuffled batches with heavy padding), and writes a Markdown report and
PNG plots: training loss, held-out accuracy with the running statistics
(model.eval()) and with batch statistics, and how far each BatchNorm layer's
running statistics are from the true statistics of its valid tokens.

``--quick`` trains a few steps on a tiny model: its numbers only show that
every run trains and every figure is drawn; the accuracies and drifts of the
default setting are the result (docs/study/report.md).

Data are generated from the seed; nothing is downloaded. Needs an installed
masknorm, matplotlib and tqdm (``pip install "masknorm[study]"``; tqdm only for
the progress bar). Output goes to masknorm_results/study in the current folder
unless ``--out`` says otherwise; ``--out docs/study`` regenerates the committed
report. The study lives beside the package, not in it: tests/test_study.py
imports it from here.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import multiprocessing
import os
import platform
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

import masknorm
from masknorm import _extras

NORMS = ("BatchNorm1d", "MaskedBatchNorm1d", "MaskedLayerNorm", "LayerNorm")
BATCH_NORMS = ("BatchNorm1d", "MaskedBatchNorm1d")
REGIMES = ("sorted", "shuffled")
COLORS = {
    "BatchNorm1d": "tab:red",
    "MaskedBatchNorm1d": "tab:blue",
    "MaskedLayerNorm": "tab:green",
    "LayerNorm": "tab:gray",
}
REGIME_TEXT = {
    "sorted": "sorted: length-bucketed batches (little padding)",
    "shuffled": "shuffled: random batches (heavy padding)",
}
FIGURES = ("padding_study.png", "loss_curves.png", "accuracy.png", "stats_drift.png")


@dataclass(frozen=True)
class Config:
    steps: int = 600  # optimizer steps per run (8 runs)
    batch_size: int = 32
    n_train: int = 8192
    n_eval: int = 2048
    n_ref: int = 512  # held-out sequences for the drift / accuracy curves
    min_len: int = 4
    max_len: int = 96
    features: int = 8
    d_model: int = 32
    heads: int = 4
    d_ff: int = 64
    layers: int = 2
    lr: float = 2e-3
    log_every: int = 25
    seed: int = 0


QUICK = dict(steps=24, n_train=512, n_eval=256, n_ref=128, max_len=32, log_every=8)


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


@dataclass
class Dataset:
    x: Tensor  # (S, max_len, F), zeros at padding
    lengths: Tensor  # (S,)
    y: Tensor  # (S,) class in 0..3

    def batch(self, idx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(x, padding_mask, y) for sequences ``idx``, padded to their longest."""
        lengths = self.lengths[idx]
        L = int(lengths.max())
        return self.x[idx, :L], masknorm.padding_mask_from_lengths(lengths, L), self.y[idx]


@functools.lru_cache(maxsize=1)
def make_task(cfg: Config) -> Tuple[Dataset, Dataset]:
    """Train and held-out sets. Token features have sizeable, feature-specific
    means and scales (padding is zeros, so it is far from the data); lengths
    are log-uniform in [min_len, max_len] (many short, a few long sequences).
    The label says whether the valid tokens' mean of feature 0 and of feature 1
    is above that feature's mean (4 classes), so it depends only on valid tokens
    and a model must place two thresholds precisely."""
    g = torch.Generator().manual_seed(cfg.seed)
    mean = (torch.rand(cfg.features, generator=g) * 2 - 1) * 4
    mean[:2] = torch.tensor([3.0, -2.0])
    std = torch.exp((torch.rand(cfg.features, generator=g) * 2 - 1) * math.log(2))

    def sample(n: int) -> Dataset:
        u = torch.rand(n, generator=g)
        lengths = torch.exp(math.log(cfg.min_len) + u * math.log((cfg.max_len + 1) / cfg.min_len)).long()
        lengths = lengths.clamp(cfg.min_len, cfg.max_len)
        offset = 0.5 * torch.randn(n, 1, cfg.features, generator=g)  # per-sequence shift
        z = offset + torch.randn(n, cfg.max_len, cfg.features, generator=g)
        pad = masknorm.padding_mask_from_lengths(lengths, cfg.max_len)
        z = z.masked_fill(pad.unsqueeze(-1), 0.0)
        above = (z[:, :, :2].sum(1) / lengths.unsqueeze(1)) > 0  # valid-token mean vs feature mean
        y = 2 * above[:, 0].long() + above[:, 1].long()
        x = (mean + std * z).masked_fill(pad.unsqueeze(-1), 0.0)
        return Dataset(x, lengths, y)

    return sample(cfg.n_train), sample(cfg.n_eval)


def epoch(data: Dataset, regime: str, batch_size: int, g: torch.Generator) -> List[Tensor]:
    """One pass over ``data`` as index batches. ``shuffled``: random batches.
    ``sorted``: the usual length bucketing (sort chunks of 50 batches by
    length, split, shuffle the batches), so a batch holds similar lengths."""
    perm = torch.randperm(data.lengths.numel(), generator=g)
    if regime == "shuffled":
        return list(perm.split(batch_size))
    if regime == "sorted":
        chunks = []
        for mega in perm.split(50 * batch_size):
            chunks.extend(mega[torch.argsort(data.lengths[mega], stable=True)].split(batch_size))
        return [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")


def batches(data: Dataset, regime: str, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless full index batches, epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from (idx for idx in epoch(data, regime, batch_size, g) if idx.numel() == batch_size)


def one_pass(data: Dataset, regime: str, batch_size: int, seed: int) -> List[Tensor]:
    """All of ``data`` once, batched as ``regime``."""
    return epoch(data, regime, batch_size, torch.Generator().manual_seed(seed))


def length_sorted(data: Dataset, batch_size: int) -> List[Tensor]:
    """All sequences, sorted by length, in batches: almost no padding."""
    return list(torch.argsort(data.lengths, stable=True).split(batch_size))


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


class IgnoresMask(nn.Module):
    """Stock torch norm called as ``norm(x, padding_mask)``: the mask is
    ignored, so padding enters BatchNorm's statistics. ``channels_first``
    transposes (N, L, C) to (N, C, L) for nn.BatchNorm1d, as users do today."""

    def __init__(self, norm: nn.Module, channels_first: bool) -> None:
        super().__init__()
        self.norm = norm
        self.channels_first = channels_first

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        if self.channels_first:
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


def make_norm(name: str, d: int) -> nn.Module:
    """A norm module called as ``norm(x, padding_mask)`` on (N, L, C) input."""
    if name == "BatchNorm1d":
        return IgnoresMask(nn.BatchNorm1d(d), channels_first=True)
    if name == "LayerNorm":
        return IgnoresMask(nn.LayerNorm(d), channels_first=False)
    if name == "MaskedBatchNorm1d":
        return masknorm.MaskedBatchNorm1d(d, channels_last=True)
    if name == "MaskedLayerNorm":
        return masknorm.MaskedLayerNorm(d)
    raise ValueError(f"norm must be one of {NORMS}, got {name!r}")


def batch_norm_of(norm: nn.Module) -> Optional[nn.BatchNorm1d]:
    """The nn.BatchNorm1d (or MaskedBatchNorm1d) inside a norm, if any."""
    inner = norm.norm if isinstance(norm, IgnoresMask) else norm
    return inner if isinstance(inner, nn.BatchNorm1d) else None


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with pluggable norms."""

    def __init__(self, d: int, heads: int, d_ff: int, norm_factory: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.norm1 = norm_factory(d)
        self.norm2 = norm_factory(d)

    def forward(self, h: Tensor, padding_mask: Tensor) -> Tensor:
        a = self.attn(h, h, h, key_padding_mask=padding_mask, need_weights=False)[0]
        h = self.norm1(h + a, padding_mask)
        return self.norm2(h + self.ff(h), padding_mask)


class Classifier(nn.Module):
    """Linear embedding + sinusoidal positions, encoder layers, masked mean pooling, linear head."""

    def __init__(self, cfg: Config, norm: str, n_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(cfg.features, cfg.d_model)
        pos = torch.arange(cfg.max_len).unsqueeze(1) * torch.exp(
            torch.arange(0, cfg.d_model, 2) * (-math.log(10000.0) / cfg.d_model)
        )
        pe = torch.zeros(cfg.max_len, cfg.d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pe", pe, persistent=False)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.heads, cfg.d_ff, lambda d: make_norm(norm, d)) for _ in range(cfg.layers)
        )
        self.head = nn.Linear(cfg.d_model, n_classes)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        h = self.embed(x) + self.pe[: x.shape[1]]
        for layer in self.layers:
            h = layer(h, padding_mask)
        valid = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * valid).sum(1) / valid.sum(1))


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, index_batches: List[Tensor]) -> float:
    correct = total = 0
    for idx in index_batches:
        x, mask, y = data.batch(idx)
        correct += int((model(x, mask).argmax(-1) == y).sum())
        total += y.numel()
    return correct / total


@torch.no_grad()
def eval_with_drift(model: nn.Module, data: Dataset, index_batches: List[Tensor]) -> Tuple[float, float, float]:
    """Accuracy in eval mode (running statistics) on ``index_batches``, and
    how far each BatchNorm layer's running statistics are from the true
    statistics of the valid tokens that reach it in that pass: the mean over
    layers and channels of |running_mean - mean| / std and of
    |running_var - var| / var (NaN for a model without BatchNorm)."""
    model.eval()
    norms = [(m, batch_norm_of(m)) for layer in model.layers for m in (layer.norm1, layer.norm2)]
    norms = [(m, bn) for m, bn in norms if bn is not None]
    sums: Dict[nn.Module, list] = {}  # module -> [count, sum, sum of squares] of its valid input rows

    def hook(module: nn.Module, args: Tuple[Tensor, Tensor]) -> None:
        x, mask = args
        v = x[~mask].double()
        s = sums.setdefault(module, [0, 0.0, 0.0])
        s[0], s[1], s[2] = s[0] + v.shape[0], s[1] + v.sum(0), s[2] + (v * v).sum(0)

    handles = [m.register_forward_pre_hook(hook) for m, _ in norms]
    try:
        acc = accuracy(model, data, index_batches)
    finally:
        for h in handles:
            h.remove()
    model.train()
    if not norms:
        return acc, math.nan, math.nan
    mean_err, var_err = [], []
    for m, bn in norms:
        n, s1, s2 = sums[m]
        mean = s1 / n
        var = (s2 / n - mean * mean) * n / (n - 1)
        mean_err.append(((bn.running_mean.double() - mean).abs() / var.sqrt()).mean())
        var_err.append(((bn.running_var.double() - var).abs() / var).mean())
    return acc, float(torch.stack(mean_err).mean()), float(torch.stack(var_err).mean())


def padding_fraction(data: Dataset, index_batches: List[Tensor]) -> float:
    padded = total = 0
    for idx in index_batches:
        lengths = data.lengths[idx]
        padded += int((lengths.max() - lengths).sum())
        total += int(lengths.max()) * lengths.numel()
    return padded / total


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def train_run(cfg: Config, norm: str, regime: str, on_step: Callable[[str], None] = lambda text: None) -> dict:
    """Train one model; ``on_step`` gets a status line after each step."""
    train, held_out = make_task(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights for every norm and regime
    model = Classifier(cfg, norm)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, cfg.steps) / cfg.steps)),
    )
    ref_idx = torch.arange(cfg.n_ref)
    ref = Dataset(held_out.x[ref_idx], held_out.lengths[ref_idx], held_out.y[ref_idx])
    ref_batches = length_sorted(ref, 128)
    stream = batches(train, regime, cfg.batch_size, cfg.seed + 1)
    losses: List[float] = []
    curve: Dict[str, List[float]] = {"step": [], "acc": [], "mean_drift": [], "var_drift": []}
    seen: List[Tensor] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        idx = next(stream)
        seen.append(idx)
        x, mask, y = train.batch(idx)
        loss = nn.functional.cross_entropy(model(x, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            acc, md, vd = eval_with_drift(model, ref, ref_batches)
            for k, v in zip(("step", "acc", "mean_drift", "var_drift"), (step, acc, md, vd)):
                curve[k].append(v)
        on_step(f"{norm}/{regime} loss {losses[-1]:.3f}")
    seconds = time.perf_counter() - start

    acc_eval, mean_drift, var_drift = eval_with_drift(model, held_out, length_sorted(held_out, 256))
    # In eval mode every norm here is per token, so the padding at inference
    # changes nothing: the same held-out set in heavily padded random batches.
    model.eval()
    acc_eval_padded = accuracy(model, held_out, one_pass(held_out, "shuffled", cfg.batch_size, cfg.seed + 2))
    # batch statistics, the held-out set batched as in training (a copy: the
    # pass must not move the trained model's running statistics)
    batch_stats_model = copy.deepcopy(model).train()
    acc_batch = accuracy(batch_stats_model, held_out, one_pass(held_out, regime, cfg.batch_size, cfg.seed + 2))
    tail = max(1, cfg.steps // 10)
    return {
        "norm": norm,
        "regime": regime,
        "losses": losses,
        "curve": curve,
        "final_loss": sum(losses[-tail:]) / tail,
        "acc_eval": acc_eval,
        "acc_batch_stats": acc_batch,
        "acc_eval_padded": acc_eval_padded,
        "mean_drift": mean_drift,
        "var_drift": var_drift,
        "padding": padding_fraction(train, seen),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------
# report and plots
# --------------------------------------------------------------------------


def _smooth(values: List[float], width: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - width] if i >= width else 0.0)
        out.append(acc / min(i + 1, width))
    return out


def _plot_loss(ax, runs: List[dict], regime: str, cfg: Config) -> None:
    width = max(1, cfg.steps // 30)
    for r in runs:
        if r["regime"] == regime:
            ax.plot(range(1, len(r["losses"]) + 1), _smooth(r["losses"], width), color=COLORS[r["norm"]],
                    linestyle="--" if r["norm"] == "LayerNorm" else "-", label=r["norm"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {width} steps)" if width > 1 else "training loss")
    ax.set_title(f"loss, {REGIME_TEXT[regime]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_accuracy(ax, runs: List[dict]) -> None:
    by = {(r["norm"], r["regime"]): r for r in runs}
    width = 0.38
    for j, regime in enumerate(REGIMES):
        xs = [i + (j - 0.5) * width for i in range(len(NORMS))]
        accs = [100 * by[n, regime]["acc_eval"] for n in NORMS]
        ax.bar(xs, accs, width, color=[COLORS[n] for n in NORMS], alpha=1.0 if j else 0.45, edgecolor="black",
               hatch="" if j else "//")
        ax.bar([0], [0], 0, color="white" if j else "lightgray", edgecolor="black", hatch="" if j else "//",
               label=f"{regime}: running statistics (model.eval())")  # legend entry only
        ax.scatter(xs, [100 * by[n, regime]["acc_batch_stats"] for n in NORMS], marker="_", s=250, color="black",
                   zorder=3, label="batch statistics (model.train())" if j else None)
        for x, a in zip(xs, accs):
            ax.text(x, a + 0.3, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
    lo = min(100 * min(r["acc_eval"], r["acc_batch_stats"]) for r in runs)
    ax.set_ylim(max(0.0, lo - 8), 100)
    ax.set_xticks(range(len(NORMS)))
    ax.set_xticklabels(NORMS, fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("held-out accuracy (hatched: sorted, solid: shuffled)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)


def _plot_drift(ax, runs: List[dict]) -> None:
    for r in runs:
        if r["norm"] in BATCH_NORMS:
            style = "-" if r["regime"] == "shuffled" else ":"
            ax.plot(r["curve"]["step"], r["curve"]["mean_drift"], style, color=COLORS[r["norm"]],
                    label=f"{r['norm']}, {r['regime']}", marker="o", markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("|running mean - true mean| / true std")
    ax.set_title("running statistics vs true statistics of the valid tokens\n(mean over BN layers and channels)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def write_plots(runs: List[dict], cfg: Config, out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "loss_curves.png": (1, 2, lambda axes: [_plot_loss(ax, runs, reg, cfg) for ax, reg in zip(axes, REGIMES)]),
        "accuracy.png": (1, 1, lambda axes: _plot_accuracy(axes[0], runs)),
        "stats_drift.png": (1, 1, lambda axes: _plot_drift(axes[0], runs)),
    }
    paths = []
    for name, (rows, cols, draw) in panels.items():
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
        draw(list(axes.flat))
        fig.tight_layout()
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.6))
    for ax, regime in zip(axes[0], REGIMES):
        _plot_loss(ax, runs, regime, cfg)
    _plot_accuracy(axes[1, 0], runs)
    _plot_drift(axes[1, 1], runs)
    fig.suptitle("Padding study: stock BatchNorm1d vs masknorm vs LayerNorm (" + _setting(cfg) + ")", fontsize=10)
    fig.tight_layout()
    paths.insert(0, os.path.join(out, "padding_study.png"))
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    return paths


def _setting(cfg: Config) -> str:
    return (
        f"{cfg.steps} steps of {cfg.batch_size} sequences, lengths {cfg.min_len}-{cfg.max_len}, "
        f"{cfg.layers} layers, d_model {cfg.d_model}, seed {cfg.seed}"
    )


def _num(v: float, fmt: str) -> str:
    return "n/a" if math.isnan(v) else format(v, fmt)


def report_table(runs: List[dict]) -> List[str]:
    lines = [
        "| norm | regime | padding (%) | train loss | acc, running stats (%) | acc, batch stats (%) "
        "| mean drift (std) | var drift (rel.) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['norm']} | {r['regime']} | {100 * r['padding']:.1f} | {r['final_loss']:.4f} "
            f"| {100 * r['acc_eval']:.2f} | {100 * r['acc_batch_stats']:.2f} "
            f"| {_num(r['mean_drift'], '.4f')} | {_num(r['var_drift'], '.4f')} |"
        )
    return lines


def write_report(
    runs: List[dict], cfg: Config, out: str, command: str, seconds: float, cpu_seconds: float, jobs: int
) -> str:
    lines = [
        "# Padding study",
        "",
        f"Command: `{command}`  ",
        f"Setting: {_setting(cfg)}; {cfg.n_train} training and {cfg.n_eval} held-out sequences.  ",
        f"Trained in {seconds:.0f} s ({cpu_seconds:.0f} CPU seconds), {jobs} run(s) at a time on one thread each"
        f" (torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs).",
        "",
        "![padding study](padding_study.png)",
        "",
        *report_table(runs),
        "",
        "- **padding**: padded share of the positions in the training batches (each batch padded to its longest).",
        "- **train loss**: mean training loss over the last 10% of steps.",
        "- **acc, running stats**: held-out accuracy in `model.eval()`, i.e. what inference gets.",
        "- **acc, batch stats**: held-out accuracy in `model.train()` with the held-out set batched as in training"
        " (what the training loss saw); for LayerNorm the two differ only by rounding.",
        "- Padding at inference changes nothing in eval mode (every norm here then acts per token): the same held-out"
        " sequences in shuffled, heavily padded batches give an accuracy at most"
        f" {max(abs(r['acc_eval_padded'] - r['acc_eval']) for r in runs) * 100:.2f} points from *acc, running stats*.",
        "- **mean drift / var drift**: for each BatchNorm layer, `|running_mean - mean| / std` and"
        " `|running_var - var| / var`, where mean and var are the true statistics of the valid tokens that reach"
        " the layer at inference (held-out set, `model.eval()`); averaged over channels and layers. n/a: no"
        " running statistics.",
        "",
        "Also written: " + ", ".join(f"`{f}`" for f in FIGURES[1:]) + ", `results.json`.",
        "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


_progress_queue = None


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    torch.set_num_threads(1)


def _train_in_worker(cfg: Config, norm: str, regime: str) -> dict:
    return train_run(cfg, norm, regime, _progress_queue.put)


def train_all(cfg: Config, jobs: int, on_step: Callable[[str], None]) -> List[dict]:
    """All norm x regime runs, ``jobs`` at a time, each on one thread (the
    models are small: one thread per run is fastest and reproducible)."""
    plan = [(norm, regime) for regime in REGIMES for norm in NORMS]
    if jobs <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [train_run(cfg, norm, regime, on_step) for norm, regime in plan]
        finally:
            torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(progress_queue,)) as pool:
        # the longer (shuffled, heavily padded) runs first
        longest_first = sorted(plan, key=lambda key: key[1] != "shuffled")
        futures = {key: pool.submit(_train_in_worker, cfg, *key) for key in longest_first}
        while not all(f.done() for f in futures.values()):
            try:
                on_step(progress_queue.get(timeout=0.1))
            except queue.Empty:
                pass
        runs = [futures[key].result() for key in plan]  # raises what a run raised
    while True:
        try:
            on_step(progress_queue.get(timeout=0.1))
        except queue.Empty:
            break
    return runs


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (NaN where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


DEFAULT_OUT = os.path.join("masknorm_results", "study")


class _NoProgress:
    """tqdm's interface, doing nothing (--no-progress needs no tqdm)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass


def run_study(cfg: Config, out: str, command: str, jobs: int = 1, progress_bar: bool = True) -> dict:
    if progress_bar:
        from tqdm import tqdm
    else:
        tqdm = _NoProgress

    os.makedirs(out, exist_ok=True)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with tqdm(total=len(NORMS) * len(REGIMES) * cfg.steps, unit="step", disable=not progress_bar,
              desc="padding study") as progress:

        def on_step(text: str) -> None:
            progress.update(1)
            progress.set_postfix_str(text, refresh=False)

        runs = train_all(cfg, jobs, on_step)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    figures = write_plots(runs, cfg, out)
    report = write_report(runs, cfg, out, command, seconds, cpu_seconds, jobs)
    results = {"config": asdict(cfg), "seconds": seconds, "cpu_seconds": cpu_seconds, "jobs": jobs, "runs": runs}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return {"report": report, "figures": figures, "seconds": seconds, "runs": runs}


def main(argv: Optional[List[str]] = None, prog: str = "python examples/padding_study.py") -> dict:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny setting (seconds), for tests")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {Config.steps})")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT} in the current folder; "
                        "--out docs/study rewrites the committed report)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained at once, in worker processes (default: 2, or 1 on one core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        _extras.require("study", ["matplotlib"] + ([] if args.no_progress else ["tqdm"]), "the padding study")
    except ModuleNotFoundError as error:
        parser.exit(2, f"{prog}: {error}\n")
    cfg = replace(Config(seed=args.seed), **(QUICK if args.quick else {}))
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        cfg = replace(cfg, steps=args.steps)
    command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    result = run_study(cfg, args.out, command, jobs=args.jobs, progress_bar=not args.no_progress)
    print(f"padding study: trained in {result['seconds']:.0f} s; wrote {result['report']} and figures in {args.out}")
    print("\n".join(report_table(result["runs"])))
    return result


if __name__ == "__main__":
    main()
