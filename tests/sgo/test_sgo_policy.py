"""choose_source over a grid of u for every method (spec §2, §4)."""

import pytest
import torch

from distillm_tune.sgo.policy import METHODS, choose_source, shared_uniform
from distillm_tune.sgo.scheduler import AdaptiveSGOScheduler

GRID = [i / 20 for i in range(20)]  # 0.0, 0.05, ..., 0.95


@pytest.mark.parametrize("method", ["sft", "kd", "seqkd"])
def test_fixed_dataset_methods(method):
    assert {choose_source(method, u) for u in GRID} == {"dataset"}


def test_imitkd_always_generates():
    assert {choose_source("imitkd", u) for u in GRID} == {"sgo"}


def test_gkd_mixes_with_probability():
    assert [choose_source("gkd", u) for u in GRID] == ["sgo"] * 10 + ["dataset"] * 10
    got = [choose_source("gkd", u, gkd_sgo_prob=0.25) for u in GRID]
    assert got == ["sgo"] * 5 + ["dataset"] * 15


def _sched(phi_increases, total=100):
    s = AdaptiveSGOScheduler(total_steps=total, num_stages=10, tolerance=0.0)
    s.start(0.0)
    for k in range(phi_increases):
        s.update(float(k + 1))
    return s


def test_distillm_grid():
    s = _sched(6)  # phi = 0.6
    # step 50 of 100: lambda_R = 0.6 * 0.5 = 0.3
    full = [choose_source("distillm", u, step=50, scheduler=s, buffer_len=8, batch_size=8) for u in GRID]
    assert full == ["sgo"] * 6 + ["replay"] * 6 + ["dataset"] * 8
    # buffer smaller than a batch: the replay band generates instead
    small = [choose_source("distillm", u, step=50, scheduler=s, buffer_len=7, batch_size=8) for u in GRID]
    assert small == ["sgo"] * 12 + ["dataset"] * 8
    # step 0: lambda_R = phi, no replay band; step T: lambda_R = 0, all of phi replays
    assert [choose_source("distillm", u, step=0, scheduler=s, buffer_len=8, batch_size=8) for u in GRID] == (
        ["sgo"] * 12 + ["dataset"] * 8
    )
    assert [choose_source("distillm", u, step=100, scheduler=s, buffer_len=8, batch_size=8) for u in GRID] == (
        ["replay"] * 12 + ["dataset"] * 8
    )
    # phi = 0 (start of training): always the dataset
    assert {choose_source("distillm", u, step=0, scheduler=_sched(0), buffer_len=0, batch_size=8) for u in GRID} == {
        "dataset"
    }


def test_errors():
    with pytest.raises(ValueError, match="'minillm'.*" + ", ".join(METHODS)):
        choose_source("minillm", 0.5)
    with pytest.raises(ValueError, match="u must.*1.0"):
        choose_source("kd", 1.0)
    with pytest.raises(ValueError, match="scheduler"):
        choose_source("distillm", 0.5)
    with pytest.raises(ValueError, match="gkd_sgo_prob.*2"):
        choose_source("gkd", 0.5, gkd_sgo_prob=2)


def test_shared_uniform_without_distributed_is_the_generator_draw():
    a = [shared_uniform(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1] and 0.0 <= a[0] < 1.0
    g = torch.Generator().manual_seed(3)
    seq = [shared_uniform(g) for _ in range(3)]
    assert len(set(seq)) == 3
# shared_uniform across 2 ranks: tests/sgo/test_sgo_distributed.py
