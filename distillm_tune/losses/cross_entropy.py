"""Token cross-entropy as (sum, count), over dense or chunked logits.

The recipe needs the sum and the token count separately (like the divergences' ``sum_and_count``)
so that gradient accumulation and data parallelism divide by the tokens of the whole step.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from distillm_tune.losses.divergences import Logits, _align_chunks


def cross_entropy_sum_and_count(
    logits: Logits, labels: Tensor, ignore_index: int = -100
) -> Tuple[Tensor, Tensor]:
    """Σ −log q(label) over tokens whose label is not ``ignore_index`` (fp32), and their number."""
    chunks, _, label_chunks = _align_chunks(logits, logits, labels)
    total = None
    for chunk, lab in zip(chunks, label_chunks):
        part = F.cross_entropy(
            chunk.reshape(-1, chunk.shape[-1]).float(),
            lab.reshape(-1),
            ignore_index=ignore_index,
            reduction="sum",
        )
        total = part if total is None else total + part
    return total, (labels != ignore_index).sum()


def linear_cross_entropy_sum_and_count(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
    ignore_index: int = -100, chunk_size: int = 1024,
) -> Tuple[Tensor, Tensor]:
    """``cross_entropy_sum_and_count`` of the logits ``hidden @ weight.T + bias``, computed over
    ``chunk_size`` tokens at a time from the hidden states ``[B, S, H]`` (only the unmasked tokens),
    so that the ``[tokens, V]`` logits never exist at once (without autograd; with it, every chunk's
    logits are kept for backward)."""
    keep = labels.reshape(-1) != ignore_index
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = labels.reshape(-1)[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        logits = F.linear(rows[start : start + chunk_size], weight, bias).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum")
    return total, keep.sum()
