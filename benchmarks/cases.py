"""What the benchmark times: shapes, and for each norm the implementations a
user could pick for a padded batch.

Every implementation is built by a factory `make(x, mask, C)` that returns
`forward(x) -> y`; the returned function owns its parameters (weight and bias
requiring grad) so forward+backward exercises the same work as in training.
BatchNorm runs in training mode (batch statistics and a running-statistics
update), as that is where padding changes the result.

Implementations (not all exist for every norm):
  masknorm      this package's module, padding_mask passed
  stock         torch's module on the whole padded tensor: today's speed, but
                for BatchNorm the statistics include the padding (wrong)
  masked-sums   the correct result written with torch ops (masked_fill, sums)
  compiled      masked-sums under torch.compile
  gather        x[~mask] -> torch's module -> scattered back into zeros
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import masknorm


@dataclass(frozen=True)
class Shape:
    name: str
    dims: tuple          # (B, T, C) or, for 2-D batch norm, (N, C)
    dtype: torch.dtype
    padding: float       # fraction of padded positions (0 = no mask passed)
    norms: tuple         # which norms run on it
    large: bool = False  # counts for the bandwidth bars


ALL_NORMS = ("bn-nlc", "bn-ncl", "ln", "rms")

SHAPES = (
    Shape("B32 T256 C512 fp32 30% pad", (32, 256, 512), torch.float32, 0.3, ALL_NORMS, large=True),
    Shape("B8 T1024 C1024 fp32 30% pad", (8, 1024, 1024), torch.float32, 0.3, ALL_NORMS, large=True),
    Shape("B32 T256 C512 fp32 no pad", (32, 256, 512), torch.float32, 0.0, ALL_NORMS),
    Shape("N65536 C256 fp32 2-D 30% pad", (65536, 256), torch.float32, 0.3, ("bn-2d",), large=True),
    Shape("B32 T256 C512 bf16 30% pad", (32, 256, 512), torch.bfloat16, 0.3, ALL_NORMS),
)
QUICK_SHAPES = (
    Shape("B8 T64 C128 fp32 30% pad", (8, 64, 128), torch.float32, 0.3, ALL_NORMS),
    Shape("N4096 C64 fp32 2-D 30% pad", (4096, 64), torch.float32, 0.3, ("bn-2d",)),
)

NORM_TITLES = {
    "bn-nlc": "BatchNorm (B, T, C)",
    "bn-ncl": "BatchNorm (B, C, T)",
    "bn-2d": "BatchNorm (N, C)",
    "ln": "LayerNorm",
    "rms": "RMSNorm",
}


def make_input(shape: Shape, seed: int = 0):
    """The padded batch: x (N, L, C) or (N, C) and its padding mask (or None).

    Lengths are drawn uniformly so that about `shape.padding` of the positions
    are padding; padded positions hold zeros, as in a real padded batch.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.dims, generator=g).mul_(2).add_(3).to(shape.dtype)
    if shape.padding == 0:
        return x, None
    if x.dim() == 2:
        mask = torch.rand(shape.dims[0], generator=g) < shape.padding
    else:
        B, T, _ = shape.dims
        # lengths uniform in [T * (1 - 2p), T] have mean T * (1 - p)
        low = max(1, int(T * (1 - 2 * shape.padding)))
        lengths = torch.randint(low, T + 1, (B,), generator=g)
        mask = masknorm.padding_mask_from_lengths(lengths, T)
    x = x.masked_fill(mask.unsqueeze(-1), 0)
    return x, mask


def useful_elements(x, mask):
    """Elements of valid tokens: the only ones the minimum-traffic model counts."""
    if mask is None:
        return x.numel()
    return int((~mask).sum()) * x.shape[-1]


# ------------------------------------------------------------- batch norm


