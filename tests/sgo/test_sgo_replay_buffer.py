"""ReplayBuffer: FIFO eviction, uniform draws, exact resume."""

import pytest
import torch

from distillm_tune.sgo.replay_buffer import ReplayBuffer


def _s(i):
    return {"prompt": [i], "response": [i, i + 1]}


def test_fifo_eviction_keeps_newest_in_order():
    buf = ReplayBuffer(capacity=3)
    assert len(buf) == 0 and not buf.is_full
    buf.push([_s(0), _s(1)])
    assert len(buf) == 2 and not buf.is_full
    buf.push([_s(2), _s(3), _s(4)])
    assert len(buf) == 3 and buf.is_full
    assert [s["prompt"][0] for s in buf.state_dict()["samples"]] == [2, 3, 4]
    buf.push([_s(5)])
    assert [s["prompt"][0] for s in buf.state_dict()["samples"]] == [3, 4, 5]


def test_push_copies_and_sample_returns_copies():
    buf = ReplayBuffer(capacity=2)
    s = {"prompt": torch.tensor([1, 2]), "response": [3]}
    buf.push([s])
    s["response"].append(99)
    out = buf.sample(1, torch.Generator().manual_seed(0))
    assert out == [{"prompt": [1, 2], "response": [3]}]
    assert all(type(t) is int for t in out[0]["prompt"])
    out[0]["response"].append(7)
    assert buf.sample(1, torch.Generator().manual_seed(0))[0]["response"] == [3]


def test_sample_without_replacement_when_enough_and_with_replacement_otherwise():
    buf = ReplayBuffer(capacity=10)
    buf.push([_s(i) for i in range(5)])
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids = [s["prompt"][0] for s in buf.sample(5, g)]
        assert sorted(ids) == [0, 1, 2, 3, 4]  # a full-size draw is a permutation
    ids = [s["prompt"][0] for s in buf.sample(12, g)]
    assert len(ids) == 12 and set(ids) <= set(range(5))


def test_sampling_is_uniform():
    buf = ReplayBuffer(capacity=8)
    buf.push([_s(i) for i in range(8)])
    g = torch.Generator().manual_seed(123)
    counts = torch.zeros(8)
    draws = 4000
    for _ in range(draws):
        for s in buf.sample(2, g):
            counts[s["prompt"][0]] += 1
    expected = draws * 2 / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, counts)  # 7 dof: p(chi2 > 30) ~ 1e-4 under uniformity


def test_state_dict_round_trip_gives_identical_subsequent_samples():
    buf = ReplayBuffer(capacity=6)
    buf.push([_s(i) for i in range(9)])  # evictions happened
    g = torch.Generator().manual_seed(7)
    buf.sample(3, g)
    state, g_state = buf.state_dict(), g.get_state()
    expected = [buf.sample(4, g) for _ in range(5)]
    buf.push([_s(100)])
    expected.append(buf.state_dict()["samples"])

    restored = ReplayBuffer(capacity=6)
    restored.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(g_state)
    got = [restored.sample(4, g2) for _ in range(5)]
    restored.push([_s(100)])
    got.append(restored.state_dict()["samples"])
    assert got == expected


def test_errors():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=-3)
    buf = ReplayBuffer(capacity=4)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1, torch.Generator())
    buf.push([_s(0)])
    with pytest.raises(ValueError, match="n must"):
        buf.sample(0, torch.Generator())
    with pytest.raises(ValueError, match="capacity 8"):
        buf.load_state_dict(ReplayBuffer(capacity=8).state_dict())
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        buf.push([{"prompt": [1]}])
