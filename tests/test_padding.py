"""masknorm.padding: the context that hands a padding mask to the masked norms
of a converted model whose forward does not pass one on.

The reference is the contract of the issue: inside the context, the batched
output on valid frames equals each sequence run alone (eval), and training
statistics equal torch's on the packed valid frames. Hugging Face models are
in test_hf_models.py.
"""

import copy
import threading

import pytest
import torch
from torch import nn

import masknorm

padding_impl = masknorm.padding_context

LENGTHS = [40, 23, 9]


def conv_stack(dtype=torch.float64):
    """Strided, padded convolutions with BatchNorm1d and GroupNorm between them."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, stride=2, padding=2),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2),
        nn.GroupNorm(2, 8),
        nn.Conv1d(8, 8, 3, padding=1, groups=8),
    ).to(dtype)


def padded_input(lengths=LENGTHS, T=40, fill=float("nan")):
    """(N, 3, T) with padding filled with ``fill``: nothing of it may reach a valid frame."""
    torch.manual_seed(1)
    x = torch.randn(len(lengths), 3, T, dtype=torch.float64)
    for i, L in enumerate(lengths):
        x[i, :, L:] = fill
    return x


def test_eval_batched_equals_each_sequence_alone():
    model = masknorm.convert_model(conv_stack()).eval()
    for layer in (model[1],):  # running statistics that are not the identity
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    x = padded_input()
    with masknorm.padding(lengths=torch.tensor(LENGTHS)):
        batched = model(x)
    for i, L in enumerate(LENGTHS):
        alone = model(x[i : i + 1, :, :L])[0]
        torch.testing.assert_close(batched[i, :, : alone.shape[-1]], alone, rtol=0, atol=1e-12)
    assert not torch.isnan(batched).any()  # the NaN padding is zeroed before each padded convolution
    assert torch.isnan(model(x)[1]).all()  # without the context it reaches every output frame


def test_training_statistics_equal_torch_on_packed_valid_frames():
    model = masknorm.convert_model(conv_stack())
    ref = conv_stack()
    x = padded_input(fill=3.0)
    with masknorm.padding(lengths=torch.tensor(LENGTHS)):
        out = model(x)
    # torch: each sequence through the first conv alone, BatchNorm1d over the
    # packed frames, then per sequence again
    firsts = [ref[0](x[i : i + 1, :, :L]) for i, L in enumerate(LENGTHS)]
    packed = ref[1](torch.cat(firsts, dim=-1))
    starts = [0] + torch.tensor([f.shape[-1] for f in firsts]).cumsum(0).tolist()
    for i, first in enumerate(firsts):
        h = packed[:, :, starts[i] : starts[i + 1]]
        alone = ref[5](ref[4](ref[3](ref[2](h))))[0]
        torch.testing.assert_close(out[i, :, : alone.shape[-1]], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=0, atol=1e-14)
    # stock BatchNorm1d on the padded batch gets other statistics
    stock = conv_stack()
    stock(x)
    assert (stock[1].running_var - ref[1].running_var).abs().max() > 1e-2


def test_gradients_equal_each_sequence_alone_in_eval():
    model = masknorm.convert_model(conv_stack()).eval()
    x = padded_input(fill=0.0).requires_grad_()
    with masknorm.padding(lengths=torch.tensor(LENGTHS)):
        out = model(x)
    for i, L in enumerate(LENGTHS):  # a loss on the valid output frames of sequence i
        xi = x.detach()[i : i + 1, :, :L].requires_grad_()
        alone = model(xi)
        weight = torch.randn_like(alone)
        want, = torch.autograd.grad((alone * weight).sum(), xi)
        got, = torch.autograd.grad((out[i : i + 1, :, : alone.shape[-1]] * weight).sum(), x, retain_graph=True)
        torch.testing.assert_close(got[i, :, :L], want[0], rtol=0, atol=1e-12)
        assert torch.all(got[:, :, L:] == 0) and torch.all(got[torch.arange(3) != i] == 0)


def test_padding_mask_form_equals_lengths_form():
    model = masknorm.convert_model(conv_stack()).eval()
    x = padded_input(fill=0.0)
    lengths = torch.tensor(LENGTHS)
    with masknorm.padding(lengths=lengths):
        a = model(x)
    with masknorm.padding(padding_mask=masknorm.padding_mask_from_lengths(lengths, 40)):
        b = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_norm_rms_norm_and_channels_last_take_axis_1():
    torch.manual_seed(0)
    ln, rms = masknorm.MaskedLayerNorm(6), masknorm.MaskedRMSNorm(6)
    bn = masknorm.MaskedBatchNorm1d(6, channels_last=True)
    x = torch.randn(3, 10, 6)
    lengths = torch.tensor([10, 4, 7])
    mask = masknorm.padding_mask_from_lengths(lengths, 10)
    with masknorm.padding(lengths=lengths):
        got = [ln(x), rms(x), bn(x)]
    bn_ref = masknorm.MaskedBatchNorm1d(6, channels_last=True)
    want = [ln(x, mask), rms(x, mask), bn_ref(x, mask)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=0)
    # LayerNorm over (N, T, H, C): one mask row per (n, t), broadcast over H
    x4 = torch.randn(3, 10, 2, 6)
    with masknorm.padding(lengths=lengths):
        got = ln(x4)
    assert torch.all(got[1, 4:] == 0) and torch.all(got[1, :4] != 0)


@pytest.mark.parametrize("cls", [masknorm.MaskedBatchNorm2d, masknorm.MaskedInstanceNorm2d])
def test_spatial_norms_take_the_last_axis_as_time(cls):
    torch.manual_seed(0)
    norm = cls(4)
    x = torch.randn(3, 4, 5, 12)  # (N, C, F, T)
    lengths = torch.tensor([12, 3, 8])
    with masknorm.padding(lengths=lengths):
        got = norm(x)
    ref = cls(4)
    torch.testing.assert_close(got, ref(x, masknorm.padding_mask_from_lengths(lengths, 12)), rtol=0, atol=0)
    assert torch.all(got[1, ..., 3:] == 0)


def test_input_without_time_axis_runs_unmasked():
    bn, ln = masknorm.MaskedBatchNorm1d(4), masknorm.MaskedLayerNorm(4)
    x = torch.randn(3, 4)
    with masknorm.padding(lengths=torch.tensor([5, 2, 1])):
        torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ln(x), nn.functional.layer_norm(x, (4,)), rtol=1e-5, atol=1e-6)


def test_explicit_padding_mask_wins():
    ln = masknorm.MaskedLayerNorm(6)
    x = torch.randn(2, 5, 6)
    explicit = torch.tensor([[False] * 5, [False, False, True, True, True]])
    with masknorm.padding(lengths=torch.tensor([5, 4])):
        got = ln(x, explicit)
    torch.testing.assert_close(got, ln(x, explicit), rtol=0, atol=0)
    assert torch.all(got[1, 2:] == 0)


def test_outside_the_context_nothing_changes():
    model = conv_stack().eval()
    converted = masknorm.convert_model(copy.deepcopy(model))
    x = padded_input(fill=2.0)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)


def test_unmatched_time_axis_raises_naming_the_sizes():
    ln = masknorm.MaskedLayerNorm(6)
    model = masknorm.convert_model(nn.Sequential(nn.Conv1d(6, 6, 3, stride=2), nn.GroupNorm(1, 6)))
    with masknorm.padding(lengths=torch.tensor([20, 11])):
        model(torch.randn(2, 6, 20))  # time sizes 20 and 9 now known
        with pytest.raises(RuntimeError, match=r"MaskedLayerNorm got input of shape \[2, 7, 6\].*has 7 frames.*time sizes \[9, 20\]"):
            ln(torch.randn(2, 7, 6))
        with pytest.raises(RuntimeError, match=r"batch size 2"):
            ln(torch.randn(3, 20, 6))
    with masknorm.padding(lengths=torch.tensor([20, 11]), unmatched="unmasked"):
        model(torch.randn(2, 6, 20))
        x = torch.randn(2, 7, 6)
        torch.testing.assert_close(ln(x), ln(x, None), rtol=0, atol=0)


def test_two_length_computations_for_one_size_raise():
    narrow = nn.Conv1d(2, 2, 3)  # 20 -> 18 frames, lengths - 2
    strided = nn.Conv1d(2, 2, 5, stride=2, padding=10)  # 20 -> 18 frames, (lengths + 15) // 2 + 1
    masknorm.convert_model(nn.ModuleList([narrow, strided]))
    norm = masknorm.MaskedGroupNorm(1, 2)
    x = torch.randn(2, 2, 20)
    with masknorm.padding(lengths=torch.tensor([20, 5])):
        h = narrow(narrow(x)[:, :, :-2].new_zeros(2, 2, 20))  # the same computation twice: one size
        norm(h)
        strided(x)
        with pytest.raises(RuntimeError, match=r"has 18 frames \(two different length computations"):
            norm(h)


def test_left_padding_and_holes_are_refused():
    left = torch.tensor([[False] * 4, [True, True, False, False]])
    holes = torch.tensor([[False] * 4, [False, True, False, True]])
    for mask in (left, holes):
        with pytest.raises(ValueError, match=r"right padding only.*rows \[1\]"):
            with masknorm.padding(padding_mask=mask):
                pass


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(), "exactly one of lengths= and padding_mask="),
        (dict(lengths=torch.tensor([3]), padding_mask=torch.zeros(1, 3, dtype=torch.bool)), "exactly one"),
        (dict(lengths=torch.tensor([[3]])), r"shape \(N,\), but got shape \[1, 1\]"),
        (dict(lengths=torch.tensor([3.0])), "integer lengths"),
        (dict(lengths=torch.tensor([-1])), "lengths >= 0"),
        (dict(lengths=torch.tensor([5]), max_len=4), "max_len=4 is shorter than the longest length 5"),
        (dict(padding_mask=torch.zeros(2, 3)), "bool tensor of shape"),
        (dict(lengths=torch.tensor([3]), unmatched="ignore"), "unmatched='raise' or 'unmasked'"),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        with masknorm.padding(**kwargs):
            pass


def test_first_time_axis_shorter_than_lengths_raises():
    ln = masknorm.MaskedLayerNorm(6)
    with pytest.raises(ValueError, match="first time axis seen has 7 frames, fewer than the longest of lengths"):
        with masknorm.padding(lengths=torch.tensor([9, 2])):
            ln(torch.randn(2, 7, 6))


def test_other_padding_modes_raise():
    conv = masknorm.convert_model(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(RuntimeError, match="padding_mode='reflect'"):
        with masknorm.padding(lengths=torch.tensor([5, 3])):
            conv(torch.randn(2, 2, 5))
    conv(torch.randn(2, 2, 5))  # outside the context it is torch's


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(2, 3, 4, stride=3, padding=2, dilation=2),
        lambda: nn.Conv1d(2, 3, 5, padding="same", dilation=2),
        lambda: nn.ConvTranspose1d(2, 3, 4, stride=2, padding=1),
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=0, output_padding=1),
    ],
    ids=["strided-dilated", "same", "transposed", "transposed-output-padding"],
)
def test_convolution_lengths_match_each_sequence_alone(conv):
    torch.manual_seed(0)
    model = masknorm.convert_model(nn.Sequential(conv(), nn.InstanceNorm1d(3, affine=True))).double()
    lengths = [30, 17, 6]
    x = padded_input(lengths, T=30)[:, :2]
    with masknorm.padding(lengths=torch.tensor(lengths)):
        batched = model(x)
    for i, L in enumerate(lengths):
        alone = model(x[i : i + 1, :, :L])[0]
        torch.testing.assert_close(batched[i, :, : alone.shape[-1]], alone, rtol=0, atol=1e-12)


def test_zero_conv_inputs_off_lets_padding_through():
    model = masknorm.convert_model(conv_stack()).eval()
    x = padded_input(fill=100.0)
    with masknorm.padding(lengths=torch.tensor(LENGTHS), zero_conv_inputs=False):
        leaky = model(x)
    alone = model(x[2:3, :, : LENGTHS[2]])[0]
    assert (leaky[2, :, : alone.shape[-1]] - alone).abs().max() > 1.0


def test_convert_model_keeps_state_and_hooks_and_hooks_once():
    model = conv_stack()
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append("user"))
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    masknorm.convert_model(model)
    masknorm.convert_model(model)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert len(model[0]._forward_pre_hooks) == 2  # the user's and one of masknorm's
    model(padded_input(fill=0.0))
    assert calls == ["user"]
    plain = masknorm.convert_model(conv_stack(), convolutions=False)
    assert len(plain[0]._forward_pre_hooks) == 0


def test_contexts_nest_and_restore():
    ln = masknorm.MaskedLayerNorm(4)
    x = torch.randn(2, 6, 4)
    with masknorm.padding(lengths=torch.tensor([6, 2])):
        with masknorm.padding(lengths=torch.tensor([6, 5])):
            inner = ln(x)
        outer = ln(x)
    assert torch.all(inner[1, 5:] == 0) and torch.all(inner[1, :5] != 0)
    assert torch.all(outer[1, 2:] == 0) and torch.all(outer[1, :2] != 0)
    assert not padding_impl._any_active
    torch.testing.assert_close(ln(x), ln(x, None), rtol=0, atol=0)


def test_contexts_are_per_thread():
    ln = masknorm.MaskedLayerNorm(4)
    x = torch.randn(2, 6, 4)
    barrier = threading.Barrier(3)
    results = {}

    def run(name, lengths):
        def body():
            if lengths is None:
                barrier.wait()
                results[name] = ln(x)
                barrier.wait()
                return
            with masknorm.padding(lengths=torch.tensor(lengths)):
                barrier.wait()  # all threads are inside (or outside) together
                results[name] = ln(x)
                barrier.wait()
        return threading.Thread(target=body)

    threads = [run("a", [6, 1]), run("b", [6, 4]), run("none", None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mask = lambda n: masknorm.padding_mask_from_lengths(torch.tensor([6, n]), 6)  # noqa: E731
    torch.testing.assert_close(results["a"], ln(x, mask(1)), rtol=0, atol=0)
    torch.testing.assert_close(results["b"], ln(x, mask(4)), rtol=0, atol=0)
    torch.testing.assert_close(results["none"], ln(x), rtol=0, atol=0)


class TimeModel(nn.Module):
    """Strided and padded convolutions, norms of every kind, and a transpose."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        h = self.gn(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.ln(h.transpose(1, 2))


