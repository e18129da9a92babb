"""python -m masknorm.demo: the worked examples this project started from, then
what padding does to plain BatchNorm's statistics and what masknorm does
instead, on synthetic padded batches. The padding study, a training run with
plots, is examples/padding_study.py in the clone."""
from __future__ import annotations

import argparse

import torch
from torch import nn

import masknorm


def _fmt(t: torch.Tensor) -> str:
    return str([[round(float(v), 4) for v in row] for row in t.reshape(t.shape[0], -1)])


def worked_examples() -> None:
    print("== Worked examples (no padding: masknorm equals torch) ==")
    X = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
    print("X =", X.tolist())
    print("  MaskedLayerNorm(2)(X)   =", _fmt(masknorm.MaskedLayerNorm(2)(X).detach()), " (rows normalized)")
    print("  MaskedBatchNorm1d(2)(X) =", _fmt(masknorm.MaskedBatchNorm1d(2)(X).detach()), " (columns normalized)")

    batch = torch.tensor([[2.0], [4.0], [6.0], [8.0]])
    out = masknorm.MaskedBatchNorm1d(1, affine=False)(batch)
    print("Batch [2, 4, 6, 8]: mean 5, std sqrt(5) ->", [round(float(v), 2) for v in out.flatten()])

    # batch=4, seq=3, dim=2: sample b is [[1+b, 2+b], [3+b, 4+b], [5+b, 6+b]]
    seq = torch.stack([torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]) + b for b in range(4)])
    bn = masknorm.MaskedBatchNorm1d(2, affine=False, channels_last=True)(seq)
    ln = masknorm.MaskedLayerNorm(2, elementwise_affine=False)(seq)
    print("Input [batch=4, seq=3, dim=2]; sample 0 =", seq[0].tolist())
    print("  BatchNorm (per feature, across batch and positions), sample 0:", _fmt(bn[0].detach()))
    print("  LayerNorm (per token, across its 2 features),        sample 0:", _fmt(ln[0].detach()))


def padding_drift(batches: int, seed: int) -> None:
    print()
    print("== Padded batches: whose statistics describe the data? ==")
    g = torch.Generator().manual_seed(seed)
    C, N, T = 4, 16, 64
    true_mean = torch.tensor([3.0, -2.0, 0.5, 10.0])
    true_std = torch.tensor([2.0, 0.5, 1.0, 4.0])
    plain = nn.BatchNorm1d(C)
    masked = masknorm.MaskedBatchNorm1d(C, channels_last=True)
    padded_fraction = 0.0
    for _ in range(batches):
        lengths = torch.randint(4, T + 1, (N,), generator=g)
        mask = masknorm.padding_mask_from_lengths(lengths, T)  # True = padding
        x = torch.randn(N, T, C, generator=g) * true_std + true_mean
        x = x.masked_fill(mask.unsqueeze(-1), 0.0)  # padding is zeros, as in a padded batch
        padded_fraction += mask.float().mean().item() / batches
        plain(x.transpose(1, 2))  # stock BatchNorm1d: statistics include the zeros
        masked(x, mask)  # masknorm: statistics from valid tokens only
    print(f"{batches} batches of {N} sequences, up to {T} tokens, {C} features; {padded_fraction:.0%} of positions are padding")
    header = f"{'feature':>8} | {'true mean':>9} {'BatchNorm1d':>11} {'masknorm':>9} | {'true var':>9} {'BatchNorm1d':>11} {'masknorm':>9}"
    print(header)
    print("-" * len(header))
    for c in range(C):
        print(
            f"{c:>8} | {true_mean[c].item():9.3f} {plain.running_mean[c].item():11.3f} {masked.running_mean[c].item():9.3f}"
            f" | {true_std[c].item() ** 2:9.3f} {plain.running_var[c].item():11.3f} {masked.running_var[c].item():9.3f}"
        )
    err_plain = (plain.running_mean - true_mean).abs().max().item()
    err_masked = (masked.running_mean - true_mean).abs().max().item()
    print(f"largest running-mean error: BatchNorm1d {err_plain:.3f}, masknorm {err_masked:.3f}")
    print("Plain BatchNorm's running statistics describe padded batches (means pulled to 0, variances")
    print("distorted), so inference normalizes real tokens with the wrong numbers; masknorm's match the data.")


def main(argv=None, prog: str = "python -m masknorm.demo") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--batches", type=int, default=200, help="training batches for the drift table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    worked_examples()
    padding_drift(args.batches, args.seed)


if __name__ == "__main__":
    main()
