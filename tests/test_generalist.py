"""The pieces of the generalist recipe: steps sized by the initial parameter scale,
staged training from an exported theta, validation loss where a family has it, and
suite splits set by the optimizer's own meta-training population."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis.eval_generalist import training_families
from es_l2o import export
from es_l2o.cli import UsageError, _initial_theta, _validation_where_possible
from es_l2o.lopt import HierarchicalLOpt, MLPLOpt
from es_l2o.unroll import LOptTraining
from populations import suites
from populations.digits import SoftmaxRegressionFamily
from populations.quadratic import QuadraticFamily

SMALL = {"lstm_size": 4, "bank_size": 2, "mix_size": 4}


def _second_step_norm(step_scale: str, outward: float) -> float:
    """The step after the parameters moved to `outward` times their first value."""
    lopt = HierarchicalLOpt(**SMALL, step_scale=step_scale)
    opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=100)
    params = {"w": jax.random.normal(jax.random.key(1), (8, 8))}
    grads = {"w": -params["w"]}  # pushes every weight outwards
    state = opt.init(params)
    _, state = opt.update(grads, state, params, value=jnp.array(1.0))
    moved = jax.tree.map(lambda p: outward * p, params)
    step, _ = opt.update(grads, state, moved, value=jnp.array(1.0))
    return float(jnp.linalg.norm(step["w"]))


def test_initial_step_scale_does_not_grow_with_the_parameters():
    for step_scale, low, high in (("initial", 0.5, 2.0), ("param", 5.0, 20.0)):
        ratio = _second_step_norm(step_scale, 10.0) / _second_step_norm(step_scale, 1.0)
        assert low < ratio < high, (step_scale, ratio)


def test_bad_step_scale_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="'param', 'initial'"):
        HierarchicalLOpt(**SMALL, step_scale="current")


def test_init_theta_starts_from_the_file_and_refuses_another_optimizer(tmp_path):
    lopt = HierarchicalLOpt(**SMALL, step_scale="initial")
    theta = jax.tree.map(lambda x: x + 0.5, lopt.init(jax.random.key(3)))
    path = tmp_path / "stage.safetensors"
    export.save(path, lopt, theta)
    loaded = _initial_theta({"init_theta": str(path)}, lopt, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(theta), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = HierarchicalLOpt(**SMALL)  # step_scale differs
    with pytest.raises(UsageError, match="step_scale"):
        _initial_theta({"init_theta": str(path)}, other, jax.random.key(0))
    with pytest.raises(UsageError, match="init_theta="):
        _initial_theta({"init_theta": str(tmp_path / "none")}, lopt, jax.random.key(0))


def test_validation_loss_where_a_family_has_a_split():
    made = []
    make = _validation_where_possible(lambda **kw: made.append(kw) or kw)
    lopt = MLPLOpt(hidden_sizes=(4,))
    for family in (QuadraticFamily(4), SoftmaxRegressionFamily(batch_size=8)):
        make(system=LOptTraining(family, lopt, horizon=4), meta_loss="validation")
    assert [kw["meta_loss"] for kw in made] == ["heldout", "validation"]


def test_generalist_population_sets_the_suite_splits():
    families = training_families("generalist")
    relabelled = suites.relabel(suites.get_suite("default"), families, 2000)
    entries = {e.name: e for e in relabelled}
    # meta-trained structures at trained horizons are in distribution ...
    for name in ("digits_cnn", "digits_mlp_32_reparam", "digits_mlp_32_long"):
        assert entries[name].split == "iid", name
    # ... families it never saw are not
    for name in ("digits_autoencoder", "char_transformer", "ackley_10d"):
        assert entries[name].split == "ood", name
