"""Training plumbing the recipes share: schedules, checkpoint state, metric logging, process groups."""

from distillm_tune.training.checkpointing import RecipeCheckpointer
from distillm_tune.training.distributed import all_reduce_sum, init_process_group_for, is_rank_zero
from distillm_tune.training.lr_schedule import cosine_with_floor
from distillm_tune.training.metric_logging import JsonlMetricLogger, TensorBoardLogger

__all__ = [
    "JsonlMetricLogger",
    "RecipeCheckpointer",
    "TensorBoardLogger",
    "all_reduce_sum",
    "cosine_with_floor",
    "init_process_group_for",
    "is_rank_zero",
]
