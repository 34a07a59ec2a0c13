"""The benchmark shapes the ahead-of-time variant list (:mod:`.aot`) specialises the kernels at, and
the EDA benchmark's batch (``heal bench eda`` defaults; :mod:`heal.bench.eda` uses
:func:`make_batch` from here, so the two never drift apart)."""

from __future__ import annotations

# heal bench entropy on CUDA: [16384, 151936] bf16
BENCH_VOCAB = 151936
SMALL_VOCABS = (1008, 304, 112)  # the other launch_config classes (4, 2 and 1 warps); multiples of 16 like real vocabularies
# vocabularies whose rows do not start on 16-byte boundaries: GPT-2's 50257 (contiguous rows at
# every offset), and a padded head sliced to its tokenizer's vocabulary, logits[:, :151646] of a
# [N, 151936] tensor (aligned rows, an unaligned length; the gradient's rows sit at other offsets)
UNALIGNED_VOCAB = 50257
SLICED_VOCAB = (151936, 151646)
# heal bench eda: B = 1024 trajectories, lengths uniform in [64, 3072], a quarter general-domain
EDA_BATCH, EDA_MIN_LEN, EDA_MAX_LEN = 1024, 64, 3072
EDA_GENERAL_FRACTION = 0.25


def make_batch(batch: int, min_len: int, max_len: int, general_fraction: float, seed: int, device):
    """A packed batch of entropy-like sequences: ``(values, cu_seqlens, groups, lengths)`` -- float32
    ``[total]`` values (mostly low, with high-entropy spikes, a per-trajectory scale), int32 ``[B + 1]``
    offsets, int64 ``[B]`` groups (1 = general, with probability ``general_fraction``) and the int64
    lengths (on the CPU), lengths uniform in ``[min_len, max_len]``; deterministic in ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    # entropy-like values: mostly low with high-entropy spikes, a per-trajectory scale
    values = (torch.rand(int(cu[-1]), generator=g) ** 4) * 3.0
    values = values * torch.repeat_interleave(0.5 + torch.rand(batch, generator=g), lens)
    groups = (torch.rand(batch, generator=g) < general_fraction).to(torch.int64)
    return values.to(device), cu.to(device), groups.to(device), lens
