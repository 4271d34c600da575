"""The meta-training loop's collaborators, each alone: RunLog, Checkpointer,
Validator / BestTheta, the meta-validation losses; then `meta.train` composing them."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es_l2o import checkpoint
from es_l2o.checkpointer import Checkpointer, Snapshot
from es_l2o.evaluate import heldout_keys
from es_l2o.lopt import MLPLOpt
from es_l2o.meta import train
from es_l2o.run_log import RunLog
from es_l2o.tasks import ToyQuadraticFamily
from es_l2o.unroll import LOptTraining
from es_l2o.validation import (
    BestTheta,
    Validator,
    meta_validation_loss,
    mixture_validation_loss,
    validation_keys,
)

# --- RunLog ----------------------------------------------------------------------


def test_run_log_appends_counts_and_cuts_back_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with RunLog(path, progress=False).open(total=3) as log:
        for i in range(3):
            log.write({"iteration": i, "meta_loss": float(i)})
    assert log.position == 3
    # a new run appends after what is there; a resumed one first cuts back
    with RunLog(path, progress=False).open(total=5, start=3) as log:
        assert log.position == 3
    with RunLog(path, progress=False).open(total=3, start=1, position=1) as log:
        log.write({"iteration": 1, "meta_loss": 9.0})
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["meta_loss"] for x in lines] == [0.0, 9.0]
    assert log.position == 2


def test_run_log_without_sinks_still_counts_the_checkpoint_position():
    with RunLog(progress=False).open(total=2, position=4) as log:
        log.write({"iteration": 0})
    assert log.position == 4  # nothing written: the position stays the checkpoint's


# --- Checkpointer ----------------------------------------------------------------


def test_checkpointer_is_due_every_k_and_at_the_end():
    assert [i for i in range(1, 8) if Checkpointer(every=3).due(i, 7)] == [3, 6, 7]
    assert [i for i in range(1, 8) if Checkpointer().due(i, 7)] == [7]
    with pytest.raises(ValueError, match="every must be an integer >= 0, got -1"):
        Checkpointer(every=-1)
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
        Checkpointer(keep=0)


def test_checkpointer_writes_once_per_iteration_and_refuses_a_used_folder(tmp_path):
    calls = []
    saver = Checkpointer(
        tmp_path, keep=2, on_checkpoint=lambda i, s: calls.append((i, s["w"].sum()))
    )
    assert not Checkpointer().active and saver.active
    saver.check_fresh()  # empty: fine
    state = {"w": jnp.ones(2)}
    first = saver.save(Snapshot(state, jax.random.key(0), 2, 2))
    assert saver.save(Snapshot(state, jax.random.key(0), 2, 2)) == first
    saver.save(Snapshot(state, jax.random.key(0), 4, 4))
    assert [i for i, _ in calls] == [2, 4]
    assert [checkpoint.iteration_of(p) for p in checkpoint.checkpoints(tmp_path)] == [
        2,
        4,
    ]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Checkpointer(tmp_path).check_fresh()


# --- Validator, BestTheta, meta-validation ---------------------------------------


def test_best_theta_takes_only_finite_improvements():
    best = BestTheta(math.nan, 0, "initial")
    best = best.offer(math.nan, 1, "nan")  # NaN never wins
    assert best.theta == "initial"
    best = best.offer(2.0, 2, "a")  # a finite loss beats a NaN best
    best = best.offer(2.0, 3, "tie")  # a tie keeps the earlier theta
    best = best.offer(math.inf, 4, "inf")
    assert (best.loss, best.iteration, best.theta) == (2.0, 2, "a")


def test_validator_schedule_and_bad_settings():
    v = Validator(lambda t: t + 1, every=0)
    assert [i for i in range(1, 6) if v.due(i, 5)] == [5]
    assert v(1) == 2.0 and isinstance(v(1), float)
    with pytest.raises(ValueError, match="every must be an integer >= 0, got -2"):
        Validator(lambda t: t, every=-2)


def test_validation_tasks_are_their_own_stream():
    a = np.asarray(jax.random.key_data(validation_keys(3, 4)))
    b = np.asarray(jax.random.key_data(heldout_keys(3, 4)))
    assert len({tuple(k) for k in a} | {tuple(k) for k in b}) == 8
    np.testing.assert_array_equal(a, jax.random.key_data(validation_keys(3, 4)))
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        validation_keys(0, 0)


@pytest.fixture(scope="module")
def systems():
    lopt = MLPLOpt(hidden_sizes=(4,))
    return lopt, [
        LOptTraining(ToyQuadraticFamily(dim=d), lopt, horizon=3) for d in (2, 3)
    ]


def test_meta_validation_loss_is_fixed_and_ranks_thetas(systems):
    lopt, (system, _) = systems
    loss = meta_validation_loss(system, num_tasks=2, seed=0)
    theta = lopt.init(jax.random.key(0))
    assert loss(theta) == loss(theta)  # the same tasks every call
    assert loss(theta) != meta_validation_loss(system, num_tasks=2, seed=1)(theta)
    with pytest.raises(ValueError, match="meta_loss must be one of"):
        meta_validation_loss(system, num_tasks=2, seed=0, meta_loss="best")


def test_mixture_validation_is_relative_to_the_initial_theta(systems):
    lopt, both = systems
    theta0 = lopt.init(jax.random.key(0))
    loss = mixture_validation_loss(both, [1.0, 3.0], theta0, num_tasks=2, seed=0)
    assert loss(theta0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 systems but 1 weights"):
        mixture_validation_loss(both, [1.0], theta0, num_tasks=2, seed=0)


# --- the loop composes them ------------------------------------------------------


class _Countdown:
    """A stand-in estimator whose theta walks 5, 4, 3, ... (one step per iteration)."""

    def init(self, key, theta):
        del key
        return {"theta": theta}

    def theta(self, state):
        return state["theta"]

    def step(self, key, state):
        del key
        theta = state["theta"] - 1.0
        return {"theta": theta}, {"meta_loss": theta, "theta_finite": True}


def test_train_validates_when_due_and_returns_the_best_theta(tmp_path):
    # validation loss |theta - 2|: theta 5 -> 0 over 5 iterations is best at 2
    validator = Validator(lambda t: abs(float(t) - 2.0), every=1)
    result = train(
        _Countdown(),
        jnp.float32(5.0),
        key=jax.random.key(0),
        num_iterations=5,
        log=RunLog(tmp_path / "metrics.jsonl", progress=False),
        checkpointer=Checkpointer(tmp_path / "checkpoints", every=2),
        validator=validator,
    )
    assert (result.best_iteration, float(result.best_theta)) == (3, 2.0)
    assert [r["meta_validation_loss"] for r in result.history] == [2, 1, 0, 1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    saved = checkpoint.checkpoints(tmp_path / "checkpoints")
    assert [checkpoint.iteration_of(p) for p in saved] == [2, 4, 5]


@pytest.mark.parametrize("draw", ["episodes", "steps"])
def test_horizon_draw_spreads_episodes_or_steps_evenly_over_octaves(draw):
    system = LOptTraining(
        ToyQuadraticFamily(dim=2),
        MLPLOpt(hidden_sizes=(4,)),
        (50, 1599),
        horizon_draw=draw,
    )
    keys = jax.random.split(jax.random.key(0), 40_000)
    horizons = np.asarray(jax.vmap(system.sample_horizon)(keys))
    assert horizons.min() >= 50 and horizons.max() <= 1599
    octave = np.floor(np.log2(horizons / 50)).astype(int)  # 0..4
    weight = np.ones_like(horizons) if draw == "episodes" else horizons
    share = np.bincount(octave, weights=weight, minlength=5) / weight.sum()
    np.testing.assert_allclose(share, 0.2, atol=0.02)
