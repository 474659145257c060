"""Token cross-entropy as (sum, count), over dense or chunked logits.

The recipe needs the sum and the token count separately (like the divergences' ``sum_and_count``)
so that gradient accumulation and data parallelism divide by the tokens of the whole step.
"""

from typing import Tuple

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

