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
  loop          GroupNorm/InstanceNorm: torch's module on each sequence cropped
                to its length, padded back and stacked (what users write today)
  padded        jagged rows: masknorm on the padded tensor and mask, against
                masknorm on the jagged NestedTensor of the same tokens
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import masknorm


@dataclass(frozen=True)
class Shape:
    name: str
    dims: tuple          # (N, L, C) or, for 2-D batch norm, (N, C)
    dtype: torch.dtype
    padding: float       # fraction of padded positions (0 = no mask passed)
    norms: tuple         # which norms run on it
    large: bool = False  # counts for the bandwidth bars
    inference: bool = False  # forward only, modules in eval mode, under torch.inference_mode
    small: bool = False  # per-call overhead: masknorm against stock only


# Batch-norm layouts as everywhere in masknorm: NC (N, C), NCL (N, C, L), NLC (N, L, C).
ALL_NORMS = ("bn-NLC", "bn-NCL", "ln", "rms")
# Per-sample norms (speech front ends: (N, C, T)) and jagged input ((N, j, C) NestedTensors).
SAMPLE_NORMS = ("gn-NCL", "in-NCL")
JAGGED_NORMS = ("bn-jagged", "ln-jagged", "gn-jagged")
GROUPS = 32  # GroupNorm's groups (InstanceNorm: one per channel)

SHAPES = (
    Shape("N32 L256 C512 fp32 30% pad", (32, 256, 512), torch.float32, 0.3, ALL_NORMS, large=True),
    Shape("N8 L1024 C1024 fp32 30% pad", (8, 1024, 1024), torch.float32, 0.3, ALL_NORMS, large=True),
    Shape("N32 L256 C512 fp32 no pad", (32, 256, 512), torch.float32, 0.0, ALL_NORMS),
    Shape("N65536 C256 fp32 30% pad", (65536, 256), torch.float32, 0.3, ("bn-NC",), large=True),
    Shape("N32 L256 C512 bf16 30% pad", (32, 256, 512), torch.bfloat16, 0.3, ALL_NORMS),
    Shape("N16 L1024 C512 fp32 30% pad", (16, 1024, 512), torch.float32, 0.3, SAMPLE_NORMS + JAGGED_NORMS),
    Shape("N16 L1024 C512 bf16 30% pad", (16, 1024, 512), torch.bfloat16, 0.3, SAMPLE_NORMS),
    # Inference: what most CPU users run.
    Shape("N32 L256 C512 fp32 30% pad eval", (32, 256, 512), torch.float32, 0.3, ALL_NORMS, inference=True),
    Shape("N32 L256 C512 fp32 no pad eval", (32, 256, 512), torch.float32, 0.0, ALL_NORMS, inference=True),
    Shape("N32 L256 C512 bf16 30% pad eval", (32, 256, 512), torch.bfloat16, 0.3, ALL_NORMS, inference=True),
    Shape("N32 L256 C512 bf16 no pad eval", (32, 256, 512), torch.bfloat16, 0.0, ALL_NORMS, inference=True),
    Shape("N8 L1024 C1024 fp32 30% pad eval", (8, 1024, 1024), torch.float32, 0.3, ("bn-NCL", "ln"), inference=True),
    # Per-call cost: small tensors, training step and inference.
    Shape("N8 L32 C256 fp32 30% pad small", (8, 32, 256), torch.float32, 0.3, ALL_NORMS, small=True),
    Shape("N64 L64 C256 fp32 30% pad small", (64, 64, 256), torch.float32, 0.3, ALL_NORMS, small=True),
    Shape("N8 L32 C256 fp32 30% pad small eval", (8, 32, 256), torch.float32, 0.3, ALL_NORMS, small=True,
          inference=True),
    Shape("N64 L64 C256 fp32 30% pad small eval", (64, 64, 256), torch.float32, 0.3, ALL_NORMS, small=True,
          inference=True),
)
QUICK_SHAPES = (
    Shape("N8 L64 C128 fp32 30% pad", (8, 64, 128), torch.float32, 0.3, ALL_NORMS + SAMPLE_NORMS + JAGGED_NORMS),
    Shape("N4096 C64 fp32 30% pad", (4096, 64), torch.float32, 0.3, ("bn-NC",)),
    Shape("N8 L64 C128 fp32 30% pad eval", (8, 64, 128), torch.float32, 0.3, ALL_NORMS, inference=True),
)
# GPU shapes: large enough to fill the card (`large`: the bandwidth bars apply).
GPU_SHAPES = (
    Shape("N32 L1024 C1024 bf16 no pad", (32, 1024, 1024), torch.bfloat16, 0.0, ALL_NORMS, large=True),
    Shape("N16 L1024 C4096 bf16 no pad", (16, 1024, 4096), torch.bfloat16, 0.0, ("ln", "rms"), large=True),
    Shape("N32 L1024 C1024 bf16 30% pad", (32, 1024, 1024), torch.bfloat16, 0.3, ALL_NORMS, large=True),
    Shape("N32 L1024 C1024 fp32 30% pad", (32, 1024, 1024), torch.float32, 0.3, ALL_NORMS, large=True),
    Shape("N262144 C512 fp32 30% pad", (262144, 512), torch.float32, 0.3, ("bn-NC",), large=True),
)

