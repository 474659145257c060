"""Replay buffer of student-generated outputs (DistiLLM Algorithm 1, ``D_R``).

Fresh SGO are pushed in; off-policy steps train on a uniformly drawn batch of them. The buffer is
FIFO with a fixed capacity (paper default 1000, App. E.8): once full, the oldest samples go first,
so the buffer tracks the recent student instead of the one from the start of training.

Samples are ``{"prompt": [ids], "response": [ids]}``: the format that
``distillm_tune.data.collate.collate_prompt_response`` turns into a batch.
"""

from collections import deque
from typing import Any, Dict, Iterable, List

import torch

Sample = Dict[str, List[int]]


class ReplayBuffer:
    """FIFO buffer of ``{"prompt", "response"}`` samples, sampled uniformly with a ``torch.Generator``.

    Args:
        capacity: maximum number of samples held; pushing beyond it evicts the oldest ones.
    """

    def __init__(self, capacity: int = 1000) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._items: deque = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def is_full(self) -> bool:
        return len(self._items) == self.capacity

    def push(self, samples: Iterable[Sample]) -> None:
        """Append samples in order, evicting the oldest ones beyond ``capacity``.

        Token lists are copied into plain ``int`` lists so that later mutation of the caller's
        objects (or tensors) cannot change what was stored, and the state dict stays picklable.
        """
        new = []
        for i, s in enumerate(samples):
            if "prompt" not in s or "response" not in s:
                raise ValueError(
                    f"sample {i} must have 'prompt' and 'response' keys, got keys {sorted(s)}"
                )
            new.append(
                {"prompt": [int(t) for t in s["prompt"]], "response": [int(t) for t in s["response"]]}
            )
        self._items.extend(new)

    def sample(self, n: int, generator: torch.Generator) -> List[Sample]:
        """Draw ``n`` samples uniformly at random.

        Without replacement when ``n <= len(self)`` (as the reference draws a batch with
        ``random.sample``: no sample appears twice in a batch); with replacement otherwise, so a
        batch can still be formed from a small buffer. The draw uses only ``generator`` (a CPU
        ``torch.Generator``), which makes it reproducible and resumable with the generator's state.
        Returned samples are copies; training on them cannot alter the buffer.
        """
        if len(self._items) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        size = len(self._items)
        if n <= size:
            idx = torch.randperm(size, generator=generator)[:n]
        else:
            idx = torch.randint(size, (n,), generator=generator)
        return [
            {"prompt": list(self._items[i]["prompt"]), "response": list(self._items[i]["response"])}
            for i in idx.tolist()
        ]

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed for an exact resume: capacity and the samples, oldest first."""
        return {
            "capacity": self.capacity,
            "samples": [
                {"prompt": list(s["prompt"]), "response": list(s["response"])} for s in self._items
            ],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore contents and order. A different capacity is an error: truncating or growing the
        buffer on resume would silently change which samples are evicted next."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"checkpoint replay buffer capacity {state['capacity']} != this buffer's "
                f"capacity {self.capacity}"
            )
        if len(state["samples"]) > self.capacity:
            raise ValueError(
                f"checkpoint holds {len(state['samples'])} samples, more than capacity {self.capacity}"
            )
        self._items.clear()
        self.push(state["samples"])
