"""Kernel edge cases where the CPU and CUDA kernels must match the generic
(ATen-op) reference exactly or to rounding: eval-mode batch-norm input
gradients never read the input, a channel with one valid value gets an
input gradient of exactly 0, padded rows of the row-norm backward are exact
zeros whatever the weight holds, the backward stages divide by
max(count, 1), the row-norm backward uses the saved mean, NCL batch norm
with L = 1 and weight views at any offset; and the extension's std::
symbols resolve to libstdc++ (not to the copies torch's libraries export).
Every test runs on the CPU (and CUDA when present); those marked `kernels`
run with the native and the generic kernels."""

import os
import re
import subprocess
import sys

import pytest
import torch

import masknorm
from helpers import BN_LAYOUTS, assert_close, bn_input_shape, bn_mask_shape, is_channels_last

ops = torch.ops.masknorm
N, C, L = 3, 37, 5


def _bn_case(layout, device, dtype, N=N, C=C, L=L):
    x = torch.randn(bn_input_shape(layout, N, C, L), device=device, dtype=dtype)
    mask = torch.zeros(bn_mask_shape(layout, N, L), dtype=torch.bool, device=device)
    mask.view(-1)[1::3] = True
    return x, mask


def _per_channel(t, layout, x):
    """A (C,) tensor shaped to broadcast over the layout's input."""
    if is_channels_last(layout) or x.dim() == 2:
        return t
    return t.view(-1, 1)


def _valid(mask, layout, x):
    """The mask's valid positions, broadcast over the layout's input."""
    v = ~mask
    if layout == "NC":
        return v.view(-1, 1).expand_as(x)
    if layout == "NCL":
        return v.unsqueeze(1).expand_as(x)
    return v.unsqueeze(-1).expand_as(x)


# ------------------------------------------------ eval-mode input gradient


@pytest.mark.kernels
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("bad", ["inf_input", "nan_input", "inf_mean"])
def test_bn_eval_input_gradient_does_not_read_input(layout, bad, device):
    """With given statistics dx = dy * w * invstd: an inf/NaN in x or in the
    running mean changes nothing (torch's eval-mode gradient)."""
    x, mask = _bn_case(layout, device, torch.float32)
    valid = _valid(mask, layout, x)
    mean = torch.randn(C, device=device)
    invstd = torch.rand(C, device=device) + 0.5
    w = torch.randn(C, device=device)
    if bad == "inf_input":
        x[valid.nonzero()[0].unbind()] = float("inf")
    elif bad == "nan_input":
        x[valid.nonzero()[-1].unbind()] = float("nan")
    else:
        mean[3] = float("inf")
    dy = torch.randn_like(x)
    expected = torch.where(valid, dy * _per_channel(w * invstd, layout, x), 0)
    cl = is_channels_last(layout)
    dx, _, _ = ops.batch_norm_backward(dy, x, mask, w, mean, invstd, False, cl, [True, False, False])
    assert torch.isfinite(dx).all()
    assert_close(dx, expected, torch.float32)
    dx = ops.batch_norm_backward_elemt(dy, x, mask, w, mean, invstd, None, None, None, cl)
    assert torch.isfinite(dx).all()
    assert_close(dx, expected, torch.float32)


# ------------------------------------------------ one valid value: exact 0


@pytest.mark.kernels
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_one_valid_value_has_input_gradient_exactly_zero(layout, dtype, device):
    """A batch with one valid position: the output is the bias whatever x is,
    so the input gradient is exactly 0 (not a product's rounding error)."""
    C_ = 67
    x, _ = _bn_case(layout, device, dtype, N=2, C=C_, L=4)
    mask = torch.ones(bn_mask_shape(layout, 2, 4), dtype=torch.bool, device=device)
    mask.view(-1)[5 if layout != "NC" else 1] = False
    cl = is_channels_last(layout)
    w = torch.randn(C_, device=device, dtype=dtype) * 3
    dy = torch.randn_like(x) * 7
    mean, m2, count = ops.batch_norm_stats(x, mask, cl)
    assert count.item() == 1  # (merge_stats refuses it: training needs 2)
    invstd = (m2 + 1e-5).rsqrt()
    sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(dy, x, mask, mean, invstd, cl)
    dx = ops.batch_norm_backward_elemt(dy, x, mask, w, mean, invstd, sum_dy, sum_dy_xhat, count, cl)
    assert torch.count_nonzero(dx) == 0
    dx, _, _ = ops.batch_norm_backward(dy, x, mask, w, mean, invstd, True, cl, [True, False, False])
    assert torch.count_nonzero(dx) == 0