def test_compile_gives_eager_results_without_recompiling_per_batch():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = masknorm.convert_model(TimeModel())
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    for train in (False, True):
        model.train(train)
        eager.train(train)
        for _ in range(5):
            lengths = torch.randint(1, 41, (3,), generator=generator)
            lengths[0] = 40
            x = torch.randn(3, 3, 40, generator=generator).requires_grad_()
            with masknorm.padding(lengths=lengths):
                got = compiled(x)
                want = eager(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert torch.all(got[1, (lengths[1] + 1) // 2 :] == 0)
            if train:  # backward after the context has closed
                g, = torch.autograd.grad(got.square().sum(), x)
                w, = torch.autograd.grad(want.square().sum(), x)
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var, rtol=1e-5, atol=1e-6)
    # one graph per mode: new lengths never recompile
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]


def test_export_inside_the_context_masks_when_run_inside_one():
    torch.manual_seed(0)
    model = masknorm.convert_model(TimeModel()).eval()
    x = torch.randn(3, 3, 40)
    lengths = torch.tensor([40, 20, 7])
    outside = torch.export.export(model, (x,))
    assert not [n for n in outside.graph.nodes if "masknorm_padding" in str(n.target)]
    with masknorm.padding(lengths=lengths):
        program = torch.export.export(model, (x,))
        want = model(x)
        got = program.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [str(n.target) for n in program.graph.nodes if "masknorm_padding" in str(n.target)] == [
        "masknorm_padding.conv_mask.default", "masknorm_padding.mask.default",
        "masknorm_padding.conv_mask.default", "masknorm_padding.mask.default", "masknorm_padding.mask.default",
    ]
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)  # outside: unmasked
