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


def _first_step(lopt, theta, num_steps=100):
    opt = lopt.transform(theta, num_steps=num_steps)
    params = {"w": jax.random.normal(jax.random.key(1), (8, 8)), "b": jnp.zeros(5)}
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    step, _ = opt.update(grads, opt.init(params), params, value=jnp.array(1.0))
    return step


def test_normalized_update_size_is_set_by_the_tensor_network_alone():
    """Rescaling the per-parameter MLP's bank changes the raw update, not the
    normalised one, whose RMS is step_mult x scale (lr_mult ~1 at init)."""
    for normalize in (False, True):
        lopt = HierarchicalLOpt(**SMALL, normalize_update=normalize, step_mult=0.1)
        theta = lopt.init(jax.random.key(0))
        bigger = dict(theta, bank=jax.tree.map(lambda w: 1.5 * w, theta["bank"]))
        a, b = _first_step(lopt, theta), _first_step(lopt, bigger)
        ratio = float(jnp.linalg.norm(b["w"]) / jnp.linalg.norm(a["w"]))
        if normalize:
            assert abs(ratio - 1.0) < 1e-4, ratio
            rms = float(jnp.sqrt(jnp.mean(a["w"] ** 2)))
            scale = float(
                jnp.sqrt(jnp.mean(jax.random.normal(jax.random.key(1), (8, 8)) ** 2))
            )
            assert 0.5 < rms / (0.1 * scale) < 2.0, rms
        else:
            assert ratio > 1.5, ratio


def test_mean_square_ignores_padding():
    from es_l2o.lopt.hierarchical import _mean_square

    x = jnp.full((1, 4, 4), 7.0).at[:, :2, :3].set(1.0)  # true extent (1, 2, 3)
    assert float(_mean_square(x, jnp.array([1.0, 2.0, 3.0]))) == pytest.approx(1.0)


def test_cosine_schedule_shrinks_the_last_steps_tenfold():
    lopt = HierarchicalLOpt(**SMALL, schedule="cosine", step_scale="initial")
    const = HierarchicalLOpt(**SMALL, step_scale="initial")
    theta = lopt.init(jax.random.key(0))
    opt, ref = lopt.transform(theta, 10), const.transform(theta, 10)
    params = {"w": jax.random.normal(jax.random.key(1), (6, 6))}
    grads = {"w": jnp.ones((6, 6))}
    s1, s2 = opt.init(params), ref.init(params)
    ratios = []
    for _ in range(10):
        a, s1 = opt.update(grads, s1, params, value=jnp.array(1.0))
        b, s2 = ref.update(grads, s2, params, value=jnp.array(1.0))
        ratios.append(float(jnp.linalg.norm(a["w"]) / jnp.linalg.norm(b["w"])))
    assert ratios[0] == pytest.approx(1.0, rel=1e-4)
    assert ratios[-1] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 0.9)), rel=1e-3)
    assert all(x > y for x, y in zip(ratios[:-1], ratios[1:], strict=True))


def test_step_floor_sizes_only_the_zero_initialised_tensors_steps():
    theta = HierarchicalLOpt(**SMALL).init(jax.random.key(0))
    low, high = (
        _first_step(
            HierarchicalLOpt(**SMALL, step_scale="initial", step_floor=f), theta
        )
        for f in (0.01, 0.1)
    )
    ratio = lambda k: float(jnp.linalg.norm(high[k]) / jnp.linalg.norm(low[k]))
    assert ratio("b") == pytest.approx(10.0, rel=1e-3)  # zero bias: floored scale
    assert ratio("w") == pytest.approx(1.0, rel=1e-5)  # its RMS is above both floors