# ------------------------------------------- row-norm backward, padded rows


@pytest.mark.kernels
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("width", [5, 64, 4096])
def test_row_norm_backward_padded_rows_are_positive_zero(centered, width, device):
    """Padded rows get +0.0 gradients even where the weight holds inf/NaN or
    is negative (0 * w would give NaN or -0.0)."""
    x = torch.randn(6, width, device=device)
    mask = torch.tensor([False, True, False, True, True, False], device=device)
    w = -torch.rand(width, device=device) - 0.5
    w[1] = float("inf")
    w[-1] = float("nan")
    dy = torch.randn_like(x)
    if centered:
        _, mean, rstd = ops.layer_norm(x, [width], mask, w, None, 1e-5)
        dx, _, _ = ops.layer_norm_backward(dy, x, [width], mask, mean, rstd, w, [True, False, False])
    else:
        _, rstd = ops.rms_norm(x, [width], mask, w, 1e-5)
        dx, _ = ops.rms_norm_backward(dy, x, [width], mask, rstd, w, [True, False])
    padded = dx[mask]
    assert torch.equal(padded, torch.zeros_like(padded))
    assert not torch.signbit(padded).any()


# ------------------------------------- agreement with the generic reference


@pytest.mark.kernels
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_bn_backward_elemt_with_count_zero_divides_by_one(layout, device):
    """Sums given with count 0 (no valid position counted): every backend
    takes n = max(count, 1), as the generic reference does."""
    x, _ = _bn_case(layout, device, torch.float64)
    cl = is_channels_last(layout)
    mean = torch.randn(C, device=device, dtype=torch.float64)
    invstd = torch.rand(C, device=device, dtype=torch.float64) + 0.5
    w = torch.randn(C, device=device, dtype=torch.float64)
    sum_dy = torch.randn(C, device=device, dtype=torch.float64)
    sum_dy_xhat = torch.randn(C, device=device, dtype=torch.float64)
    dy = torch.randn_like(x)
    count = torch.zeros((), dtype=torch.long, device=device)
    dx = ops.batch_norm_backward_elemt(dy, x, None, w, mean, invstd, sum_dy, sum_dy_xhat, count, cl)
    pc = lambda t: _per_channel(t, layout, x)  # noqa: E731
    xhat = (x - pc(mean)) * pc(invstd)
    expected = pc(w * invstd) * (dy - pc(sum_dy) - xhat * pc(sum_dy_xhat))
    assert_close(dx, expected, torch.float64)


