"""The worked examples from the seed documents, through masknorm modules,
without a mask and with masks."""

import math

import pytest
import torch
import torch.nn as nn

import masknorm
from samples.common import lengths_mask

# The examples' values with the modules' eps = 1e-5 in them (the documents
# leave it out: 2e-5 off for unit outputs), compared at a few float32 ulps
# (measured worst 1.2e-7).
EPS = 1e-5
ATOL = 1e-6
# the unit output of a pair 1 apart (variance 0.25): 1 / sqrt(1 + 4 eps)
ONE = 1 / math.sqrt(1 + 4 * EPS)


def _close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual.detach(), torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


# ---------------------------------------------------------------------------
# D2L: X = [[1, 2], [2, 3]]: LayerNorm(2) -> [[-1, 1], [-1, 1]], BatchNorm -> [[-1, -1], [1, 1]]
# ---------------------------------------------------------------------------

X_D2L = torch.tensor([[1.0, 2.0], [2.0, 3.0]])


@pytest.mark.parametrize("mask", [None, "all_false"])
def test_d2l_layer_norm(mask):
    ln = masknorm.MaskedLayerNorm(2)
    m = None if mask is None else torch.zeros(2, dtype=torch.bool)
    y = ln(X_D2L) if m is None else ln(X_D2L, padding_mask=m)
    _close(y, [[-ONE, ONE], [-ONE, ONE]])


@pytest.mark.parametrize("mask", [None, "all_false"])
def test_d2l_batch_norm(mask):
    bn = masknorm.MaskedBatchNorm1d(2)
    m = None if mask is None else torch.zeros(2, dtype=torch.bool)
    y = bn(X_D2L) if m is None else bn(X_D2L, padding_mask=m)
    _close(y, [[-ONE, -ONE], [ONE, ONE]])
    # running stats: 0.9 * 0 + 0.1 * mean, 0.9 * 1 + 0.1 * unbiased var (0.5)
    _close(bn.running_mean, [0.15, 0.25])
    _close(bn.running_var, [0.95, 0.95])


def test_d2l_layer_norm_padded_row():
    """A padded third row (garbage) does not change the two real rows."""
    x = torch.tensor([[1.0, 2.0], [2.0, 3.0], [float("nan"), 100.0]])
    y = masknorm.MaskedLayerNorm(2)(x, padding_mask=torch.tensor([False, False, True]))
    _close(y, [[-ONE, ONE], [-ONE, ONE], [0.0, 0.0]])


def test_d2l_batch_norm_padded_rows():
    """Padding zeros would skew plain BatchNorm; the masked one ignores them."""
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [2.0, 3.0], [0.0, 0.0]])
    mask = torch.tensor([False, True, False, True])
    y = masknorm.MaskedBatchNorm1d(2)(x, padding_mask=mask)
    _close(y, [[-ONE, -ONE], [0.0, 0.0], [ONE, ONE], [0.0, 0.0]])
    plain = nn.BatchNorm1d(2)(x)
    assert not torch.allclose(plain[0], y[0], atol=1e-2)  # the padding problem


# ---------------------------------------------------------------------------
# batch activations [2, 4, 6, 8] -> about [-1.34, -0.45, 0.45, 1.34]
# ---------------------------------------------------------------------------

EXPECTED_2468 = [k / math.sqrt(5 + EPS) for k in (-3, -1, 1, 3)]


def test_bn_2468_batch_of_4():
    x = torch.tensor([[2.0], [4.0], [6.0], [8.0]])
    bn = masknorm.MaskedBatchNorm1d(1)
    y = bn(x)
    _close(y[:, 0], EXPECTED_2468)
    _close(y[:, 0], [-1.34, -0.45, 0.45, 1.34], atol=5e-3)
    assert abs(float(y.detach().mean())) < 1e-6
    # running stats: mean 5, unbiased variance 20/3
    _close(bn.running_mean, [0.5])
    _close(bn.running_var, [0.9 + 0.1 * 20 / 3])


def test_bn_2468_with_padding():
    """The same 4 activations inside a padded batch of 6 (zeros as padding)."""
    x = torch.tensor([[0.0], [2.0], [4.0], [0.0], [6.0], [8.0]])
    mask = torch.tensor([True, False, False, True, False, False])
    bn = masknorm.MaskedBatchNorm1d(1)
    y = bn(x, padding_mask=mask)
    _close(y[~mask, 0], EXPECTED_2468)
    assert torch.equal(y[mask], torch.zeros(2, 1))
    _close(bn.running_mean, [0.5])
    _close(bn.running_var, [0.9 + 0.1 * 20 / 3])


