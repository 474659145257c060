"""The paper's learning-rate schedule: (optional warmup, then) cosine decay to a floor (1e-7)."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_floor(
    optimizer: Optimizer,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    min_lr: float = 1e-7,
) -> LambdaLR:
    """Linear warmup over ``num_warmup_steps``, then cosine from each group's lr down to ``min_lr``.

    torchtune's ``get_cosine_schedule_with_warmup`` decays to 0; the paper decays to 1e-7.
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if not 0 <= num_warmup_steps < num_training_steps:
        raise ValueError(
            f"num_warmup_steps must lie in [0, {num_training_steps}), got {num_warmup_steps}"
        )
    base = [group["lr"] for group in optimizer.param_groups]

    def factor(i: int):
        def f(step: int) -> float:
            if step < num_warmup_steps:
                return (step + 1) / (num_warmup_steps + 1)
            progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
            floor = min(min_lr / base[i], 1.0) if base[i] > 0 else 0.0
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return f

    return LambdaLR(optimizer, [factor(i) for i in range(len(base))])
