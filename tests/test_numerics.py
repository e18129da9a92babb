"""Accuracy of the statistics on hard data, against float64 statistics of the
same (rounded) values, side by side with torch's own modules on the same data:
nn.BatchNorm1d on the packed valid tokens, nn.LayerNorm (torch.native_layer_norm
for its mean and rstd) and nn.RMSNorm on the valid rows.

Data (``KINDS``): a large common offset (1e4 + 0.01 noise, the case measured in
the hardening issue, and 1e6 + 1 noise: the mean is a million standard
deviations from 0), values so small that their squares are float32 denormals
(1e-20 noise), values near float16's max, and plain N(0, 1) for comparison.
Batch norm runs the issue's (16, 64, 32) channels-last batch with 25% padding
and the same batch channels-first; LN and RMS rows of 512.

Each metric of masknorm (the native CPU kernels) must be at least as good as
torch's on the same data (or within one ulp of the result, the last digit
its dtype holds, where both are that exact; for a mean, in standard
deviations, at least one ulp of a normalized value), and within a bound about 10x above what it measures
today (so that a regression is caught even where torch is much worse). Run as
a script (``python tests/test_numerics.py``) it prints the table that
docs/reliability.md shows.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import masknorm  # noqa: E402

pytestmark = pytest.mark.slow  # large hard-data cases against float64


class Kind(NamedTuple):
    offset: float
    noise: float
    dtypes: Tuple[torch.dtype, ...]


KINDS: Dict[str, Kind] = {
    "N(0, 1)": Kind(0.0, 1.0, (torch.float32, torch.bfloat16, torch.float16)),
    "1e4 + 0.01 N(0,1)": Kind(1e4, 0.01, (torch.float32,)),
    "1e6 + N(0,1)": Kind(1e6, 1.0, (torch.float32,)),
    "1e2 + N(0,1)": Kind(1e2, 1.0, (torch.bfloat16, torch.float16)),
    "1e-20 N(0,1)": Kind(0.0, 1e-20, (torch.float32,)),
    "near float16 max": Kind(16384.0, 8192.0, (torch.float16,)),
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def make_data(kind: str, shape, dtype) -> torch.Tensor:
    k = KINDS[kind]
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if kind == "near float16 max":
        z = z.clamp(-1.9, 5.9)  # up to 16384 + 5.9 * 8192 = 64717, below 65504
    return (k.offset + k.noise * z).to(dtype)


def bn_mask(N=16, L=64):
    """25% padding (lengths 32..64, mean 48 of 64), the first sequence not full."""
    gen = torch.Generator().manual_seed(2)
    lengths = torch.randint(L // 2, L + 1, (N,), generator=gen)
    lengths[0] = L - 5
    return masknorm.padding_mask_from_lengths(lengths, L)


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def ulp(dtype) -> float:
    return torch.finfo(dtype).eps


def bn_errors(kind: str, dtype, layout: str) -> Dict[str, Tuple[float, float, float]]:
    """metric -> (masknorm's error, torch's error, one ulp of the result in its
    dtype): running mean (in standard deviations), running variance
    (relative; momentum 1, so the batch's unbiased variance), output (max abs,
    normalized units)."""
    N, L, C = 16, 64, 32
    x = make_data(kind, (N, L, C), dtype)
    mask = bn_mask(N, L)
    packed = x[~mask]
    ref = packed.double()
    mean64, var64 = ref.mean(0), ref.var(0)
    y64 = (ref - mean64) / (ref.var(0, unbiased=False) + 1e-5).sqrt()
    m = masknorm.MaskedBatchNorm1d(C, momentum=1.0, channels_last=layout == "NLC", dtype=dtype)
    r = nn.BatchNorm1d(C, momentum=1.0, dtype=dtype)
    with torch.no_grad():
        if layout == "NLC":
            y = m(x, padding_mask=mask)[~mask]
        else:
            y = m(x.transpose(1, 2).contiguous(), padding_mask=mask).transpose(1, 2)[~mask]
        yr = r(packed)
    std = var64.sqrt()
    out = {}
    for name, (a, b) in {"running_mean (std)": (m.running_mean, r.running_mean),
                         "running_var (rel)": (m.running_var, r.running_var)}.items():
        expected = mean64 if name.startswith("running_mean") else var64
        scale = std if name.startswith("running_mean") else var64.abs()
        # one ulp: of the variance; of the mean, or of a normalized value (size 1) when
        # the mean is smaller than the standard deviation (the output cannot tell)
        resolution = ulp(dtype) * (_max(expected.abs() / scale) if name.startswith("running_var")
                                   else max(1.0, _max(expected.abs() / scale)))
        out[name] = (_max((a.double() - expected).abs() / scale), _max((b.double() - expected).abs() / scale),
                     resolution)
    out["output (abs)"] = (_max((y.double() - y64).abs()), _max((yr.double() - y64).abs()),
                           ulp(dtype) * _max(y64.abs()))
    return out


def row_errors(kind: str, dtype, norm: str) -> Dict[str, Tuple[float, float, float]]:
    """metric -> (masknorm's error, torch's error, one ulp of the result) on
    rows of 512: output (max abs), and for LN the mean (in standard
    deviations) and rstd (relative), both float32."""
    N, L, D = 16, 64, 512
    x = make_data(kind, (N, L, D), dtype)
    mask = bn_mask(N, L)
    rows = x[~mask]
    ref = rows.double()
    out = {}
    with torch.no_grad():
        if norm == "layer_norm":
            mean64 = ref.mean(-1)
            var64 = ref.var(-1, unbiased=False)
            rstd64 = (var64 + 1e-5).rsqrt()
            y64 = (ref - mean64[:, None]) * rstd64[:, None]
            y, mean, rstd = torch.ops.masknorm.layer_norm(x, [D], mask, None, None, 1e-5)
            yr, mean_r, rstd_r = torch.native_layer_norm(rows, [D], None, None, 1e-5)
            std = var64.sqrt()
            f32 = ulp(torch.float32)
            out["mean (std)"] = (_max((mean[~mask].double() - mean64).abs() / std),
                                 _max((mean_r.reshape(-1).double() - mean64).abs() / std),
                                 f32 * max(1.0, _max(mean64.abs() / std)))
            out["rstd (rel)"] = (_max((rstd[~mask].double() - rstd64).abs() / rstd64),
                                 _max((rstd_r.reshape(-1).double() - rstd64).abs() / rstd64), f32)
            y = y[~mask]
        else:
            y64 = ref * ((ref * ref).mean(-1, keepdim=True) + 1e-6).rsqrt()
            y = masknorm.MaskedRMSNorm(D, eps=1e-6, dtype=dtype)(x, padding_mask=mask)[~mask]
            yr = nn.RMSNorm(D, eps=1e-6, dtype=dtype)(rows)
    out["output (abs)"] = (_max((y.double() - y64).abs()), _max((yr.double() - y64).abs()),
                           ulp(dtype) * _max(y64.abs()))
    return out


# (norm, kind, dtype, metric) -> bound on masknorm's error, about 10x what it
# measures (AVX512 build, 2 threads), rounded up to a power of 10 or a half.
BOUNDS = {
    ("batch_norm", "1e4 + 0.01 N(0,1)", torch.float32, "running_var (rel)"): 1e-6,
    ("batch_norm", "1e6 + N(0,1)", torch.float32, "running_var (rel)"): 1e-6,
    ("batch_norm", "N(0, 1)", torch.float32, "running_var (rel)"): 1e-6,
    ("batch_norm", "N(0, 1)", torch.float32, "output (abs)"): 5e-6,
    ("batch_norm", "1e4 + 0.01 N(0,1)", torch.float32, "running_mean (std)"): 0.1,  # the float32 mean's ulp: 0.05 std
    ("layer_norm", "1e4 + 0.01 N(0,1)", torch.float32, "rstd (rel)"): 1e-6,
    ("layer_norm", "1e6 + N(0,1)", torch.float32, "rstd (rel)"): 1e-6,
}


def cases() -> List[Tuple[str, str, torch.dtype, str]]:
    out = []
    for kind, k in KINDS.items():
        for dtype in k.dtypes:
            for norm in ("batch_norm-NLC", "batch_norm-NCL", "layer_norm", "rms_norm"):
                out.append((norm, kind, dtype))
    return out


def errors(norm: str, kind: str, dtype) -> Dict[str, Tuple[float, float, float]]:
    if norm.startswith("batch_norm"):
        return bn_errors(kind, dtype, norm.split("-")[1])
    return row_errors(kind, dtype, norm)


@pytest.fixture(autouse=True)
def native_kernels(kernels):
    assert kernels == "native"  # the CPU kernels' numerics; the generic kernels are torch's own ops


@pytest.mark.parametrize("norm,kind,dtype", cases(), ids=lambda v: DTYPE_NAMES.get(v, str(v)))
def test_at_least_as_accurate_as_torch(norm, kind, dtype):
    for metric, (ours, theirs, last_digit) in errors(norm, kind, dtype).items():
        assert not math.isnan(ours), f"{metric}: NaN"
        if math.isfinite(theirs):
            # within one ulp of the result (its last digit), both are exact: "as good"
            assert ours <= max(theirs, last_digit), f"{metric}: masknorm {ours:.3g}, torch {theirs:.3g}"
        bound = BOUNDS.get((norm.split("-")[0], kind, dtype, metric))
        if bound is not None:
            assert ours <= bound, f"{metric}: {ours:.3g} above the bound {bound:g}"


def test_the_issue_case_improved():
    """The hardening issue measured masked BN's running variance 2.2x less
    accurate than torch's on 1e4 + 0.01 noise (channels-last, 25% padding):
    now far below torch's error, in both layouts."""
    for layout in ("NLC", "NCL"):
        ours, theirs, _ = bn_errors("1e4 + 0.01 N(0,1)", torch.float32, layout)["running_var (rel)"]
        assert ours < 1e-6 and ours * 100 < theirs, (layout, ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["first vector", "first valid element"])
