"""Training-state checkpoints that survive a kill at any moment, a full disk and a corrupt file.

Layout under ``output_dir/checkpoints``::

    run.json                the id of the run these checkpoints belong to
    step_00000040/          one complete checkpoint
        model/              trainable weights (full student, or LoRA adapters only) written with
                            torch.distributed.checkpoint (DCP): ``.metadata`` + one
                            ``__<rank>_0.distcp`` per rank holding that rank's shards   [every rank]
        optimizer/          optimizer state, DCP, sharded like the weights             [every rank]
        recipe_state.pt     step, data cursor, schedulers, shared RNG, config, ...   [rank 0]
        rank_00000.pt       what differs per rank: replay buffer, RNG states          [each rank]
        manifest.json       format 2, run id, step, world size, size and sha256 of every file
                            (``model/__0_0.distcp`` ...)                              [rank 0, last]
    latest                  the name of the newest complete checkpoint

No rank gathers the full model or optimizer: each writes its own shards (one process writes one
shard of everything; DCP needs no process group then). DCP reshards on load, so a checkpoint
written by N ranks loads on M ranks (the recipe decides what else must hold, docs/resume.md).

Every rank writes into ``.step_00000040.tmp``; rank 0 writes the manifest and renames the folder
to ``step_00000040`` only after all ranks have finished, then rewrites ``latest`` through a
temporary file and ``os.replace``. A process killed at any point leaves either the new checkpoint
complete or the previous one untouched; a failed write (a full disk) removes the torn folder and
says where and how much space is left. On resume, a checkpoint whose files do not match its
manifest is skipped for the newest intact one of the same run, with a warning naming both, and
is renamed ``corrupt_step_...`` so that neither pruning nor a later resume picks it again.
Pruning keeps the newest ``keep_last`` checkpoints of this run by step number and never removes
the one ``latest`` names.
"""

import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

log = logging.getLogger(__name__)

SHARED_FILES = ("model.pt", "optimizer.pt", "recipe_state.pt")  # format 1 (before DCP), for its error
FORMAT = 2  # 1: model.pt / optimizer.pt gathered on rank 0; 2: DCP folders, one shard file per rank
MANIFEST = "manifest.json"
RUN_FILE = "run.json"


def _dcp_no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def dcp_save(state_dict: Dict[str, Any], folder: str) -> None:
    """``torch.distributed.checkpoint.save`` of this rank's shards into ``folder`` (collective when
    a process group exists; one process writes everything without one)."""
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state_dict, checkpoint_id=folder, no_dist=_dcp_no_dist())


def dcp_load(state_dict: Dict[str, Any], folder: str) -> None:
    """Fill ``state_dict`` (tensors or DTensors laid out as this run shards them) in place from the
    DCP ``folder``, whatever number of ranks wrote it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state_dict, checkpoint_id=folder, no_dist=_dcp_no_dist())


def _files_under(folder: str) -> List[str]:
    """Every file below ``folder``, as sorted paths relative to it (``model/__0_0.distcp``)."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(out)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank: a failure on one rank is seen by all in the same call,
    so that no rank goes on to a collective the others will never reach."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0.0


