"""One run per output directory: a lock against concurrent runs, and no silent reuse.

A second run into a directory that holds an earlier run would mix two runs' checkpoints,
metrics and exports (and pruning or a later resume could pick the other run's state). So a new
run is refused there unless the user says which they mean: ``resume_from_checkpoint=true``
continues the earlier run, ``overwrite=true`` removes its outputs and starts afresh.
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


def claim_output_dir(output_dir: str, resume: bool, overwrite: bool) -> IO:
    """Lock ``output_dir`` for this run; refuse an earlier run's directory unless resuming or
    overwriting (then its outputs are removed first). Returns the lock's file."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir!r} exists and is not a directory")
    lock = lock_output_dir(output_dir)
    found = earlier_run_outputs(output_dir)
    if found and not resume:
        if not overwrite:
            lock.close()
            raise ValueError(
                f"{output_dir!r} holds an earlier run ({', '.join(found)}): pass resume_from_checkpoint=true "
                "to continue it, overwrite=true to replace it, or choose another output_dir"
            )
        for name in found:
            path = os.path.join(output_dir, name.rstrip("/"))
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        log.warning(f"overwrite=true: removed the earlier run's {', '.join(found)} from {output_dir}")
    return lock
