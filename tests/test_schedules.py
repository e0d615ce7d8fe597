"""schedules.py: end points, monotonicity, the cubic formula, explicit steps, argument errors."""

import itertools

import pytest

from lightning_prune.schedules import Constant, Cubic, Exponential, Linear, Steps, make_schedule

RAMPS = ("linear", "cubic", "exponential")


@pytest.mark.parametrize("name", RAMPS)
def test_ramps_hold_initial_before_start_and_final_from_end(name: str) -> None:
    schedule = make_schedule(name, 0.8, initial_sparsity=0.2, start_step=10, end_step=20)
    assert [schedule(step) for step in (0, 9, 10)] == [0.2, 0.2, 0.2]
    assert schedule(20) == pytest.approx(0.8, abs=1e-12)
    assert schedule(1000) == pytest.approx(0.8, abs=1e-12)


@pytest.mark.parametrize("name", RAMPS)
def test_ramps_are_monotone(name: str) -> None:
    schedule = make_schedule(name, 0.9, start_step=3, end_step=50)
    values = [schedule(step) for step in range(60)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.9)


def test_cubic_follows_zhu_gupta() -> None:
    # s(t) = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3 with s_i=0, s_f=0.8, t0=0, t1=4.
    schedule = Cubic(0.8, 0.0, 0, 4)
    assert [schedule(t) for t in range(5)] == pytest.approx([0.0, 0.8 * (1 - 0.75**3), 0.7, 0.8 * (1 - 0.25**3), 0.8])


def test_linear_and_exponential_midpoints() -> None:
    assert Linear(0.6, 0.2, 0, 4)(1) == pytest.approx(0.3)
    # Fast early growth: above linear in the middle.
    assert Exponential(0.5, 0.0, 0, 10)(5) > Linear(0.5, 0.0, 0, 10)(5)


def test_constant_jumps_at_start() -> None:
    schedule = make_schedule("constant", 0.5, start_step=7)
    assert isinstance(schedule, Constant)
    assert [schedule(6), schedule(7), schedule(100)] == [0.0, 0.5, 0.5]


def test_steps_schedule() -> None:
    schedule = make_schedule("steps", 0.0, milestones=[2, 5, 9], values=[0.1, 0.3, 0.6])
    assert [schedule(t) for t in (0, 1, 2, 4, 5, 8, 9, 50)] == [0.0, 0.0, 0.1, 0.1, 0.3, 0.3, 0.6, 0.6]
    assert (schedule.final, schedule.end) == (0.6, 9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="cubic", sparsity=1.0), r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        (dict(name="cubic", sparsity=-0.1), r"`sparsity`.*-0.1"),
        (dict(name="linear", sparsity=0.5, initial_sparsity=0.6), r"`initial_sparsity` \(0.6\).*`sparsity` \(0.5\)"),
        (dict(name="cubic", sparsity=0.5, start_step=5, end_step=5), r"start_step=5, end_step=5"),
        (dict(name="cubic", sparsity=0.5, start_step=-1, end_step=5), r"start_step=-1"),
        (dict(name="cosine", sparsity=0.5), r"`schedule` must be one of .*'cosine'"),
        (dict(name="exponential", sparsity=0.5, rate=0.0), r"`rate` must be > 0, got 0.0"),
    ],
)
def test_invalid_ramp_arguments_raise(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_schedule(name, **kwargs)


@pytest.mark.parametrize(
    ("milestones", "values", "match"),
    [
        ([], [], r"`milestones` and `values` must be non-empty"),
        ([1, 2], [0.1], r"equal length, got \[1, 2\] and \[0.1\]"),
        ([3, 2], [0.1, 0.2], r"`milestones` must be strictly increasing, got \[3, 2\]"),
        ([1, 2], [0.5, 0.2], r"`values` must be non-decreasing.*\[0.5, 0.2\]"),
        ([1], [1.5], r"`values` must be a number in \[0, 1\), got 1.5"),
    ],
)
def test_invalid_steps_raise(milestones: list, values: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Steps(milestones, values)