def bn_masked_sums(x, mask, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5):
    """Masked BatchNorm in training mode, channels last (..., C), written with torch ops.

    Same result as nn.BatchNorm1d on the packed valid tokens, including the
    running-statistics update.
    """
    pad = mask.unsqueeze(-1)
    xf = x.float().masked_fill(pad, 0)            # masked_fill, not * 0: padding may hold NaN
    dims = tuple(range(x.dim() - 1))
    n = (~mask).sum()
    mean = xf.sum(dims) / n
    centered = (xf - mean).masked_fill(pad, 0)
    var = centered.pow(2).sum(dims) / n
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)) * momentum)
    y = centered * torch.rsqrt(var + eps) * weight + bias
    return y.masked_fill(pad, 0).to(x.dtype)


def _to_channels_last(layout, x):
    return x.transpose(1, 2) if layout == "ncl" else x


def make_bn(impl, layout, x, mask, C):
    """layout: "nlc" (B, T, C), "ncl" (B, C, T) or "2d" (N, C); x is always given as (B, T, C) / (N, C)."""
    if impl == "masknorm":
        m = masknorm.MaskedBatchNorm1d(C, channels_last=layout == "nlc")
        return (lambda x: m(x, mask)), list(m.parameters())
    if impl == "stock":
        m = nn.BatchNorm1d(C)
        if layout == "nlc":  # what users write today for transformer-layout batches
            return (lambda x: m(x.transpose(1, 2)).transpose(1, 2)), list(m.parameters())
        return m, list(m.parameters())
    weight, bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    if impl in ("masked-sums", "compiled"):
        fn = bn_masked_sums
        if impl == "compiled":
            fn = torch.compile(bn_masked_sums, fullgraph=True, dynamic=False)

        def forward(x):
            xl = _to_channels_last(layout, x)
            return _to_channels_last(layout, fn(xl, mask, weight, bias, running_mean, running_var))
        return forward, [weight, bias]
    if impl == "gather":
        m = nn.BatchNorm1d(C, dtype=torch.float32)

        def forward(x):
            xl = _to_channels_last(layout, x)
            valid = ~mask
            y = xl.new_zeros(xl.shape)
            y[valid] = m(xl[valid].float()).to(x.dtype)
            return _to_channels_last(layout, y)
        return forward, list(m.parameters())
    raise ValueError(impl)


# --------------------------------------------------------- layer/RMS norm


def ln_masked(x, mask, weight, bias, eps=1e-5):
    """LayerNorm with padded rows zeroed: torch's kernel still runs on them."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).masked_fill(mask.unsqueeze(-1), 0)


def rms_masked(x, mask, weight, eps=None):
    return F.rms_norm(x, (x.shape[-1],), weight, eps).masked_fill(mask.unsqueeze(-1), 0)


def make_row_norm(norm, impl, x, mask, C):
    dtype = x.dtype
    if impl == "masknorm":
        m = (masknorm.MaskedLayerNorm if norm == "ln" else masknorm.MaskedRMSNorm)(C, dtype=dtype)
        return (lambda x: m(x, mask)), list(m.parameters())
    stock = (nn.LayerNorm if norm == "ln" else nn.RMSNorm)(C, dtype=dtype)
    params = list(stock.parameters())
    if impl == "stock":
        return stock, params
    if impl in ("masked-sums", "compiled"):
        fn = ln_masked if norm == "ln" else rms_masked
        if impl == "compiled":
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        return (lambda x: fn(x, mask, *params)), params
    if impl == "gather":
        def forward(x):
            valid = ~mask
            y = x.new_zeros(x.shape)
            y[valid] = stock(x[valid])
            return y
        return forward, params
    raise ValueError(impl)


def implementations(norm, has_mask, compile_composites=True):
    """Implementation names to run for a norm, masknorm first."""
    if not has_mask:
        return ["masknorm", "stock"]
    names = ["masknorm", "stock", "masked-sums", "gather"]
    if compile_composites:
        names.insert(3, "compiled")
    return names


def make(norm, impl, x, mask, C):
    if norm.startswith("bn-"):
        return make_bn(impl, norm[3:], x, mask, C)
    return make_row_norm(norm, impl, x, mask, C)


def layout_input(norm, x):
    """The input tensor as `norm` consumes it: (B, C, T) for bn-ncl, else unchanged."""
    return x.transpose(1, 2).contiguous() if norm == "bn-ncl" else x