def test_bn_2468_as_sequence():
    """[2, 4, 6, 8] as one sequence of one channel, padded to length 6, both layouts."""
    mask = lengths_mask([4], 6)
    vals = torch.tensor([2.0, 4.0, 6.0, 8.0, -50.0, 77.0])
    y_cf = masknorm.MaskedBatchNorm1d(1)(vals.view(1, 1, 6), padding_mask=mask)
    y_cl = masknorm.MaskedBatchNorm1d(1, channels_last=True)(vals.view(1, 6, 1), padding_mask=mask)
    _close(y_cf[0, 0, :4], EXPECTED_2468)
    _close(y_cl[0, :4, 0], EXPECTED_2468)
    assert torch.equal(y_cf[0, 0, 4:], torch.zeros(2))
    assert torch.equal(y_cl[0, 4:, 0], torch.zeros(2))


# ---------------------------------------------------------------------------
# batch=4, seq=3, dim=2: batch b is [[1+b, 2+b], [3+b, 4+b], [5+b, 6+b]]
# ---------------------------------------------------------------------------


def comparison_tensor():
    return torch.stack([torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]) + b for b in range(4)])


def _bn_expected(x, mask=None):
    """Per-feature normalisation over all valid (batch, seq) positions, by hand."""
    valid = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else ~mask
    out = torch.zeros_like(x)
    for c in range(x.shape[2]):
        vals = [float(x[b, s, c]) for b in range(x.shape[0]) for s in range(x.shape[1]) if valid[b, s]]
        mu = sum(vals) / len(vals)
        var = sum((v - mu) ** 2 for v in vals) / len(vals)
        for b in range(x.shape[0]):
            for s in range(x.shape[1]):
                if valid[b, s]:
                    out[b, s, c] = (float(x[b, s, c]) - mu) / math.sqrt(var + EPS)
    return out


def test_comparison_tensor_values():
    x = comparison_tensor()
    assert x.shape == (4, 3, 2)
    assert torch.equal(x[0], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert torch.equal(x[3], torch.tensor([[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]))


@pytest.mark.parametrize("masked", [False, True])
def test_comparison_layer_norm(masked):
    x = comparison_tensor()
    ln = masknorm.MaskedLayerNorm(2)
    if masked:
        mask = lengths_mask([3, 2, 1, 3], 3)
        y = ln(x, padding_mask=mask)
        expected = torch.tensor([-ONE, ONE]).expand(4, 3, 2).clone()
        expected[mask] = 0
    else:
        y = ln(x)
        expected = torch.tensor([-ONE, ONE]).expand(4, 3, 2)
    _close(y, expected)


@pytest.mark.parametrize("masked", [False, True])
def test_comparison_rms_norm(masked):
    x = comparison_tensor()
    rms = masknorm.MaskedRMSNorm(2)
    rms_rows = x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    if masked:
        mask = lengths_mask([3, 2, 1, 3], 3)
        y = rms(x, padding_mask=mask)
        rms_rows[mask] = 0
    else:
        y = rms(x)
    _close(y, rms_rows)


@pytest.mark.parametrize("masked", [False, True])
def test_comparison_batch_norm_channels_last(masked):
    x = comparison_tensor()  # (N=4, L=3, C=2)
    mask = lengths_mask([3, 2, 1, 3], 3) if masked else None
    bn = masknorm.MaskedBatchNorm1d(2, channels_last=True)
    y = bn(x) if mask is None else bn(x, padding_mask=mask)
    _close(y, _bn_expected(x, mask))
    if not masked:
        # channel 0 holds 1 + b + 2 s: mean 4.5 over the 12 positions
        _close(bn.running_mean, [0.45, 0.55])


@pytest.mark.parametrize("masked", [False, True])
def test_comparison_batch_norm_channels_first(masked):
    x = comparison_tensor()
    mask = lengths_mask([3, 2, 1, 3], 3) if masked else None
    bn = masknorm.MaskedBatchNorm1d(2)
    xt = x.transpose(1, 2)  # (N, C, L), a non-contiguous view
    y = bn(xt) if mask is None else bn(xt, padding_mask=mask)
    _close(y.transpose(1, 2), _bn_expected(x, mask))


def test_comparison_padding_changes_plain_bn_but_not_masked_bn():
    """Zero padding skews plain BatchNorm statistics; the masked module equals the
    statistics of the unpadded tokens."""
    x = comparison_tensor()
    lengths = [3, 2, 1, 3]
    mask = lengths_mask(lengths, 3)
    x_padded = x.masked_fill(mask[..., None], 0.0)
    y_plain = nn.BatchNorm1d(2)(x_padded.transpose(1, 2)).transpose(1, 2)
    y_masked = masknorm.MaskedBatchNorm1d(2, channels_last=True)(x_padded, padding_mask=mask)
    expected = _bn_expected(x, mask)
    _close(y_masked, expected)
    assert not torch.allclose(y_plain[~mask], expected[~mask], atol=1e-2)
