"""The CUDA kernels (csrc/ops/cuda/): every op on CUDA tensors against the CPU
kernels on the same values, across the kernels' paths (16-byte vectors and
single elements, rows kept in registers, several rows per block, the generic
fallback for very long rows), with NaN in padding, determinism, the generic
kernels on CUDA, and a training step captured in a CUDA graph.

Skipped without a CUDA device. Where one is present and MASKNORM_EXPECT_CUDA=1,
a masknorm built without its CUDA kernels fails instead of skipping.
"""
import os

import pytest
import torch
from torch import nn

import masknorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ops = torch.ops.masknorm
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def assert_close(actual, expected, dtype, what=""):
    assert actual is not None and expected is not None, what
    t = tol(dtype)
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=t, atol=t,
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def fused_kernels():
    if not masknorm.build_info()["cuda"]:
        if os.environ.get("MASKNORM_EXPECT_CUDA") == "1":
            pytest.fail("masknorm was built without its CUDA kernels")
        pytest.skip("masknorm built without CUDA kernels")
    masknorm._C._use_fused_cuda_kernels(True)
    assert masknorm._C._kernels_for("cuda") == "cuda"
    yield
    masknorm._C._use_fused_cuda_kernels(True)


def random_mask(shape, p=0.3, generator=None):
    mask = torch.rand(shape, generator=generator) < p
    return mask


def poisoned(x, full_mask):
    """x with NaN/inf at padded positions: they must never reach anything."""
    x = x.clone()
    x[full_mask] = float("nan")
    return x


# ------------------------------------------------------------ layer / RMS norm

