"""masknorm.padding on Hugging Face speech models, with no edit to their code.

Tiny configs with random weights (no downloads), float64. Raw lengths
1000/730/411 padded together: in eval, the batched output with an attention
mask equals each sequence run alone on the valid frames once the model is
converted and called inside the context; stock models differ by order 1
(the thresholds below are well under the measured differences, so the test
measures something). In train mode, the Conformer's outputs and running
statistics do not depend on how much padding the batch holds.
"""

import copy

import pytest
import torch

import masknorm

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")

pytestmark = pytest.mark.slow  # whole models; test_padding.py covers the padding context in the quick loop

LENGTHS = [1000, 730, 411]

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
    conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
    final_dropout=0.0, layerdrop=0.0, apply_spec_augment=False, mask_time_prob=0.0,
)


def wav2vec2_group_norm():
    return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(feat_extract_norm="group", **TINY))


def hubert_conv_pos_batch_norm():
    model = transformers.HubertModel(
        transformers.HubertConfig(feat_extract_norm="layer", conv_pos_batch_norm=True, **TINY)
    )
    # statistics as after training, so BatchNorm moves the zeroed padded frames
    bn = model.encoder.pos_conv_embed.batch_norm
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return model


def wav2vec2_conformer():
    return transformers.Wav2Vec2ConformerModel(
        transformers.Wav2Vec2ConformerConfig(feat_extract_norm="layer", conv_depthwise_kernel_size=7, conformer_conv_dropout=0.0, **TINY)
    )


def batch(lengths=LENGTHS, T=None):
    """Waveforms (N, T) zero-padded, and Hugging Face's attention mask."""
    generator = torch.Generator().manual_seed(0)
    T = T or max(lengths)
    attention_mask = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).long()
    x = torch.randn(len(lengths), max(lengths), dtype=torch.float64, generator=generator)
    x = torch.nn.functional.pad(x, (0, T - max(lengths))) * attention_mask
    return x, attention_mask


def batched_minus_alone(model, context):
    """Largest difference on valid frames between the batched output and
    each sequence run alone."""
    x, attention_mask = batch()
    with torch.no_grad():
        if context:
            with masknorm.padding(lengths=attention_mask.sum(-1)):
                out = model(x, attention_mask=attention_mask).last_hidden_state
        else:
            out = model(x, attention_mask=attention_mask).last_hidden_state
        worst = 0.0
        for i, L in enumerate(LENGTHS):
            alone = model(x[i : i + 1, :L]).last_hidden_state[0]
            worst = max(worst, (out[i, : alone.shape[0]] - alone).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "build, stock_at_least",
    [(wav2vec2_group_norm, 0.3), (hubert_conv_pos_batch_norm, 1.0), (wav2vec2_conformer, 0.5)],
    ids=["wav2vec2-group-norm", "hubert-conv-pos-batch-norm", "wav2vec2-conformer"],
)
def test_batched_equals_each_sequence_alone(build, stock_at_least):
    torch.manual_seed(0)
    model = build().double().eval()
    assert batched_minus_alone(model, context=False) > stock_at_least
    masknorm.convert_model(model)
    assert batched_minus_alone(model, context=True) < 1e-12


def conformer_train_step(model, extra):
    """Outputs on valid frames and BatchNorm running statistics after one
    train-mode forward of the same batch padded by ``extra`` samples more."""
    x, attention_mask = batch(T=max(LENGTHS) + extra)
    with masknorm.padding(lengths=attention_mask.sum(-1)):
        out = model(x, attention_mask=attention_mask).last_hidden_state
    frames = model._get_feat_extract_output_lengths(torch.tensor(LENGTHS))
    valid = [out[i, :n] for i, n in enumerate(frames.tolist())]
    stats = [t for name, t in model.named_buffers() if "running_" in name]
    return valid, stats


def test_conformer_training_does_not_depend_on_the_amount_of_padding():
    torch.manual_seed(0)
    base = wav2vec2_conformer().double().train()
    results = {}
    for name, convert in (("stock", False), ("masked", True)):
        for extra in (0, 400):
            model = copy.deepcopy(base)
            if convert:
                masknorm.convert_model(model)
            results[name, extra] = conformer_train_step(model, extra)

    def largest_difference(name):
        (out_a, stats_a), (out_b, stats_b) = results[name, 0], results[name, 400]
        outs = max((a - b).abs().max().item() for a, b in zip(out_a, out_b))
        stats = max((a - b).abs().max().item() for a, b in zip(stats_a, stats_b))
        print(f"{name}: outputs differ by {outs:.3g}, running statistics by {stats:.3g}")
        return outs, stats

    stock_outputs, stock_stats = largest_difference("stock")
    assert stock_outputs > 0.1 and stock_stats > 1e-3
    masked_outputs, masked_stats = largest_difference("masked")
    assert masked_outputs < 1e-10 and masked_stats < 1e-12
