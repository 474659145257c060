"""AdaptiveSGOScheduler: exact phi trajectory (spec §2), replay-ratio schedules, state, errors."""

import pytest

from distillm_tune.sgo.scheduler import AdaptiveSGOScheduler


def test_phi_trajectory_for_scripted_validation_losses():
    s = AdaptiveSGOScheduler(total_steps=100, phi0=0.0, num_stages=10, tolerance=0.1)
    s.start(2.0)
    script = [
        # (val_loss, expected return, expected phi, expected L_prev)
        (2.05, False, 0.0, 2.0),  # rise within tolerance
        (2.0 + 0.1, False, 0.0, 2.0),  # exactly L_prev + eps: no increase
        (2.1000001, True, 0.1, 2.1000001),
        (1.5, False, 0.1, 2.1000001),  # a drop changes nothing (L_prev is not lowered)
        (2.2, False, 0.1, 2.1000001),  # 2.2 <= 2.1000001 + 0.1
        (2.3, True, 0.2, 2.3),
        (2.5, True, 0.3, 2.5),
    ]
    for loss, ret, phi, prev in script:
        assert s.update(loss) is ret
        assert s.phi == pytest.approx(phi, abs=1e-12)
        assert s.prev_val_loss == prev


def test_phi_capped_at_one():
    s = AdaptiveSGOScheduler(total_steps=10, phi0=0.2, num_stages=4, tolerance=0.0)
    s.start(0.0)
    phis = []
    for k in range(1, 7):
        assert s.update(float(k)) is True
        phis.append(s.phi)
    assert phis == [0.45, 0.7, 0.95, 1.0, 1.0, 1.0]
    s = AdaptiveSGOScheduler(total_steps=10, num_stages=10, tolerance=0.0)
    s.start(0.0)
    for k in range(1, 11):
        s.update(float(k))
    assert s.phi == 1.0  # exactly, no float drift from ten additions of 0.1


@pytest.mark.parametrize(
    "kind, expected", [("decreasing", (1.0, 0.5, 0.0)), ("constant", (0.5, 0.5, 0.5)), ("increasing", (0.0, 0.5, 1.0))]
)
def test_replay_ratio_schedules(kind, expected):
    s = AdaptiveSGOScheduler(total_steps=200, phi0=0.6, replay_ratio=kind)
    got = tuple(s.replay_ratio_at(t) for t in (0, 100, 200))
    assert got == expected
    assert tuple(s.sgo_prob(t) for t in (0, 100, 200)) == pytest.approx(tuple(0.6 * e for e in expected))


def test_state_dict_round_trip():
    s = AdaptiveSGOScheduler(total_steps=50, phi0=0.1, num_stages=5, tolerance=0.2)
    s.start(1.0)
    s.update(1.5)
    s.update(2.0)
    t = AdaptiveSGOScheduler(total_steps=50, phi0=0.1, num_stages=5, tolerance=0.2)
    t.load_state_dict(s.state_dict())
    assert (t.phi, t.prev_val_loss) == (s.phi, s.prev_val_loss)
    for loss in (2.1, 2.3, 2.35, 2.6):
        assert t.update(loss) == s.update(loss)
        assert (t.phi, t.prev_val_loss) == (s.phi, s.prev_val_loss)
    with pytest.raises(ValueError, match="num_stages"):
        AdaptiveSGOScheduler(total_steps=50, phi0=0.1, num_stages=4).load_state_dict(s.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_steps=0), "total_steps.*0"),
        (dict(total_steps=10, phi0=1.5), "phi0.*1.5"),
        (dict(total_steps=10, phi0=-0.1), "phi0.*-0.1"),
        (dict(total_steps=10, num_stages=0), "num_stages.*0"),
        (dict(total_steps=10, tolerance=-0.5), "tolerance.*-0.5"),
        (dict(total_steps=10, replay_ratio="cosine"), "replay_ratio.*cosine"),
    ],
)
def test_constructor_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveSGOScheduler(**kwargs)


def test_usage_errors():
    s = AdaptiveSGOScheduler(total_steps=10)
    with pytest.raises(ValueError, match="before start"):
        s.update(1.0)
    with pytest.raises(ValueError, match="finite"):
        s.start(float("nan"))
    s.start(1.0)
    with pytest.raises(ValueError, match="finite"):
        s.update(float("inf"))
    with pytest.raises(ValueError, match="step.*11"):
        s.replay_ratio_at(11)
    with pytest.raises(ValueError, match="step.*-1"):
        s.sgo_prob(-1)
