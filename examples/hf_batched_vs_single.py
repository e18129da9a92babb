"""Batched inference against one sequence at a time on Hugging Face speech
models, stock and converted with masknorm, in numbers.

Tiny models built from their configs with random weights (no download): a
wav2vec2 with a GroupNorm feature extractor, HuBERT with
``conv_pos_batch_norm=True`` and a Wav2Vec2-Conformer. Three waveforms of
1000, 730 and 411 samples are padded together and run as one batch with an
attention mask; the script prints, per model, the largest difference on the
valid frames between the batched output and each waveform run alone, for the
stock model and for the converted model inside ``masknorm.padding``.

    pip install --no-build-isolation ".[hf]" && python examples/hf_batched_vs_single.py
"""
import argparse

import torch

import masknorm

try:
    import transformers
except ImportError as error:
    raise SystemExit("this example needs transformers: pip install --no-build-isolation '.[hf]'") from error

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
    conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
    layerdrop=0.0, apply_spec_augment=False,
)


def models():
    yield "wav2vec2, GroupNorm feature extractor", transformers.Wav2Vec2Model(
        transformers.Wav2Vec2Config(feat_extract_norm="group", **TINY)
    )
    hubert = transformers.HubertModel(transformers.HubertConfig(conv_pos_batch_norm=True, **TINY))
    bn = hubert.encoder.pos_conv_embed.batch_norm
    with torch.no_grad():  # statistics as after training
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    yield "HuBERT, conv_pos_batch_norm=True", hubert
    yield "Wav2Vec2-Conformer", transformers.Wav2Vec2ConformerModel(
        transformers.Wav2Vec2ConformerConfig(conformer_conv_dropout=0.0, **TINY)
    )


def batched_minus_alone(model, x, attention_mask, context):
    lengths = attention_mask.sum(-1)
    with torch.no_grad():
        if context:
            with masknorm.padding(lengths=lengths):  # the recipe: lengths of the model's input
                out = model(x, attention_mask=attention_mask).last_hidden_state
        else:
            out = model(x, attention_mask=attention_mask).last_hidden_state
        worst = 0.0
        for i, n in enumerate(lengths.tolist()):
            alone = model(x[i : i + 1, :n]).last_hidden_state[0]
            worst = max(worst, (out[i, : alone.shape[0]] - alone).abs().max().item())
    return worst, out.abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 730, 411])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    lengths = torch.tensor(args.lengths)
    attention_mask = (torch.arange(int(lengths.max())) < lengths.unsqueeze(1)).long()
    x = torch.randn(len(args.lengths), int(lengths.max()), dtype=torch.float64) * attention_mask
    print(f"waveforms of {args.lengths} samples in one batch, float64, eval; largest |batched - alone| "
          f"on the valid frames (largest |output| in brackets)")
    print(f"{'model':40s} {'stock':>20s} {'masknorm':>20s}")
    for name, model in models():
        model = model.double().eval()
        stock, scale = batched_minus_alone(model, x, attention_mask, context=False)
        masknorm.convert_model(model)
        masked, _ = batched_minus_alone(model, x, attention_mask, context=True)
        print(f"{name:40s} {stock:12.3g} [{scale:4.2g}] {masked:20.3g}")


if __name__ == "__main__":
    main()
