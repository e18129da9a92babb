"""Data-parallel training with padding-aware synchronized BatchNorm, on CPU (gloo).

    torchrun --nproc_per_node=2 examples/distributed_batch_norm.py

(``python examples/distributed_batch_norm.py`` runs it in one process.)

A convolutional front end with nn.BatchNorm1d, as in speech encoders, on
variable-length sequences: ``masknorm.convert_model(model, sync_batch_norm=True)``
turns its BatchNorm1d layers into MaskedSyncBatchNorm, whose batch statistics
cover the valid frames of every rank's batch, and DistributedDataParallel
averages the gradients. Each rank draws batches of its own size and length,
and one step gives rank 1 an all-padding batch: it still takes part.

At the end rank 0 checks the promise: the first norm's output, on every rank,
equals MaskedBatchNorm1d applied to the concatenation of all ranks' batches.
"""
import os

import torch
import torch.distributed as dist
from torch import nn

import masknorm

FEATURES, CHANNELS, CLASSES = 16, 32, 4


class FrontEnd(nn.Module):
    """Conv1d -> BatchNorm1d -> ReLU, twice, then a mean over the valid frames and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(FEATURES, CHANNELS, 5, padding=2)
        self.norm1 = nn.BatchNorm1d(CHANNELS)
        self.conv2 = nn.Conv1d(CHANNELS, CHANNELS, 5, padding=2)
        self.norm2 = nn.BatchNorm1d(CHANNELS)
        self.head = nn.Linear(CHANNELS, CLASSES)

    def forward(self, x, padding_mask):  # x (N, FEATURES, L), padding_mask (N, L), True = padding
        h = torch.relu(self.norm1(self.conv1(x), padding_mask=padding_mask))  # 0 at padding
        h = torch.relu(self.norm2(self.conv2(h), padding_mask=padding_mask))
        valid = (~padding_mask).sum(1, keepdim=True).clamp(min=1)
        return self.head(h.sum(2) / valid)


def batch(step, rank, all_padding=False):
    """A rank's own batch: its own size and maximum length, random lengths."""
    g = torch.Generator().manual_seed(100 * step + rank)
    n, max_len = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(20, 80, (1,), generator=g))
    lengths = torch.randint(5, max_len + 1, (n,), generator=g)
    padding_mask = masknorm.padding_mask_from_lengths(lengths, max_len)
    if all_padding:
        padding_mask[:] = True
    x = (torch.randn(n, FEATURES, max_len, generator=g) * 3 + 1).masked_fill(padding_mask.unsqueeze(1), 0.0)
    labels = x[:, :CLASSES].sum(2).argmax(1)  # learnable: which of the first channels is largest
    return x, padding_mask, labels


def main():
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)  # the same initial model on every rank (DDP broadcasts rank 0's anyway)

    model = masknorm.convert_model(FrontEnd(), sync_batch_norm=True)
    if rank == 0:
        print(f"{world} rank(s); norms: {type(model.norm1).__name__}, {type(model.norm2).__name__}")
    ddp = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.Adam(ddp.parameters(), lr=3e-3)

    for step in range(30):
        x, padding_mask, labels = batch(step, rank, all_padding=(step == 5 and rank == 1))
        logits = ddp(x, padding_mask)
        per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
        loss = per_sample.sum() / max(len(labels), 1)
        if padding_mask.all():
            loss = loss * 0  # no valid frame: this rank contributes no gradient, but still runs the collectives
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1}: loss on rank 0 {loss.item():.3f}")

    # The promise, checked: norm1's training-mode output on this rank's batch is that of
    # MaskedBatchNorm1d on the concatenated batch of every rank (padded to the longest length).
    model.train()
    x, padding_mask, _ = batch(1000, rank)
    with torch.no_grad():
        h = model.conv1(x)
        reference = masknorm.MaskedBatchNorm1d(CHANNELS)
        reference.load_state_dict(model.norm1.state_dict())
        mine = model.norm1(h, padding_mask=padding_mask)
        parts = [(h, padding_mask)]
        if distributed:  # every rank's batch, everywhere (small: a check, not training)
            parts = [None] * world
            dist.all_gather_object(parts, (h, padding_mask))
        L = max(p[0].shape[2] for p in parts)  # pad to the longest length, as padding
        hs = [nn.functional.pad(p[0], (0, L - p[0].shape[2])) for p in parts]
        masks = [nn.functional.pad(p[1], (0, L - p[1].shape[1]), value=True) for p in parts]
        expected = reference(torch.cat(hs), torch.cat(masks))
        start = sum(s.shape[0] for s in hs[:rank])
        expected = expected[start:start + h.shape[0], :, : h.shape[2]]
        error = torch.tensor((mine - expected).abs().max().item() if mine.numel() else 0.0)
        if distributed:
            dist.all_reduce(error, dist.ReduceOp.MAX)
    if rank == 0:
        print(f"synced output vs MaskedBatchNorm1d on the concatenated batch: max abs difference {error.item():.2e}")
        print(f"running_mean[:4] {model.norm1.running_mean[:4].tolist()}, "
              f"num_batches_tracked {int(model.norm1.num_batches_tracked)}")
        assert error.item() < 1e-4
    if distributed:
        # Every rank tears down together: rank 0 prints above while the others
        # would already be closing their connections (once in CI, rank 0 then
        # aborted at exit with "terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
