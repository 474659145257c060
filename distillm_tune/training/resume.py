"""What may change when a run resumes, and how a change is applied.

A checkpoint keeps the run's resolved config. On resume, every key whose value differs is either
refused, because the resumed run would be another run than the one checkpointed (another loss,
data, batch, seed, model, sampling), or applied from the new config and logged as
``changed on resume: key old -> new``. The table of keys is in docs/resume.md.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch.optim import Optimizer

log = logging.getLogger(__name__)

# Keys (and every key below them) that must keep their value on resume.
REFUSED = (
    "method", "loss", "kd_ratio", "seed", "gradient_accumulation_steps", "max_steps_per_epoch",
    "max_seq_len", "max_prompt_len", "dataset", "validation.dataset", "seqkd_data", "lm", "student.checkpoint_dir",
    "student.lora", "teacher",
    "sgo", "distillm2", "guards.degenerate_sgo", "guards.max_repeated_ngram_fraction", "dtype", "optimizer._component_", "lr_scheduler._component_",
)
# Per-rank batch sizes: they may change only with the number of processes, so that the global
# micro-batch (per-rank size x ranks) stays what it was (``lm.batch_size``: when the LM term is on).
PER_RANK_BATCH = ("batch_size", "lm.batch_size")
# Keys that only say how to start, not what the run is.
IGNORED = ("resume_from_checkpoint", "overwrite")

Change = Tuple[str, Any, Any]  # (key, value in the checkpoint, value now)


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaves."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _subtree(tree: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _global_batch_error(saved: Dict[str, Any], current: Dict[str, Any], checkpoint: str, saved_world: int,
                        world: int) -> Optional[str]:
    """Why the per-rank batch sizes do not keep the global micro-batch on ``world`` ranks, or None."""
    def sizes(cfg):
        lm = cfg.get("lm") or {}
        lm_on = lm.get("dataset") is not None
        return {"batch_size": cfg["batch_size"],
                "lm.batch_size": (lm.get("batch_size") or cfg["batch_size"]) if lm_on else None}

    before, after = sizes(saved), sizes(current)
    for key in PER_RANK_BATCH:  # the LM term on or off is refused with lm.dataset before this check
        if before[key] is None or after[key] is None or before[key] * saved_world == after[key] * world:
            continue
        total = before[key] * saved_world
        fix = (f"Set {key}={total // world}" if total % world == 0 else
               f"Use a number of processes that divides {total}")
        return (f"config {key}: is {after[key]} on {world} rank(s) but {checkpoint!r} was written with "
                f"{before[key]} on {saved_world} rank(s); it cannot change when resuming unless the global "
                f"micro-batch ({key} x ranks) stays {total}, it would be {after[key] * world}. {fix}, or start a new "
                "run in another output_dir or with overwrite=true")
    return None


def config_changes(saved: Dict[str, Any], current: Dict[str, Any], checkpoint: str, saved_world: int = 1,
                   world: int = 1) -> List[Change]:
    """The changes to apply; raises ``ValueError`` naming the first refused key. ``saved_world``:
    the number of ranks that wrote the checkpoint, ``world``: this run's; the per-rank batch sizes
    may differ when their product with the number of ranks does not."""
    def without_lm_batch(cfg):  # lm.batch_size is checked with the number of ranks, the rest of lm as refused
        lm = cfg.get("lm")
        return {**cfg, "lm": {k: v for k, v in lm.items() if k != "batch_size"}} if isinstance(lm, dict) else cfg

    old, new = flatten(saved), flatten(current)
    missing = object()
    changes = [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
               if old.get(k, missing) != new.get(k, missing) and not _under(k, IGNORED)]
    changes = [(k, None if a is missing else a, None if b is missing else b) for k, a, b in changes]
    fixed_old, fixed_new = without_lm_batch(saved), without_lm_batch(current)
    for key in REFUSED:  # compared as whole subtrees, so the message shows e.g. all of ``loss``
        before, after = _subtree(fixed_old, key), _subtree(fixed_new, key)
        if before != after:
            raise ValueError(
                f"config {key}: is {after!r} but {checkpoint!r} was written with {before!r}; it cannot change "
                "when resuming (the run would not be the one checkpointed). Set it back, or start a new run "
                "in another output_dir or with overwrite=true"
            )
    why = _global_batch_error(saved, current, checkpoint, saved_world, world)
    if why is not None:
        raise ValueError(why)
    for key, before, after in changes:
        log.warning(f"changed on resume: {key} {before!r} -> {after!r}")
    return changes


def apply_optimizer_changes(optimizer: Optimizer, lr_scheduler: Any, changes: List[Change]) -> None:
    """Put the new config's optimizer hyperparameters into the restored optimizer (whose saved
    param groups would otherwise win) and recompute the learning rate at the restored step from
    the new base rate and schedule (``epochs`` and ``lr_scheduler.*`` change the schedule)."""
    opt = {k[len("optimizer."):]: v for k, _, v in changes if k.startswith("optimizer.")}
    for name, value in opt.items():
        for group in optimizer.param_groups:
            group[name] = tuple(value) if isinstance(group.get(name), tuple) else value
            if name == "lr":
                group["initial_lr"] = value
    if "lr" in opt:
        lr_scheduler.base_lrs = [opt["lr"]] * len(optimizer.param_groups)
    if opt or any(k == "epochs" or k.startswith("lr_scheduler.") for k, _, _ in changes):
        lambdas: Optional[list] = getattr(lr_scheduler, "lr_lambdas", None)
        if lambdas is None:
            raise ValueError(
                f"config optimizer/lr_scheduler: {type(lr_scheduler).__name__} cannot take a new learning rate "
                "or schedule on resume (only LambdaLR schedules can); set the changed keys back"
            )
        step = lr_scheduler.last_epoch
        for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lambdas):
            group["lr"] = base * factor(step)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
