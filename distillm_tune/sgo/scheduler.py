"""Adaptive SGO scheduler (DistiLLM App. C) and replay-ratio schedules (App. E.5).

``phi`` is the probability that a step trains on student-generated outputs at all (fresh or
replayed). It only grows, in steps of ``1/num_stages``, and only when the validation loss rose by
more than ``tolerance`` since the last increase: the student is then drifting from what it will
see at inference time, and training on its own outputs counters that (paper Fig. 10).

Of that probability, the part ``phi * replay_ratio(t)`` generates fresh outputs; the rest replays
the buffer. The default "decreasing" ratio ``1 - t/T`` generates often early, when the student
changes fast and old outputs are stale, and replays more later, when generation would be wasted.
"""

import math
from typing import Any, Dict, Optional

REPLAY_RATIOS = ("decreasing", "constant", "increasing")


class AdaptiveSGOScheduler:
    """State of the adaptive off-policy policy: ``phi`` and the previous validation loss.

    Args:
        total_steps: ``T``, the number of optimizer steps of the run.
        phi0: initial ``phi`` in [0, 1] (paper default 0.0).
        num_stages: ``N_phi``; each increase adds ``1/N_phi`` (paper default 10).
        tolerance: ``epsilon``; the loss must exceed ``L_prev + epsilon`` to increase ``phi``
            (paper default 0.1).
        replay_ratio: "decreasing" (``1 - t/T``, default), "constant" (0.5) or "increasing"
            (``t/T``).

    ``phi`` is kept as ``min(phi0 + k / num_stages, 1)`` with ``k`` the number of increases, which
    equals the spec's ``phi <- min(phi + 1/N, 1)`` without accumulating float error (ten increases
    from 0 give exactly 1.0, not 0.9999999999999999).
    """

    def __init__(
        self,
        total_steps: int,
        phi0: float = 0.0,
        num_stages: int = 10,
        tolerance: float = 0.1,
        replay_ratio: str = "decreasing",
    ) -> None:
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not (0.0 <= phi0 <= 1.0):
            raise ValueError(f"phi0 must lie in [0, 1], got {phi0!r}")
        if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if not (tolerance >= 0.0):  # also rejects NaN
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        if replay_ratio not in REPLAY_RATIOS:
            raise ValueError(f"replay_ratio must be one of {REPLAY_RATIOS}, got {replay_ratio!r}")
        self.total_steps = total_steps
        self.phi0 = float(phi0)
        self.num_stages = num_stages
        self.tolerance = float(tolerance)
        self.replay_ratio = replay_ratio
        self._increases = 0
        self.prev_val_loss: Optional[float] = None

    @property
    def phi(self) -> float:
        return min(self.phi0 + self._increases / self.num_stages, 1.0)

    def start(self, initial_val_loss: float) -> None:
        """Set ``L_prev`` to the validation loss of the initial student, measured before training."""
        self.prev_val_loss = _finite("initial_val_loss", initial_val_loss)

    def update(self, val_loss: float) -> bool:
        """One validation: if ``val_loss > L_prev + tolerance``, raise ``phi`` by one stage (capped
        at 1), set ``L_prev = val_loss`` and return True; otherwise change nothing, return False.

        ``val_loss`` must be the same on every rank (all-reduce it first) so that ranks agree on phi.
        """
        if self.prev_val_loss is None:
            raise ValueError("update() called before start(initial_val_loss): L_prev is not set")
        val_loss = _finite("val_loss", val_loss)
        if val_loss > self.prev_val_loss + self.tolerance:
            if self.phi < 1.0:
                self._increases += 1
            self.prev_val_loss = val_loss
            return True
        return False

    def replay_ratio_at(self, step: int) -> float:
        """The schedule factor at optimizer step ``t`` of ``T`` (0 <= t <= T)."""
        if not (0 <= step <= self.total_steps):
            raise ValueError(f"step must lie in [0, total_steps={self.total_steps}], got {step!r}")
        frac = step / self.total_steps
        if self.replay_ratio == "decreasing":
            return 1.0 - frac
        if self.replay_ratio == "increasing":
            return frac
        return 0.5

    def sgo_prob(self, step: int) -> float:
        """``lambda_R = phi * replay_ratio(t)``: probability of generating fresh SGO at step ``t``."""
        return self.phi * self.replay_ratio_at(step)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "phi0": self.phi0,
            "num_stages": self.num_stages,
            "increases": self._increases,
            "phi": self.phi,
            "prev_val_loss": self.prev_val_loss,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``phi`` and ``L_prev``. phi0 and num_stages must match the checkpoint, since phi
        is stored as a number of increases of ``1/num_stages`` from ``phi0``."""
        for key in ("phi0", "num_stages"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint scheduler {key}={state[key]!r} != configured {getattr(self, key)!r}"
                )
        self._increases = int(state["increases"])
        self.prev_val_loss = state["prev_val_loss"]


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value
