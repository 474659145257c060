"""Training-state checkpoints that survive a kill at any moment.

Layout under ``output_dir/checkpoints``::

    step_00000040/          one complete checkpoint
        model.pt            trainable weights (full student, or LoRA adapters only)   [rank 0]
        optimizer.pt        optimizer state (full, gathered)                         [rank 0]
        recipe_state.pt     step, data cursor, schedulers, shared RNG, ...           [rank 0]
        rank_00000.pt       what differs per rank: replay buffer, RNG states          [each rank]
    latest                  the name of the newest complete checkpoint

Every rank writes into ``.step_00000040.tmp``; rank 0 renames it to ``step_00000040`` only after
all ranks have finished, then rewrites ``latest`` through a temporary file and ``os.replace``.
A process killed at any point leaves either the new checkpoint complete or the previous one
untouched (a stale ``.tmp`` folder is removed by the next save).
"""

import os
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

SHARED_FILES = ("model.pt", "optimizer.pt", "recipe_state.pt")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _save_atomic(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RecipeCheckpointer:
    """Saves and finds training-state checkpoints; ``keep_last`` complete ones are kept."""

    def __init__(self, output_dir: str, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}"

    def save(self, step: int, shared: Optional[Dict[str, Any]], per_rank: Dict[str, Any]) -> str:
        """Collective: every rank calls it; ``shared`` (model, optimizer, recipe_state) only
        matters on rank 0."""
        final = os.path.join(self.root, self.name(step))
        tmp = os.path.join(self.root, f".{self.name(step)}.tmp")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        _save_atomic(per_rank, os.path.join(tmp, f"rank_{self.rank:05d}.pt"))
        if self.rank == 0:
            for key in ("model", "optimizer", "recipe_state"):
                _save_atomic(shared[key], os.path.join(tmp, f"{key}.pt"))
        _barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            with open(os.path.join(self.root, "latest.tmp"), "w") as f:
                f.write(self.name(step))
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(self.root, "latest.tmp"), os.path.join(self.root, "latest"))
            self._prune()
        _barrier()
        return final

    def _complete(self):
        if not os.path.isdir(self.root):
            return []
        return sorted(d for d in os.listdir(self.root) if d.startswith("step_"))

    def _prune(self) -> None:
        for old in self._complete()[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        for d in os.listdir(self.root):
            if d.startswith(".step_") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint directory, or None."""
        pointer = os.path.join(self.root, "latest")
        if os.path.isfile(pointer):
            with open(pointer) as f:
                path = os.path.join(self.root, f.read().strip())
            if os.path.isdir(path):
                return path
        done = self._complete()
        return os.path.join(self.root, done[-1]) if done else None

    def load(self, path: str, world_size: int) -> Dict[str, Any]:
        """``{"model", "optimizer", "recipe_state", "rank"}`` of a checkpoint for this rank."""
        missing = [f for f in SHARED_FILES if not os.path.isfile(os.path.join(path, f))]
        rank_file = os.path.join(path, f"rank_{self.rank:05d}.pt")
        if missing or not os.path.isfile(rank_file):
            raise FileNotFoundError(
                f"checkpoint {path!r} is incomplete: missing {missing or [os.path.basename(rank_file)]}"
            )
        n_ranks = len([f for f in os.listdir(path) if f.startswith("rank_")])
        if n_ranks != world_size:
            raise ValueError(
                f"checkpoint {path!r} was written by {n_ranks} ranks but this run has "
                f"{world_size}: resume with the same number of processes"
            )
        load = lambda f: torch.load(os.path.join(path, f), map_location="cpu", weights_only=False)  # noqa: E731
        return {
            "model": load("model.pt"),
            "optimizer": load("optimizer.pt"),
            "recipe_state": load("recipe_state.pt"),
            "rank": load(os.path.basename(rank_file)),
        }