ROW_WIDTHS = (1, 7, 64, 100, 512, 1000, 1024, 4096, 8200, 16384, 40000)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", ROW_WIDTHS)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_row_norm_forward_backward_match_cpu(norm, D, dtype):
    g = torch.Generator().manual_seed(D)
    rows = 37 if D < 10000 else 5
    x = (torch.randn(rows, D, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    mask = random_mask((rows,), generator=g)
    mask[0] = True
    w = (torch.rand(D, generator=g) + 0.5).to(dtype)
    b = torch.randn(D, generator=g).to(dtype)
    dy = torch.randn(rows, D, generator=g, dtype=torch.float64).to(dtype)
    x_nan = poisoned(x, mask[:, None].expand_as(x))

    def run(device):
        xd, m, wd, bd, dyd = (t.to(device) for t in (x_nan, mask, w, b, dy))
        if norm == "layer_norm":
            y, mean, rstd = ops.layer_norm(xd, [D], m, wd, bd, 1e-5)
            grads = ops.layer_norm_backward(dyd, xd, [D], m, mean, rstd, wd, [True, True, True])
            return [y, mean, rstd, *grads]
        y, rstd = ops.rms_norm(xd, [D], m, wd, 1e-5)
        grads = ops.rms_norm_backward(dyd, xd, [D], m, rstd, wd, [True, True])
        return [y, rstd, *grads]

    cpu, cuda = run("cpu"), run("cuda")
    grad_input = 3 if norm == "layer_norm" else 2
    rstd_max = float(cpu[grad_input - 1].double().abs().max())
    for k, (a, e) in enumerate(zip(cuda, cpu)):
        assert torch.isfinite(a).all(), f"output {k} has NaN/inf"
        if k == grad_input:
            # rounding of terms that cancel, scaled by rstd (1/sqrt(eps) for D=1)
            t = tol(dtype) * max(1.0, rstd_max)
            torch.testing.assert_close(a.cpu().double(), e.double(), rtol=tol(dtype), atol=t)
            continue
        # parameter gradients sum over rows: a looser bound for half types
        scale = 4 if (k > grad_input and dtype in (torch.bfloat16, torch.float16)) else 1
        assert_close(a, e, dtype if scale == 1 else torch.bfloat16, f"{norm} D={D} output {k}")


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_row_norm_scalar_path_for_misaligned_weight(norm):
    """A weight view at an odd offset cannot be loaded in 16-byte vectors: the
    single-element path must give the same result."""
    D = 512
    x = torch.randn(16, D, device="cuda")
    storage = torch.rand(D + 1, device="cuda") + 0.5
    w_view, w_aligned = storage[1:], storage[1:].clone()
    args = lambda w: (x, [D], None, w, None, 1e-5) if norm == "layer_norm" else (x, [D], None, w, 1e-5)
    fn = getattr(ops, norm)
    torch.testing.assert_close(fn(*args(w_view))[0], fn(*args(w_aligned))[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_row_norm_parameter_gradients_without_input_gradient(norm):
    D, rows = 1024, 300
    x = torch.randn(rows, D, device="cuda", dtype=torch.float64)
    mask = random_mask((rows,)).cuda()
    dy = torch.randn_like(x)
    w = torch.rand(D, device="cuda", dtype=torch.float64)
    if norm == "layer_norm":
        _, mean, rstd = ops.layer_norm(x, [D], mask, w, None, 1e-5)
        full = ops.layer_norm_backward(dy, x, [D], mask, mean, rstd, w, [True, True, True])
        only = ops.layer_norm_backward(dy, x, [D], mask, mean, rstd, w, [False, True, True])
    else:
        _, rstd = ops.rms_norm(x, [D], mask, w, 1e-5)
        full = ops.rms_norm_backward(dy, x, [D], mask, rstd, w, [True, True])
        only = ops.rms_norm_backward(dy, x, [D], mask, rstd, w, [False, True])
    assert only[0] is None
    for a, e in zip(only[1:], full[1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ------------------------------------------------------------------ batch norm

# (layout, shape, channels_last): NC (N, C), NCL (N, C, L), NLC (N, L, C)
BN_CASES = [
    ("NC", (67, 37), False), ("NC", (1000, 512), False), ("NC", (33, 8), False),
    ("NCL", (5, 37, 19), False), ("NCL", (8, 64, 256), False), ("NCL", (3, 3, 1), False), ("NCL", (4, 130, 1000), False),
    ("NLC", (5, 19, 37), True), ("NLC", (8, 256, 512), True), ("NLC", (3, 1, 8), True), ("NLC", (4, 100, 1000), True),
]


def bn_mask(layout, shape, generator):
    mask = random_mask((shape[0],) if layout == "NC" else (shape[0], shape[1] if layout == "NLC" else shape[2]),
                       generator=generator)
    mask.view(-1)[0] = False
    mask.view(-1)[1] = False
    mask.view(-1)[-1] = True
    return mask


def bn_full_mask(layout, mask, shape):
    if layout == "NC":
        return mask[:, None].expand(shape)
    if layout == "NLC":
        return mask[:, :, None].expand(shape)
    return mask[:, None, :].expand(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_cpu(case, dtype, training):
    layout, shape, cl = case
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[2] if cl else shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 5).to(dtype)
    mask = bn_mask(layout, shape, g)
    x = poisoned(x, bn_full_mask(layout, mask, shape))
    w = (torch.rand(C, generator=g) + 0.5).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    rm0, rv0 = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5

    def run(device):
        xd, m, wd, bd, dyd = (t.to(device) for t in (x, mask, w, b, dy))
        # clones: .to("cpu") of a CPU tensor is the tensor itself, updated in place
        rm, rv = rm0.clone().to(device), rv0.clone().to(device)
        nbt = torch.zeros((), dtype=torch.long, device=device)
        y, mean, invstd = ops.batch_norm(xd, m, wd, bd, rm, rv, nbt, training, 0.1, 1e-5, cl)
        grads = ops.batch_norm_backward(dyd, xd, m, wd, mean, invstd, training, cl, [True, True, True])
        return [y, mean, invstd, *grads, rm, rv, nbt]

    cpu, cuda = run("cpu"), run("cuda")
    names = ["output", "save_mean", "save_invstd", "grad_input", "grad_weight", "grad_bias", "running_mean",
             "running_var", "num_batches_tracked"]
    for name, a, e in zip(names, cuda, cpu):
        assert torch.isfinite(a.float()).all(), f"{name} has NaN/inf"
        half = dtype in (torch.bfloat16, torch.float16)
        if name in ("grad_weight", "grad_bias") or (half and name == "grad_input"):
            # sums over thousands of values, in another order: relative to their size
            scale = e.double().abs().max().clamp_min(1)
            t = 3e-2 if half else 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(a.cpu().double() / scale, e.double() / scale, rtol=t, atol=t)
        else:
            assert_close(a, e, dtype if name in ("output",) else torch.float32 if dtype != torch.float64 else dtype,
                         f"{layout} {name}")
    assert bool((cuda[0][bn_full_mask(layout, mask.cuda(), shape)] == 0).all()), "padded outputs must be 0"


@pytest.mark.parametrize("cl", [False, True])
def test_batch_norm_empty_and_all_padded_batches(cl):
    for shape in ((0, 4, 3), (3, 4, 5)):
        x = torch.randn(shape, device="cuda")
        L = shape[1] if cl else shape[2]
        C = shape[2] if cl else shape[1]
        mask = torch.ones(shape[0], L, dtype=torch.bool, device="cuda")
        rm, rv = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5
        rm0, rv0 = rm.clone(), rv.clone()
        y, mean, invstd = ops.batch_norm(x, mask, None, None, rm, rv, None, True, 0.1, 1e-5, cl)
        assert (y == 0).all() and torch.equal(rm, rm0) and torch.equal(rv, rv0)
        dx, dw, db = ops.batch_norm_backward(torch.randn_like(x), x, mask, None, mean, invstd, True, cl,
                                             [True, True, True])
        assert (dx == 0).all() and (dw == 0).all() and (db == 0).all()


def test_single_valid_value_on_cuda():
    """One valid value per channel: on CUDA no host sync by default, so no
    error; the output is the bias and the running statistics stay as they
    were. With device data checks on, the CPU's ValueError."""
    x = torch.randn(2, 3, 4, device="cuda")
    mask = torch.ones(2, 3, dtype=torch.bool, device="cuda")
    mask[1, 2] = False
    b = torch.randn(4, device="cuda")
    rm, rv = torch.randn(4, device="cuda"), torch.rand(4, device="cuda") + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = ops.batch_norm(x, mask, None, b, rm, rv, None, True, 0.1, 1e-5, True)[0]
    torch.testing.assert_close(y[1, 2], b)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    masknorm._C._enable_device_data_checks(True)
    try:
        with pytest.raises(ValueError, match="more than 1 valid"):
            ops.batch_norm(x, mask, None, b, rm, rv, None, True, 0.1, 1e-5, True)
    finally:
        masknorm._C._enable_device_data_checks(False)


def test_merge_stats_skips_empty_parts_with_garbage():
    C = 70
    parts = [torch.randn(n, C, dtype=torch.float64, device="cuda") * 3 + 100 for n in (5, 0, 9, 1, 0)]
    mean = torch.stack([p.mean(0) if len(p) else torch.full((C,), float("nan"), device="cuda", dtype=torch.float64)
                        for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.full((C,), float("inf"), device="cuda",
                     dtype=torch.float64) for p in parts])
    count = torch.tensor([len(p) for p in parts], device="cuda")
    rm, rv = torch.zeros(C, device="cuda", dtype=torch.float64), torch.ones(C, device="cuda", dtype=torch.float64)
    nbt = torch.zeros((), dtype=torch.long, device="cuda")
    mu, invstd, n = ops.batch_norm_merge_stats(mean, m2, count, rm, rv, nbt, None, 1e-5)
    allx = torch.cat(parts)
    torch.testing.assert_close(mu, allx.mean(0))
    torch.testing.assert_close(invstd, (allx.var(0, unbiased=False) + 1e-5).rsqrt())
    assert int(n) == len(allx) and int(nbt) == 1
    torch.testing.assert_close(rm, allx.mean(0))  # momentum None, first batch: factor 1
    torch.testing.assert_close(rv, allx.var(0, unbiased=True))


def test_stage_ops_compose_to_batch_norm():
    x = torch.randn(6, 40, 96, device="cuda")
    mask = random_mask((6, 40)).cuda()
    w, b = torch.rand(96, device="cuda"), torch.randn(96, device="cuda")
    mean, m2, count = ops.batch_norm_stats(x, mask, True)
    mu, invstd, n = ops.batch_norm_merge_stats(mean[None], m2[None], count[None], None, None, None, 0.1, 1e-5)
    y = ops.batch_norm_elemt(x, mask, w, b, mu, invstd, True)
    y_ref, save_mean, save_invstd = ops.batch_norm(x, mask, w, b, None, None, None, True, 0.1, 1e-5, True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(x)
    s1, s2 = ops.batch_norm_backward_reduce(dy, x, mask, mu, invstd, True)
    dx = ops.batch_norm_backward_elemt(dy, x, mask, w, mu, invstd, s1, s2, n, True)
    dx_ref, dw_ref, db_ref = ops.batch_norm_backward(dy, x, mask, w, save_mean, save_invstd, True, True,
                                                     [True, True, True])
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
    torch.testing.assert_close(s2, dw_ref, rtol=0, atol=0)
    torch.testing.assert_close(s1, db_ref, rtol=0, atol=0)


def test_results_are_deterministic():
    x = torch.randn(16, 512, 256, device="cuda", dtype=torch.bfloat16)
    mask = random_mask((16, 512)).cuda()
    dy = torch.randn_like(x)

    def once():
        y, mean, invstd = ops.batch_norm(x, mask, None, None, None, None, None, True, 0.1, 1e-5, True)
        grads = ops.batch_norm_backward(dy, x, mask, None, mean, invstd, True, True, [True, True, True])
        ln = ops.layer_norm(x, [256], mask, torch.ones(256, device="cuda"), None, 1e-5)
        lgrads = ops.layer_norm_backward(dy, x, [256], mask, ln[1], ln[2], torch.ones(256, device="cuda"),
                                         [True, True, True])
        return [y, mean, invstd, *grads, *ln, *lgrads]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


# ------------------------------------------------------- modules and switches


def test_generic_kernels_on_cuda_agree_with_fused():
    x = torch.randn(8, 100, 256, device="cuda")
    mask = random_mask((8, 100)).cuda()
    bn = masknorm.MaskedBatchNorm1d(256, channels_last=True).cuda()
    ln = masknorm.MaskedLayerNorm(256).cuda()

    def run():
        xi = x.clone().requires_grad_()
        y = ln(bn(xi, mask), mask)
        y.pow(2).sum().backward()
        return y, xi.grad

    fused = run()
    masknorm._C._use_fused_cuda_kernels(False)
    assert masknorm._C._kernels_for("cuda") == "generic"
    generic = run()
    for a, b in zip(fused, generic):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_on_cuda():
    m = nn.ModuleList([masknorm.MaskedBatchNorm1d(64, channels_last=True), masknorm.MaskedLayerNorm(64),
                       masknorm.MaskedRMSNorm(64)]).cuda()

    def f(x, mask):
        for norm in m:
            x = norm(x, mask)
        return x

    x = torch.randn(4, 30, 64, device="cuda")
    mask = random_mask((4, 30)).cuda()
    m.eval()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, mask), f(x, mask))


def test_cuda_graph_captures_a_training_step():
    """A whole training step (forward, backward, optimizer) captured and replayed:
    no host synchronization inside the ops while capturing."""
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "proj": nn.Linear(32, 32),
        "bn": masknorm.MaskedBatchNorm1d(32, channels_last=True),
        "ln": masknorm.MaskedLayerNorm(32),
    }).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static_x = torch.randn(4, 10, 32, device="cuda")
    static_mask = random_mask((4, 10)).cuda()
    static_mask[:, 0] = False

    def step():
        opt.zero_grad(set_to_none=False)
        h = model["bn"](model["proj"](static_x), static_mask)
        loss = model["ln"](h, static_mask).pow(2).sum()
        loss.backward()
        opt.step()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    eager = {k: v.clone() for k, v in model.state_dict().items()}
    # The same step eagerly on a copy, then the replay: identical updates.
    import copy
    twin = copy.deepcopy(model)
    twin.load_state_dict(eager)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin_opt.zero_grad()
    twin["ln"](twin["bn"](twin["proj"](static_x), static_mask), static_mask).pow(2).sum().backward()
    twin_opt.step()
    graph.replay()
    torch.cuda.synchronize()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, twin.state_dict()[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert torch.isfinite(static_loss)