def test_bn_sums_that_begin_far_from_their_mean(case, dtype):
    """Channels-first batch norm sums deviations from an estimate of the mean
    in one pass (the mean of the valid lanes of the first vector, else the
    first valid element), and takes a second pass with the exact mean where
    the estimate is far out in the spread. Sums that begin with outliers
    still get M2 to float accuracy: "first vector", rows of 4096 (a sum per
    row) beginning with 16 positions of 1000 in N(0, 1) data; "first valid
    element", rows of 32 under lane masks (a sum per chunk of 64 rows) whose
    first row's first valid position, 16, holds 1000."""
    g = torch.Generator().manual_seed(0)
    N, L = (2, 4096) if case == "first vector" else (64, 32)
    x = torch.randn(N, 3, L, generator=g)
    mask = torch.zeros(N, L, dtype=torch.bool)
    if case == "first vector":
        mask[:, 0] = True
        mask[1, L // 2:] = True
        x[:, :, 1:17] = 1000.0
    else:
        mask[0, :16] = True
        mask[1::2, 20:] = True
        x[0, :, 16] = 1000.0
    x = x.to(dtype)
    mean, m2, count = torch.ops.masknorm.batch_norm_stats(x, mask, False)
    valid = ~mask[:, None, :].expand_as(x)
    xd = x.double()
    n = valid[:, 0].sum()
    ref_mean = torch.where(valid, xd, 0).sum((0, 2)) / n
    ref_m2 = torch.where(valid, (xd - ref_mean.view(1, -1, 1)) ** 2, 0).sum((0, 2))
    assert count.item() == n.item()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m2.double(), ref_m2, rtol=5e-7, atol=0)


def table() -> str:
    lines = ["| norm | data | dtype | statistic | masknorm error | torch error | 1 ulp |", "|---|---|---|---|---:|---:|---:|"]
    for norm, kind, dtype in cases():
        for metric, (ours, theirs, last_digit) in errors(norm, kind, dtype).items():
            lines.append(f"| {norm} | {kind} | {DTYPE_NAMES[dtype]} | {metric} | {ours:.2e} | {theirs:.2e} | "
                         f"{last_digit:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
