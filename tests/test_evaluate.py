"""The speedup of a learned optimizer over a baseline, on hand-made loss curves."""

import jax
import numpy as np
import pytest

from es_l2o.evaluate import heldout_keys, smooth, speedup, steps_to_reach


def test_steps_to_reach_counts_steps_not_indices():
    curve = np.array([5.0, 4.0, 3.0, 3.0, 1.0])
    assert steps_to_reach(curve, 3.0) == 3
    assert steps_to_reach(curve, 5.0) == 1
    assert steps_to_reach(curve, 0.5) is None


def test_speedup_when_the_baseline_gets_there():
    # the learned optimizer reached 1.0 after its 4-step horizon; the baseline
    # needs 6 of its 8 steps: speedup 1.5
    baseline = np.array([8, 7, 6, 5, 3, 1.0, 0.9, 0.8])
    assert speedup(baseline, target=1.0, horizon=4) == (1.5, True)
    # a baseline that is faster gives a speedup below 1
    assert speedup(baseline, target=6.0, horizon=4) == (0.75, True)


def test_speedup_is_capped_and_marked_when_never_reached():
    baseline = np.array([8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    value, reached = speedup(baseline, target=1.0, horizon=3)
    assert (value, reached) == (2.0, False)
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        speedup(baseline, target=1.0, horizon=0)


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(smooth(np.array([4.0, 2.0, 0.0, 2.0]), 2), [4, 3, 1, 1])
    np.testing.assert_allclose(smooth(np.array([1.0, 2.0]), 1), [1.0, 2.0])


def test_heldout_keys_differ_between_seeds_and_never_repeat():
    a = jax.random.key_data(heldout_keys(0, 4))
    b = jax.random.key_data(heldout_keys(1, 4))
    assert len({tuple(np.asarray(k)) for k in a}) == 4
    assert not np.array_equal(a, b)
