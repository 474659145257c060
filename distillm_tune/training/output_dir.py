"""One run per output directory: a lock against concurrent runs, and no silent reuse.

A second run into a directory that holds an earlier run would mix two runs' checkpoints,
metrics and exports (and pruning or a later resume could pick the other run's state). So a new
run is refused there unless the user says which they mean: ``resume_from_checkpoint=true``
continues the earlier run, ``overwrite=true`` replaces it with a fresh run, deleting the earlier
outputs only once the new run has passed its checks and taken its first step.
"""

import fcntl
import logging
import os
import shutil
import socket
from typing import IO, List

log = logging.getLogger(__name__)

# What a kd_offpolicy run writes into its output directory.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "hf_model", "hf_model_best", "hf_model_diverged", "peft_adapter",
               "peft_adapter_best", "peft_adapter_diverged", "profiling_outputs",
               "distillm2_teacher_responses.jsonl")
LOCK_FILE = ".lock"
PREVIOUS_RUN = ".previous_run"  # an earlier run set aside by overwrite=true until the new run's first step


def earlier_run_outputs(output_dir: str) -> List[str]:
    """The outputs of an earlier run found in ``output_dir`` (an empty folder counts as none)."""
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        # checkpoints/ of a run that never saved holds only its run.json: nothing to lose
        if os.path.isdir(path) and set(os.listdir(path)) - {"run.json"}:
            found.append(name + "/")
        elif os.path.isfile(path) and os.path.getsize(path) > 0:
            found.append(name)
    return found


def lock_output_dir(output_dir: str) -> IO:
    """An exclusive lock on ``output_dir/.lock`` for the life of the returned file (the OS drops
    it when the process dies, so a killed run leaves no stale lock)."""
    os.makedirs(output_dir, exist_ok=True)
    f = open(os.path.join(output_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise ValueError(f"{output_dir!r} is in use by another run ({holder}); wait for it to end "
                         "or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> List[str]:
    """Whether a run may write into ``output_dir`` (reads only): the outputs of an earlier run a
    new run would replace (overwrite=true); raises ValueError for an earlier run without resume
    or overwrite, a file in its place, and an earlier run left set aside."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir!r} exists and is not a directory")
    if os.path.exists(os.path.join(output_dir, PREVIOUS_RUN)):
        raise ValueError(f"{output_dir!r} holds {PREVIOUS_RUN}/, an earlier run set aside by an overwrite=true run "
                         f"that was killed before its first step: move its contents back into {output_dir!r} (or "
                         "delete it) first")
    found = [] if resume or not os.path.isdir(output_dir) else earlier_run_outputs(output_dir)
    if found and not overwrite:
        raise ValueError(
            f"{output_dir!r} holds an earlier run ({', '.join(found)}): pass resume_from_checkpoint=true "
            "to continue it, overwrite=true to replace it, or choose another output_dir"
        )
    return found


class OutputDirClaim:
    """This run's hold on ``output_dir`` (rank 0): the lock, and what happens to an earlier run.

    A new run into a directory holding an earlier run is refused unless resuming or overwriting.
    With ``overwrite=true`` nothing of the earlier run is touched while the new run is checked:
    ``set_aside()`` (called once every check that needs no model has passed) moves its outputs
    into ``PREVIOUS_RUN`` inside the directory, ``commit()`` (after the new run's first optimizer
    step) deletes them, and ``abandon()`` (the run failed before that) puts them back byte for byte.
    A run that fails before its first step also removes what it wrote, and the directory itself
    when it created it, so a run that never started leaves nothing behind.
    """

    def __init__(self, output_dir: str, resume: bool, overwrite: bool):
        check_output_dir(output_dir, resume, overwrite)  # before the lock creates the folder
        self.output_dir = output_dir
        self.created = not os.path.exists(output_dir)
        self.lock = lock_output_dir(output_dir)
        self.set_aside_names: List[str] = []
        self.committed = False
        try:  # again under the lock: another run may have written there meanwhile
            found = check_output_dir(output_dir, resume, overwrite)
        except ValueError:
            self.release()
            self._remove_if_created()
            raise
        # the earlier run's logged config goes with it
        self.earlier = [n.rstrip("/") for n in found] + (["config.yaml"] if found and os.path.isfile(
            os.path.join(output_dir, "config.yaml")) else [])

    def set_aside(self) -> None:
        """Move the earlier run (overwrite=true) out of the new run's way, into ``PREVIOUS_RUN``."""
        if not self.earlier:
            return
        aside = os.path.join(self.output_dir, PREVIOUS_RUN)
        os.makedirs(aside)
        for name in self.earlier:
            os.rename(os.path.join(self.output_dir, name), os.path.join(aside, name))
            self.set_aside_names.append(name)
        log.warning(f"overwrite=true: the earlier run's {', '.join(self.earlier)} moved to {aside}; deleted once the "
                    "new run has taken its first step, put back if it fails before")

    def commit(self) -> None:
        """The new run has taken its first step: the earlier run it replaces is deleted."""
        if self.committed:
            return
        self.committed = True
        if self.set_aside_names:
            shutil.rmtree(os.path.join(self.output_dir, PREVIOUS_RUN))
            log.warning(f"overwrite=true: removed the earlier run's {', '.join(self.set_aside_names)} from "
                        f"{self.output_dir}")

    def abandon(self) -> None:
        """The run failed before its first step: remove what it wrote, put the earlier run back,
        and remove the directory if this run created it."""
        if self.committed:
            return
        if self.set_aside_names or self.created:  # what is there is the new run's: the earlier one is aside
            for name in (*RUN_OUTPUTS, "config.yaml"):
                path = os.path.join(self.output_dir, name)
                if os.path.lexists(path):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        aside = os.path.join(self.output_dir, PREVIOUS_RUN)
        for name in self.set_aside_names:
            os.rename(os.path.join(aside, name), os.path.join(self.output_dir, name))
        if self.set_aside_names:
            os.rmdir(aside)
            log.warning(f"the run failed before its first step: the earlier run's {', '.join(self.set_aside_names)} "
                        f"is back in {self.output_dir}")
        self.set_aside_names = []
        self.release()
        self._remove_if_created()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _remove_if_created(self) -> None:
        """A directory this run created and left holding nothing but its lock file is removed."""
        if self.created and os.path.isdir(self.output_dir) and set(os.listdir(self.output_dir)) <= {LOCK_FILE}:
            shutil.rmtree(self.output_dir)