def test_floor_params_raises_the_floor_of_small_models_only():
    """The zero bias's step grows by sqrt(floor_params / N) in the 69-parameter
    model (capped), not at all where N >= floor_params; the weights, whose RMS is
    above every floor, keep their step."""
    theta = HierarchicalLOpt(**SMALL).init(jax.random.key(0))
    lopt = lambda **kw: HierarchicalLOpt(**SMALL, step_scale="initial", **kw)
    plain = _first_step(lopt(step_floor=0.01), theta)
    ratio = lambda step, k: float(jnp.linalg.norm(step[k]) / jnp.linalg.norm(plain[k]))
    for floor_params, cap, expected in (
        (276, 1.0, 2.0),
        (6900, 0.05, 5.0),
        (69, 1.0, 1.0),
    ):
        step = _first_step(
            lopt(step_floor=0.01, floor_params=floor_params, floor_cap=cap), theta
        )
        assert ratio(step, "b") == pytest.approx(expected, rel=1e-3), floor_params
        assert ratio(step, "w") == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="floor_params must be a positive integer"):
        HierarchicalLOpt(**SMALL, floor_params=0)


def test_weight_decay_pulls_each_tensor_towards_zero_as_adamw():
    theta = HierarchicalLOpt(**SMALL).init(jax.random.key(0))
    plain = _first_step(HierarchicalLOpt(**SMALL, step_mult=0.1), theta)
    decayed = _first_step(
        HierarchicalLOpt(**SMALL, step_mult=0.1, weight_decay=0.5), theta
    )
    params = jax.random.normal(jax.random.key(1), (8, 8))
    pull = decayed["w"] - plain["w"]  # -0.5 * lr_mult * 0.1 * p
    coef = float(jnp.sum(pull * params) / jnp.sum(params * params))
    assert -0.1 < coef < -0.01, coef
    np.testing.assert_allclose(np.asarray(pull), coef * np.asarray(params), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(decayed["b"]), np.asarray(plain["b"]))


def test_bad_step_scale_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="'param', 'initial'"):
        HierarchicalLOpt(**SMALL, step_scale="current")
    with pytest.raises(ValueError, match="'constant', 'cosine'"):
        HierarchicalLOpt(**SMALL, schedule="linear")


def test_init_theta_starts_from_the_file_and_refuses_other_sizes(tmp_path, capsys):
    lopt = HierarchicalLOpt(**SMALL, step_scale="initial")
    theta = jax.tree.map(lambda x: x + 0.5, lopt.init(jax.random.key(3)))
    path = tmp_path / "stage.safetensors"
    export.save(path, lopt, theta)
    loaded = _initial_theta({"init_theta": str(path)}, lopt, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(theta), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    recipe_change = HierarchicalLOpt(**SMALL, weight_decay=0.1)  # same shapes
    loaded = _initial_theta({"init_theta": str(path)}, recipe_change, None)
    assert jax.tree.structure(loaded) == jax.tree.structure(theta)
    said = capsys.readouterr().out
    assert "step_scale 'initial' -> 'param'" in said
    assert "weight_decay 0.0 -> 0.1" in said
    adapting = HierarchicalLOpt(**lopt.config() | {"step_adaptation": True})
    loaded = _initial_theta({"init_theta": str(path)}, adapting, None)
    assert "embedded in" in capsys.readouterr().out
    np.testing.assert_array_equal(loaded["bank"]["w0"], theta["bank"]["w0"])
    assert loaded["mix"]["w"].shape[0] == adapting.num_tensor_features
    bigger = HierarchicalLOpt(**{**SMALL, "lstm_size": SMALL["lstm_size"] + 1})
    with pytest.raises(UsageError, match="same sizes"):
        _initial_theta({"init_theta": str(path)}, bigger, jax.random.key(0))
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


def _steps(lopt, theta, grad_of, num=6):
    """`num` updates of a fixed (4, 4) tensor under `grad_of(step_index)`: the
    steps and the last state."""
    opt = lopt.transform(theta, num_steps=100)
    params = {"w": jax.random.normal(jax.random.key(1), (4, 4))}
    state, steps = opt.init(params), []
    for t in range(num):
        step, state = opt.update(grad_of(t), state, params, value=jnp.array(1.0))
        steps.append(step["w"])
    return steps, state


def _with_control(theta, w0: float, b: float = 0.0):
    control = {"w": jnp.zeros(3).at[0].set(w0), "b": jnp.asarray(b)}
    return dict(theta, step_control=control)


def test_embedded_theta_steps_exactly_as_its_source():
    source = HierarchicalLOpt(**SMALL, step_scale="initial", normalize_update=True)
    adapting = HierarchicalLOpt(**source.config() | {"step_adaptation": True})
    theta = source.init(jax.random.key(0))
    embedded = adapting.embed_theta(source, theta)
    template = jax.eval_shape(adapting.init, jax.random.key(0))
    assert jax.tree.structure(embedded) == jax.tree.structure(template)
    grad_of = lambda t: {"w": jnp.sin(t + jnp.arange(16.0)).reshape(4, 4)}
    want, _ = _steps(source, theta, grad_of)
    got, state = _steps(adapting, embedded, grad_of)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(state.log_step))) == 0.0
    with pytest.raises(ValueError, match="cannot take the theta"):
        adapting.embed_theta(HierarchicalLOpt(**SMALL), theta)  # other settings


