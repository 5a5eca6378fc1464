"""service.batch_cost: the measured cost of each batch size, and the largest batch within a time."""

import pytest

from service.batch_cost import TARGET_FLOOR_S, BatchCost, default_target


def test_sizes_not_seen_are_interpolated_between_seen_ones_and_extrapolated_in_proportion() -> None:
    cost = BatchCost({1: 0.010, 8: 0.080})
    assert cost.estimate(4) == pytest.approx(0.010 + 3 / 7 * 0.070)
    assert cost.estimate(16) == pytest.approx(0.160)  # beyond the largest seen: in proportion
    assert BatchCost({4: 0.040}).estimate(2) == pytest.approx(0.020)
    assert BatchCost().estimate(3) is None


def test_the_largest_batch_within_a_time() -> None:
    cost = BatchCost({1: 0.010, 8: 0.080})
    assert cost.largest_within(0.045, 8) == 4
    assert cost.largest_within(1.0, 8) == 8       # never over the count cap
    assert cost.largest_within(0.001, 8) == 1     # one image even when it takes longer than the target
    assert BatchCost().largest_within(0.001, 8) == 8  # nothing measured yet: the count cap alone


def test_observations_move_the_estimate_towards_the_present() -> None:
    cost = BatchCost({2: 0.020})
    for _ in range(30):
        cost.observe(2, 0.040)  # the machine got busier
    assert 0.039 < cost.estimate(2) <= 0.040
    cost.observe(2, float("nan"))
    cost.observe(0, 1.0)
    assert set(cost.seen) == {2}


def test_the_default_target_is_four_single_images_and_never_below_the_floor() -> None:
    assert default_target(0.020) == pytest.approx(0.080)
    assert default_target(0.0005) == TARGET_FLOOR_S