@pytest.mark.kernels
@pytest.mark.parametrize("rows_masked", [False, True])
def test_layer_norm_backward_uses_the_saved_mean(rows_masked, device):
    """The saved mean is what xhat is formed with, also when it differs from
    the input's (the kernels read it; the reference must not recompute it)."""
    D = 19
    x = torch.randn(4, 6, D, device=device, dtype=torch.float64)
    mask = torch.rand(4, 6, device=device) < 0.3 if rows_masked else None
    w = torch.randn(D, device=device, dtype=torch.float64)
    _, mean, rstd = ops.layer_norm(x, [D], mask, w, None, 1e-5)
    mean = mean + torch.randn_like(mean)  # not the input's mean any more
    if mask is not None:
        mean = torch.where(mask, 0, mean)
    dy = torch.randn_like(x)
    dx, dw, db = ops.layer_norm_backward(dy, x, [D], mask, mean, rstd, w, [True, True, True])
    valid = torch.ones(4, 6, dtype=torch.bool, device=device) if mask is None else ~mask
    xhat = (x - mean.view(4, 6, 1)) * rstd.view(4, 6, 1)
    g = dy * w
    expected = rstd.view(4, 6, 1) * (
        g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    expected = torch.where(valid.unsqueeze(-1), expected, 0)
    assert_close(dx, expected, torch.float64)
    v = valid.unsqueeze(-1)
    assert_close(dw, torch.where(v, dy * xhat, 0).sum((0, 1)), torch.float64)
    assert_close(db, torch.where(v, dy, 0).sum((0, 1)), torch.float64)


# ------------------------------------------- layouts and views the kernels take


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_ncl_with_length_one_matches_nc(dtype, device):
    """(N, C, 1) input with an (N, 1) mask is the (N, C) case."""
    x = torch.randn(40, C, 1, device=device, dtype=dtype)
    mask = torch.rand(40, 1, device=device) < 0.3
    w = torch.randn(C, device=device)
    b = torch.randn(C, device=device)
    out3, mean3, invstd3 = ops.batch_norm(x, mask, w, b, None, None, None, True, 0.1, 1e-5, False)
    out2, mean2, invstd2 = ops.batch_norm(x[..., 0], mask[:, 0], w, b, None, None, None, True, 0.1, 1e-5, False)
    assert_close(out3[..., 0], out2, dtype)
    assert_close(mean3, mean2, torch.float32)
    assert_close(invstd3, invstd2, torch.float32)
    dy = torch.randn_like(x)
    g3 = ops.batch_norm_backward(dy, x, mask, w, mean3, invstd3, True, False, [True, True, True])
    g2 = ops.batch_norm_backward(dy[..., 0], x[..., 0], mask[:, 0], w, mean2, invstd2, True, False, [True, True, True])
    assert_close(g3[0][..., 0], g2[0], dtype)
    assert_close(g3[1], g2[1], torch.float32)
    assert_close(g3[2], g2[2], torch.float32)


@pytest.mark.kernels
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("width", [64, 4096])
def test_row_norm_weight_view_at_any_offset(offset, width, device):
    """Weights that are views into a flat parameter (at an offset of any
    number of elements) give the results of a standalone copy."""
    flat = torch.randn(offset + 2 * width, device=device)
    w, b = flat[offset:offset + width], flat[offset + width:offset + 2 * width]
    x = torch.randn(8, width, device=device, dtype=torch.bfloat16)
    mask = torch.tensor([False, True] * 4, device=device)
    y, mean, rstd = ops.layer_norm(x, [width], mask, w, b, 1e-5)
    y_ref, mean_ref, rstd_ref = ops.layer_norm(x, [width], mask, w.clone(), b.clone(), 1e-5)
    assert torch.equal(y, y_ref) and torch.equal(mean, mean_ref) and torch.equal(rstd, rstd_ref)
    dy = torch.randn_like(x)
    grads = ops.layer_norm_backward(dy, x, [width], mask, mean, rstd, w, [True, True, True])
    grads_ref = ops.layer_norm_backward(dy, x, [width], mask, mean, rstd, w.clone(), [True, True, True])
    for got, want in zip(grads, grads_ref):
        assert torch.equal(got, want)


# ------------------------------------------------------ libstdc++ binding

# Mangled std:: names: std::__cxx11::..., std::ostream (So), std::istream
# (Si), std::string (Ss), other std:: names (members with any cv- and
# ref-qualifiers), their vtables and typeinfo.
_STD_SYMBOL = re.compile(r"^_ZN[rVKRO]*(St|So|Si|Ss|Sa|Sd|Sb)|^_Z(St|So|Si|Ss)|^_Z(TV|TI|TS)N?(St|So|Si|Ss)")
_ERROR_SCRIPT = """
import torch, masknorm
try:
    torch.ops.masknorm.layer_norm(torch.randn(2, 3), [4], None, None, None, 1e-5)
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""


def _masknorm_libraries():
    folder = os.path.dirname(masknorm.__file__)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith("_C") and f.endswith(".so")]


def _undefined_std_symbols(library):
    out = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True, check=True)
    names = {line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()}
    return {n for n in names if _STD_SYMBOL.match(n)}


@pytest.mark.slow  # a child process binding every symbol
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_DEBUG and nm: Linux (glibc) only")
def test_std_symbols_bind_to_libstdcxx(tmp_path):
    """Every std:: symbol the extension's libraries import binds to libstdc++,
    none to the weak copies libc10/libtorch export (an std::ostringstream
    built by one library's code and used by another's crashed in number
    formatting). All symbols are bound at load (LD_BIND_NOW), on a run that
    raises an error printing a shape."""
    libraries = _masknorm_libraries()
    wanted = {lib: _undefined_std_symbols(lib) for lib in libraries}
    assert wanted[next(lib for lib in libraries if "_cpu_" not in lib)], "no std:: imports found: check the pattern"
    log = tmp_path / "bindings"
    env = dict(os.environ, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(log), LD_BIND_NOW="1")
    run = subprocess.run([sys.executable, "-c", _ERROR_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "shape [2, 3]" in run.stdout
    binding = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \w+ symbol `([^']+)'")
    bound = {}
    for path in tmp_path.iterdir():
        for line in path.read_text(errors="replace").splitlines():
            m = binding.search(line)
            if m and m.group(1) in wanted:
                bound[(m.group(1), m.group(3))] = m.group(2)
    wrong = []
    for lib, symbols in wanted.items():
        if not any(key[0] == lib for key in bound):
            continue  # not loaded on this CPU (an instruction-set build it cannot run)
        for sym in sorted(symbols):
            target = bound.get((lib, sym))
            assert target is not None, f"{sym} of {lib} was not bound"
            if not os.path.basename(target).startswith("libstdc++"):
                wrong.append(f"{os.path.basename(lib)}: {sym} -> {target}")
    assert not wrong, "std:: symbols bound outside libstdc++:\n" + "\n".join(wrong)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_bn_ncl_long_rows(dtype, device):
    """NCL rows longer than the CPU's segment (16384 positions), few of them:
    statistics and backward sums of the valid positions, the same for any
    number of threads."""
    x = torch.randn(2, 3, 40000, device=device, dtype=dtype) * 2 + 5
    mask = torch.rand(2, 40000, device=device) < 0.4
    mask[1, 20000:] = True
    dy = torch.randn_like(x)
    valid = ~mask.unsqueeze(1).expand_as(x)
    xd, dyd = x.double(), dy.double()
    n = valid[:, 0].sum()
    mean = torch.where(valid, xd, 0).sum((0, 2)) / n
    m2 = torch.where(valid, (xd - mean.view(1, -1, 1)) ** 2, 0).sum((0, 2))
    threads = torch.get_num_threads()
    results = []
    for t in sorted({1, max(threads, 2)}):
        torch.set_num_threads(t)
        try:
            got_mean, got_m2, count = ops.batch_norm_stats(x, mask, False)
            invstd = torch.ones_like(got_mean)
            sums = ops.batch_norm_backward_reduce(dy, x, mask, got_mean, invstd, False)
        finally:
            torch.set_num_threads(threads)
        results.append((got_mean, got_m2, *sums))
    assert count.item() == n.item()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(results[0][0].double(), mean, **tol)
    torch.testing.assert_close(results[0][1].double(), m2, rtol=tol["rtol"], atol=tol["atol"] * n.item())
    sum_dy = torch.where(valid, dyd, 0).sum((0, 2))
    sum_dy_xmu = torch.where(valid, dyd * (xd - results[0][0].double().view(1, -1, 1)), 0).sum((0, 2))
    torch.testing.assert_close(results[0][2].double(), sum_dy, rtol=tol["rtol"], atol=tol["atol"] * 100)
    torch.testing.assert_close(results[0][3].double(), sum_dy_xmu, rtol=tol["rtol"], atol=tol["atol"] * 100)
    if torch.device(device).type == "cpu":
        for a, b in zip(results[0], results[-1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["NC", "NCL"])
def test_bn_count_above_float_precision(layout, device):
    """2^25 + 3 positions (beyond float's 2^24 exact integers): the count is
    exact and the statistics of constant data are exact."""
    n = 2**25 + 3
    x = torch.full((n, 1) if layout == "NC" else (1, 1, n), 1.5, device=device)
    mean, m2, count = ops.batch_norm_stats(x, None, False)
    assert count.item() == n
    assert mean.item() == 1.5 and m2.item() == 0