def test_step_adaptation_grows_agreeing_steps_and_shrinks_oscillating_ones():
    """A constant gradient agrees with its momentum (cosine 1): a positive gain
    on that cosine raises the log step by LOG_STEP_RATE per step and the step with
    it; a gradient whose sign flips every step shrinks it."""
    from es_l2o.lopt.hierarchical import LOG_STEP_RATE

    lopt = HierarchicalLOpt(**SMALL, normalize_update=True, step_adaptation=True)
    theta = lopt.init(jax.random.key(0))
    constant = lambda _: {"w": jnp.ones((4, 4))}
    flipping = lambda t: {"w": (-1.0) ** t * jnp.ones((4, 4))}
    plain, _ = _steps(lopt, theta, constant)
    grown, state = _steps(lopt, _with_control(theta, 20.0), constant)
    # the first step has no momentum yet (cosine 0); every later one moves by the rate
    assert float(state.log_step[0]) == pytest.approx(5 * LOG_STEP_RATE, rel=1e-3)
    ratio = jnp.linalg.norm(grown[-1]) / jnp.linalg.norm(plain[-1])
    assert float(ratio) == pytest.approx(np.exp(5 * LOG_STEP_RATE), rel=1e-3)
    _, state = _steps(lopt, _with_control(theta, 20.0), flipping)
    assert float(state.log_step[0]) < -3 * LOG_STEP_RATE


def test_step_shrink_rate_undoes_a_grown_step_faster_than_it_grew():
    from es_l2o.lopt.hierarchical import LOG_STEP_RATE

    cfg = {**SMALL, "normalize_update": True, "step_adaptation": True}
    fast = HierarchicalLOpt(**cfg, step_shrink_rate=5 * LOG_STEP_RATE)
    theta = _with_control(fast.init(jax.random.key(0)), 20.0)
    flipping = lambda t: {"w": (-1.0) ** t * jnp.ones((4, 4))}
    _, state = _steps(fast, theta, flipping)
    assert float(state.log_step[0]) == pytest.approx(-25 * LOG_STEP_RATE, rel=1e-3)
    _, state = _steps(fast, theta, lambda _: {"w": jnp.ones((4, 4))})
    assert float(state.log_step[0]) == pytest.approx(5 * LOG_STEP_RATE, rel=1e-3)
    source = HierarchicalLOpt(**SMALL, normalize_update=True)
    assert fast.embed_theta(source, source.init(jax.random.key(0)))  # any rate
    with pytest.raises(ValueError, match="step_shrink_rate must be > 0, got 0"):
        HierarchicalLOpt(**cfg, step_shrink_rate=0)


def test_eval_generalist_skips_the_divergence_check_at_zero_steps():
    from analysis.eval_generalist import main, report

    empty = {"default": {"rows": [], "generalist_summary": {}}}
    assert report(empty, []).strip().endswith("Divergence check: skipped.")
    with pytest.raises(SystemExit) as err:
        main(["optimizer.safetensors", "--divergence-steps", "-1"])
    assert err.value.code == 2