NORM_TITLES = {
    "bn-NLC": "BatchNorm (N, L, C)",
    "bn-NCL": "BatchNorm (N, C, L)",
    "bn-NC": "BatchNorm (N, C)",
    "ln": "LayerNorm",
    "rms": "RMSNorm",
    "gn-NCL": f"GroupNorm({GROUPS}) (N, C, L)",
    "in-NCL": "InstanceNorm1d (N, C, L)",
    "bn-jagged": "BatchNorm jagged",
    "ln-jagged": "LayerNorm jagged",
    "gn-jagged": f"GroupNorm({GROUPS}) jagged",
}


def make_input(shape: Shape, seed: int = 0, device: str = "cpu"):
    """The padded batch: x (N, L, C) or (N, C) and its padding mask (or None), on `device`.

    Lengths are drawn uniformly so that about `shape.padding` of the positions
    are padding; padded positions hold zeros, as in a real padded batch.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.dims, generator=g).mul_(2).add_(3).to(shape.dtype)
    if shape.padding == 0:
        return x.to(device), None
    if x.dim() == 2:
        mask = torch.rand(shape.dims[0], generator=g) < shape.padding
    else:
        B, T, _ = shape.dims
        # lengths uniform in [T * (1 - 2p), T] have mean T * (1 - p)
        low = max(1, int(T * (1 - 2 * shape.padding)))
        lengths = torch.randint(low, T + 1, (B,), generator=g)
        mask = masknorm.padding_mask_from_lengths(lengths, T)
    x = x.masked_fill(mask.unsqueeze(-1), 0)
    return x.to(device), mask.to(device)


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
    return x.transpose(1, 2) if layout == "NCL" else x


def make_bn(impl, layout, x, mask, C, training=True):
    """layout: "NLC" (N, L, C), "NCL" (N, C, L) or "NC" (N, C), as `x` is given (layout_input).
    training=False: the modules in eval mode (running statistics; masknorm and stock only)."""
    device = x.device
    if impl == "masknorm":
        m = masknorm.MaskedBatchNorm1d(C, channels_last=layout == "NLC", device=device).train(training)
        return (lambda x: m(x, mask)), list(m.parameters())
    if impl == "stock":
        m = nn.BatchNorm1d(C, device=device).train(training)
        if layout == "NLC":  # what users write today for transformer-layout batches
            return (lambda x: m(x.transpose(1, 2)).transpose(1, 2)), list(m.parameters())
        return m, list(m.parameters())
    weight, bias = nn.Parameter(torch.ones(C, device=device)), nn.Parameter(torch.zeros(C, device=device))
    running_mean, running_var = torch.zeros(C, device=device), torch.ones(C, device=device)
    if impl in ("masked-sums", "compiled"):
        fn = bn_masked_sums
        if impl == "compiled":
            fn = torch.compile(bn_masked_sums, fullgraph=True, dynamic=False)

        def forward(x):
            xl = _to_channels_last(layout, x)
            return _to_channels_last(layout, fn(xl, mask, weight, bias, running_mean, running_var))
        return forward, [weight, bias]
    if impl == "gather":
        m = nn.BatchNorm1d(C, dtype=torch.float32, device=device)

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
    dtype, device = x.dtype, x.device
    if impl == "masknorm":
        m = (masknorm.MaskedLayerNorm if norm == "ln" else masknorm.MaskedRMSNorm)(C, dtype=dtype, device=device)
        return (lambda x: m(x, mask)), list(m.parameters())
    stock = (nn.LayerNorm if norm == "ln" else nn.RMSNorm)(C, dtype=dtype, device=device)
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


# ------------------------------------------------- group / instance norm


def gn_masked_sums(x, mask, groups, weight, bias, eps=1e-5):
    """Masked GroupNorm of (N, C, L) written with torch ops: statistics per
    (sample, group) over the valid positions."""
    N, C, L = x.shape
    pad = mask[:, None, None, :]
    xg = x.float().view(N, groups, C // groups, L).masked_fill(pad, 0)
    n = ((~mask).sum(1) * (C // groups)).clamp_min(1).view(N, 1, 1, 1)
    mean = xg.sum((2, 3), keepdim=True) / n
    centered = (xg - mean).masked_fill(pad, 0)
    var = centered.pow(2).sum((2, 3), keepdim=True) / n
    y = (centered * torch.rsqrt(var + eps)).view(N, C, L) * weight[:, None] + bias[:, None]
    return y.masked_fill(mask[:, None, :], 0).to(x.dtype)


def make_per_sample(norm, impl, x, mask, C):
    """GroupNorm / InstanceNorm of (N, C, L) input (affine, no running statistics)."""
    dtype, device = x.dtype, x.device
    groups = C if norm == "in-NCL" else GROUPS
    if impl == "masknorm":
        if norm == "in-NCL":
            m = masknorm.MaskedInstanceNorm1d(C, affine=True, dtype=dtype, device=device)
        else:
            m = masknorm.MaskedGroupNorm(groups, C, dtype=dtype, device=device)
        return (lambda x: m(x, mask)), list(m.parameters())
    if norm == "in-NCL":
        stock = nn.InstanceNorm1d(C, affine=True, dtype=dtype, device=device)
    else:
        stock = nn.GroupNorm(groups, C, dtype=dtype, device=device)
    params = list(stock.parameters())
    if impl == "stock":
        return stock, params
    if impl in ("masked-sums", "compiled"):
        fn = gn_masked_sums
        if impl == "compiled":
            fn = torch.compile(gn_masked_sums, fullgraph=True, dynamic=False)
        return (lambda x: fn(x, mask, groups, *params)), params
    if impl == "loop":
        lengths = (~mask).sum(1).tolist()

        def forward(x):
            L = x.shape[2]
            return torch.stack([F.pad(stock(x[n : n + 1, :, :k])[0], (0, L - k)) for n, k in enumerate(lengths)])
        return forward, params
    raise ValueError(impl)


def make_jagged(norm, impl, x, mask, C):
    """Jagged rows: ``x`` is the NestedTensor (masknorm) or the padded tensor (padded)."""
    dtype, device = x.dtype, x.device
    kind = norm.split("-")[0]
    if kind == "bn":
        m = masknorm.MaskedBatchNorm1d(C, channels_last=True, dtype=dtype, device=device)
    elif kind == "ln":
        m = masknorm.MaskedLayerNorm(C, dtype=dtype, device=device)
    else:
        m = masknorm.MaskedGroupNorm(GROUPS, C, channels_last=True, dtype=dtype, device=device)
    if impl == "masknorm":
        return m, list(m.parameters())
    if impl == "padded":
        return (lambda x: m(x, mask)), list(m.parameters())
    raise ValueError(impl)


def implementations(norm, has_mask, compile_composites=True, stock_only=False):
    """Implementation names to run for a norm, masknorm first (stock_only:
    inference and per-call rows, against stock torch alone)."""
    if stock_only:
        return ["masknorm", "stock"]
    if norm.endswith("-jagged"):
        return ["masknorm", "padded"]
    if norm in SAMPLE_NORMS and has_mask:
        names = ["masknorm", "stock", "masked-sums", "loop"]
        if compile_composites:
            names.insert(3, "compiled")
        return names
    if not has_mask:
        return ["masknorm", "stock"]
    names = ["masknorm", "stock", "masked-sums", "gather"]
    if compile_composites:
        names.insert(3, "compiled")
    return names


def make(norm, impl, x, mask, C, training=True):
    if norm.endswith("-jagged"):
        return make_jagged(norm, impl, x, mask, C)
    if norm in SAMPLE_NORMS:
        return make_per_sample(norm, impl, x, mask, C)
    if norm.startswith("bn-"):
        return make_bn(impl, norm[3:], x, mask, C, training)
    return make_row_norm(norm, impl, x, mask, C)  # the same in eval mode


def layout_input(norm, impl, x, mask):
    """The input tensor as `norm` consumes it: (N, C, L) for the NCL norms,
    the jagged NestedTensor of the valid tokens for masknorm's jagged rows,
    else unchanged."""
    if norm.endswith("-NCL"):
        return x.transpose(1, 2).contiguous()
    if norm.endswith("-jagged") and impl == "masknorm":
        lengths = (~mask).sum(1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return torch.nested.nested_tensor_from_jagged(x[~mask], offsets)
    return x