def sha256_of(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def free_space(path: str) -> str:
    """'12.3 MiB free' on the file system that holds ``path`` (or its nearest existing parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return f"{shutil.disk_usage(path or '.').free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def step_of(name: str) -> int:
    """``step_00000040`` -> 40 (any number of digits)."""
    return int(name[len("step_"):])


def _first_line(error: BaseException, limit: int = 400) -> str:
    """DCP wraps a rank's failure in a CheckpointException whose text is a traceback per rank:
    the innermost error (e.g. the OSError of a full disk) says what happened."""
    failures = error.args[1] if isinstance(error, CheckpointException) and len(error.args) > 1 else None
    if isinstance(failures, dict) and failures:
        rank, inner = sorted(failures.items())[0]
        inner = inner[0] if isinstance(inner, tuple) else inner
        return f"on rank {rank}: {type(inner).__name__}: {str(inner).strip()}"[:limit]
    return str(error).strip().splitlines()[0][:limit] if str(error).strip() else repr(error)


class CheckpointWriteError(OSError):
    """A checkpoint or export could not be written; the previous one is intact."""


class RecipeCheckpointer:
    """Saves, verifies and finds the training-state checkpoints of one run."""

    def __init__(self, output_dir: str, keep_last: int = 2, device: Optional[torch.device] = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last
        self.device = device or torch.device("cpu")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.run_id: Optional[str] = None

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}"

    # ---------------------------------------------------------------------------------- run id

    def start_run(self) -> str:
        """A fresh run: a new id, written to ``checkpoints/run.json`` (rank 0) and kept by every rank."""
        run_id = uuid.uuid4().hex if self.rank == 0 else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [run_id]
            dist.broadcast_object_list(box, src=0)
            run_id = box[0]
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            _write_text_atomic(os.path.join(self.root, RUN_FILE), json.dumps({"run_id": run_id}))
        self.run_id = run_id
        return run_id

    def recorded_run_id(self) -> Optional[str]:
        try:
            with open(os.path.join(self.root, RUN_FILE)) as f:
                return json.load(f)["run_id"]
        except (OSError, ValueError, KeyError):
            return None

    # ------------------------------------------------------------------------------------ save

    def save(self, step: int, recipe_state: Optional[Dict[str, Any]], per_rank: Dict[str, Any],
             sharded: Dict[str, Dict[str, Any]]) -> str:
        """Collective: every rank calls it. ``sharded`` maps a folder name (``model``,
        ``optimizer``) to this rank's state dict of (D)Tensors, written with DCP by every rank;
        ``recipe_state`` only matters on rank 0; ``per_rank`` is this rank's own file. Raises
        :class:`CheckpointWriteError` on every rank if any rank fails."""
        final = os.path.join(self.root, self.name(step))
        tmp = os.path.join(self.root, f".{self.name(step)}.tmp")
        error = None
        if self.rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            except OSError as e:
                error = e
        if all_ranks_ok(error is None, self.device):
            try:
                # DCP's own collectives carry a failure on one rank to all (CheckpointException)
                for name, state in sharded.items():
                    dcp_save(state, os.path.join(tmp, name))
                torch.save(per_rank, os.path.join(tmp, f"rank_{self.rank:05d}.pt"))
                if self.rank == 0:
                    torch.save(recipe_state, os.path.join(tmp, "recipe_state.pt"))
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch reports a full disk as a RuntimeError
                error = e
        ok = all_ranks_ok(error is None, self.device)
        if ok and self.rank == 0:
            try:
                self._write_manifest(tmp, step)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _write_text_atomic(os.path.join(self.root, "latest"), self.name(step))
            except OSError as e:
                error = e
        ok = all_ranks_ok(error is None, self.device)
        if not ok:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_pointer()
            raise CheckpointWriteError(
                f"could not write checkpoint {final!r}"
                + (f": {type(error).__name__}: {_first_line(error)}" if error is not None else " (failed on another rank)")
                + f"; {free_space(self.root)} on that file system. The torn folder was removed; "
                + (f"the previous checkpoint {previous!r} is intact." if previous else "no earlier checkpoint exists.")
            )
        if self.rank == 0:
            self._prune(keep=self.name(step))
        _barrier()
        return final

    def _write_manifest(self, folder: str, step: int) -> None:
        files = {}
        for f in _files_under(folder):
            p = os.path.join(folder, f)
            files[f] = {"bytes": os.path.getsize(p), "sha256": sha256_of(p)}
        manifest = {"format": FORMAT, "run_id": self.run_id, "step": step,
                    "world_size": len([f for f in files if f.startswith("rank_")]), "files": files}
        _write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))

    def _names(self) -> List[str]:
        """Complete checkpoint folders, oldest step first."""
        if not os.path.isdir(self.root):
            return []
        names = [d for d in os.listdir(self.root) if d.startswith("step_") and d[5:].isdigit()]
        return sorted(names, key=step_of)

    def _run_of(self, name: str) -> Optional[str]:
        try:
            with open(os.path.join(self.root, name, MANIFEST)) as f:
                return json.load(f).get("run_id")
        except (OSError, ValueError):
            return None

    def _prune(self, keep: str) -> None:
        mine = [n for n in self._names() if self._run_of(n) == self.run_id]
        protected = {keep, self.latest_pointer(name_only=True)}
        for old in mine[: -self.keep_last]:
            if old not in protected:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        for d in os.listdir(self.root):
            if d.startswith(".step_") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    # ---------------------------------------------------------------------------------- resume

    def latest_pointer(self, name_only: bool = False) -> Optional[str]:
        """What ``latest`` names (it may have been removed or be corrupt), or None."""
        try:
            with open(os.path.join(self.root, "latest")) as f:
                name = f.read().strip()
        except OSError:
            return None
        return name if name_only else os.path.join(self.root, name)

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint directory by ``latest`` or step number (unverified), or None."""
        pointer = self.latest_pointer()
        if pointer is not None and os.path.isdir(pointer):
            return pointer
        names = self._names()
        return os.path.join(self.root, names[-1]) if names else None

    def verify(self, path: str) -> Optional[str]:
        """None if the checkpoint at ``path`` is intact (every file of its manifest there, with its
        size and sha256), else why not. Any number of ranks may resume it (:meth:`world_size_of`)."""
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            # written before manifests existed: the files must at least be there
            missing = [f for f in SHARED_FILES if not os.path.isfile(os.path.join(path, f))]
            if missing:
                return f"missing {missing}"
            manifest = {"files": {}}
        else:
            try:
                with open(manifest_path) as f:
                    manifest = json.load(f)
                manifest["files"]
            except (OSError, ValueError, KeyError) as e:
                return f"unreadable {MANIFEST} ({e})"
        for name, meta in manifest["files"].items():
            p = os.path.join(path, name)
            if not os.path.isfile(p):
                return f"{name} is missing"
            size = os.path.getsize(p)
            if size != meta["bytes"]:
                return f"{name} has {size} bytes, the manifest says {meta['bytes']}"
            if sha256_of(p) != meta["sha256"]:
                return f"{name} does not match its sha256 in the manifest"
        return None

    @staticmethod
    def manifest_of(path: str) -> Dict[str, Any]:
        """The manifest of a verified checkpoint (``{}`` for one written before manifests)."""
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                return json.load(f)
        except OSError:
            return {}

    def find_resumable(self) -> Tuple[Optional[str], List[Tuple[str, str]]]:
        """(newest intact checkpoint of this output dir's run, [(skipped path, why)]).

        Candidates are the checkpoint ``latest`` names, then the others up to its step, newest
        first; a checkpoint of another run (by the id in ``run.json``) is never a candidate."""
        run_id = self.recorded_run_id()
        pointer = self.latest_pointer()
        if pointer is not None and not os.path.isdir(pointer):
            pointer = None
        limit = step_of(os.path.basename(pointer)) if pointer else None
        ordered = ([pointer] if pointer else []) + [
            os.path.join(self.root, n) for n in reversed(self._names())
            if os.path.join(self.root, n) != pointer and (limit is None or step_of(n) <= limit)
        ]
        skipped = []
        for path in ordered:
            other_run = self._run_of(os.path.basename(path))
            if run_id is not None and other_run is not None and other_run != run_id:
                continue
            why = self.verify(path)
            if why is None:
                return path, skipped
            skipped.append((path, why))
        return None, skipped

    def set_aside(self, path: str) -> str:
        """Rename a corrupt checkpoint to ``corrupt_<name>`` (kept for inspection, out of every search)."""
        target = os.path.join(self.root, "corrupt_" + os.path.basename(path))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
        return target

    def load(self, path: str, world_size: int) -> Dict[str, Any]:
        """The non-tensor state of a verified checkpoint for this rank: ``{"recipe_state",
        "world_size" (of the run that wrote it), "ranks" (the per-rank states: this rank's alone
        when ``world_size`` is the saved one, else every saved rank's, in rank order)}``. The
        sharded tensors are read by :meth:`load_sharded`. Raises ``ValueError`` naming the file."""
        manifest = self.manifest_of(path)
        if manifest.get("format", 1) != FORMAT:
            raise ValueError(
                f"checkpoint {path!r} is in format {manifest.get('format', 1)} (model.pt/optimizer.pt gathered on "
                f"rank 0, written before sharded checkpoints); this version reads format {FORMAT} (DCP). Resume it "
                "with the version that wrote it, or start a new run"
            )
        saved_world = int(manifest["world_size"])

        def load(f):
            full = os.path.join(path, f)
            try:
                return torch.load(full, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file
                raise ValueError(f"cannot read checkpoint file {full!r}: {type(e).__name__}: {e}") from e

        ranks = [self.rank] if saved_world == world_size else range(saved_world)
        state = {"recipe_state": load("recipe_state.pt"), "world_size": saved_world,
                 "ranks": [load(f"rank_{r:05d}.pt") for r in ranks]}
        self.run_id = state["recipe_state"].get("run_id") or self._run_of(os.path.basename(path))
        return state

    def load_sharded(self, path: str, name: str, state_dict: Dict[str, Any]) -> None:
        """Collective: fill ``state_dict`` (laid out as this run shards it) in place from the DCP
        folder ``name`` of the checkpoint at ``path``, whatever number of ranks wrote it."""
        folder = os.path.join(path, name)
        try:
            dcp_load(state_dict, folder)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a missing key, an unreadable file
            raise ValueError(f"cannot read the sharded checkpoint {folder!r}: {type(e).__name__}: "
                             f"{_first_line(e)}") from e
