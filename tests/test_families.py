"""Several task families in one population (MultiFamilyES): the weighted meta-gradient,
each family on its own tasks, 8 devices as 1, bitwise resume, the CLI, memory."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from xla_flags import with_devices

from es_l2o.cli import train_main
from es_l2o.es import PES, FullES, MultiFamilyES, allocate_particles, family_state
from es_l2o.lopt import MLPLOpt
from es_l2o.meta import meta_train
from es_l2o.unroll import LOptTraining
from populations.functions import TestFunctionFamily
from populations.quadratic import QuadraticFamily

LOPT = MLPLOpt(hidden_sizes=(4,))
THETA = LOPT.init(jax.random.key(1))
WEIGHTS = (1.0, 3.0)
# parameter shapes (3,) and (2,), loss scales ~1e1 and ~1e2
FAMILIES = (QuadraticFamily(dim=3), TestFunctionFamily("rosenbrock", dim=2))


def _systems(horizon, stagger=False):
    return [LOptTraining(f, LOPT, horizon, stagger=stagger) for f in FAMILIES]


def _pes(system, population_size, mesh=None):
    return PES(
        system,
        population_size=population_size,
        std=0.01,
        truncation_length=3,
        optimizer=optax.adam(1e-2),
        mesh=mesh,
    )


def _full_es(system, population_size, mesh=None):
    return FullES(
        system,
        population_size=population_size,
        std=0.01,
        optimizer=optax.adam(1e-2),
        mesh=mesh,
    )


def _close(a, b, **kwargs):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs)


def test_particles_are_whole_pairs_in_proportion_to_the_weights():
    assert allocate_particles(16, [1.0, 1.0, 2.0]) == (4, 4, 8)
    assert allocate_particles(8, [1.0, 100.0]) == (2, 6)  # at least a pair each
    assert allocate_particles(32, [1.0, 3.0], num_devices=8) == (8, 24)
    assert sum(allocate_particles(64, [1, 1, 0.5, 1, 2, 1, 1])) == 64
    with pytest.raises(ValueError, match="population_size=12 cannot be split"):
        allocate_particles(12, [1.0, 1.0], num_devices=8)
    with pytest.raises(ValueError, match="weights must be one finite number > 0"):
        allocate_particles(8, [1.0, 0.0])


@pytest.fixture(scope="module", params=["pes", "full_es"])
def two_families(request):
    make, horizon = (_pes, (4, 9)) if request.param == "pes" else (_full_es, 4)
    systems = _systems(horizon, stagger=request.param == "pes")
    multi = MultiFamilyES.build(
        make, systems, WEIGHTS, population_size=8, names=("quad", "rosen")
    )
    singles = [make(s, p) for s, p in zip(systems, multi.population_sizes, strict=True)]
    return multi, singles


def test_meta_gradient_is_the_weighted_sum_of_single_family_estimates(two_families):
    multi, singles = two_families
    assert multi.population_sizes == (2, 6)
    key, step_key = jax.random.key(0), jax.random.key(5)
    state = multi.init(key, THETA)
    state, _ = multi.step(jax.random.key(4), state)  # theta and particles moved
    grad, aux = multi.gradient(step_key, state)
    grads, single_states = [], []
    for i, single in enumerate(singles):
        own = family_state(state, i)
        g, out = single.gradient(jax.random.fold_in(step_key, i), own)
        grads.append(g)
        single_states.append(out["state"])
    w = np.asarray(WEIGHTS) / sum(WEIGHTS)
    expected = jax.tree.map(lambda a, b: w[0] * a + w[1] * b, *grads)
    # float32 sums fused differently in the two programs: equal to rounding
    _close(grad, expected, rtol=1e-5, atol=1e-5)
    # each family's particles advanced exactly as its single-family estimator's
    for i, want in enumerate(single_states):
        _close(family_state(aux["state"], i), want, rtol=0, atol=0)
    metrics = aux["metrics"]
    assert {"meta_loss/quad", "meta_loss/rosen", "nonfinite_steps/rosen"} <= set(
        metrics
    )
    # unit_norm: each family's estimate scaled to norm 1 before the weights
    balanced = MultiFamilyES(
        multi.estimators, WEIGHTS, multi.names, gradient_balance="unit_norm"
    )
    grad, _ = balanced.gradient(step_key, state)
    norms = [optax.tree.norm(g) for g in grads]
    assert max(norms) > 3 * min(norms), norms  # the loss scales differ
    expected = jax.tree.map(
        lambda a, b: w[0] * a / norms[0] + w[1] * b / norms[1], *grads
    )
    _close(grad, expected, rtol=1e-4, atol=1e-6)


def test_gradient_balance_must_be_one_of_the_known_rules():
    with pytest.raises(ValueError, match="gradient_balance 'unit'.*unit_norm"):
        MultiFamilyES.build(
            _pes, _systems(4), WEIGHTS, population_size=8, gradient_balance="unit"
        )


def test_each_family_trains_its_own_tasks(two_families):
    multi, _ = two_families
    state = multi.init(jax.random.key(0), THETA)
    for i in range(2):
        state, metrics = multi.step(jax.random.key(10 + i), state)
    assert multi.step._cache_size() == 1, "the second step recompiled"
    assert np.isfinite(float(metrics["meta_loss"]))
    # one theta: the shared ES state is stored once, not per family
    assert all(own.es_state is None for own in state.families)
    if not hasattr(state.families[0], "inner"):
        return  # full unrolls keep no particles between iterations
    sizes = multi.population_sizes
    for family, own, size in zip(FAMILIES, state.families, sizes, strict=True):
        task = family.task(jax.tree.map(lambda x: x[0], own.inner.cfg))
        shapes = jax.tree.map(np.shape, task.init(jax.random.key(0)))
        assert jax.tree.map(lambda x: x.shape[1:], own.inner.params) == shapes
        assert own.inner.step.shape == (size,)


def test_two_family_pes_resumes_bitwise_from_a_checkpoint(tmp_path):
    multi = MultiFamilyES.build(
        _pes, _systems((4, 9), True), WEIGHTS, population_size=8
    )

    def train(folder, num_iterations, resume=None):
        return meta_train(
            multi,
            THETA,
            key=jax.random.key(3),
            num_iterations=num_iterations,
            metrics_path=folder / "metrics.jsonl",
            checkpoint_dir=folder / "checkpoints",
            checkpoint_every=2,
            progress=False,
            resume=resume,
        )

    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    whole = train(tmp_path / "whole", 4)
    train(tmp_path / "cut", 2)
    resumed = train(tmp_path / "cut", 4, resume=tmp_path / "cut" / "checkpoints")
    _close(resumed.state, whole.state, rtol=0, atol=0)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1, 2, 3]
    assert "meta_loss/rosenbrock" in json.loads(lines[-1])


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np, optax
    from es_l2o.es import PES, MultiFamilyES
    from es_l2o.lopt import MLPLOpt
    from es_l2o.sharding import population_mesh
    from es_l2o.unroll import LOptTraining
    from populations.functions import TestFunctionFamily
    from populations.quadratic import QuadraticFamily

    assert jax.device_count() == 8, jax.devices()
    lopt = MLPLOpt(hidden_sizes=(4,))
    families = (QuadraticFamily(dim=3), TestFunctionFamily("rosenbrock", dim=2))

    def run(cls, mesh, **kwargs):
        systems = [LOptTraining(f, lopt, (4, 9), stagger=cls is PES) for f in families]
        es = MultiFamilyES.build(cls, systems, (1.0, 3.0), population_size=32,
                                 mesh=mesh, std=0.01, optimizer=optax.adam(1e-2),
                                 **kwargs)
        assert es.population_sizes == (8, 24), es.population_sizes
        state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        for i in range(3):
            state, _ = es.step(jax.random.key(20 + i), state)
        assert es.step._cache_size() == 1, "the second step recompiled"
        return es.theta(state)

    # PES: per-particle states and stored per-pair rows split over the devices
    one = run(PES, population_mesh(1), truncation_length=3)
    eight = run(PES, population_mesh(8), truncation_length=3)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print("ok")
    """
)


def _subprocess(script, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_eight_devices_give_the_theta_of_one():
    out = _subprocess(SHARDED, {"XLA_FLAGS": with_devices(8)["XLA_FLAGS"]})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


MEMORY = textwrap.dedent(
    r"""
    import re, jax, optax
    from es_l2o.es import PES, MultiFamilyES
    from es_l2o.lopt import MLPLOpt
    from es_l2o.unroll import LOptTraining
    from populations.quadratic import QuadraticFamily

    lopt = MLPLOpt(hidden_sizes=(8,))
    theta = lopt.init(jax.random.key(0))
    system = LOptTraining(QuadraticFamily(), lopt, 20)
    es = PES(system, population_size=10_000_000, truncation_length=5)
    try:
        es.init(jax.random.key(1), theta)
        raise SystemExit("10 million particles were not refused")
    except MemoryError as err:
        assert "population_size=10000000" in str(err), err
    multi = MultiFamilyES.build(PES, [system, system], population_size=10_000_000,
                                truncation_length=5)
    try:
        multi.init(jax.random.key(1), theta)
        raise SystemExit("two families of 5 million particles were not refused")
    except MemoryError as err:
        assert "2 families" in str(err), err
    # this process's own peak (ru_maxrss would carry over the parent's at fork)
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20  # GiB
    assert peak < 2.0, f"peak memory {peak:.2f} GiB before the refusal"
    print("ok")
    """
)


def test_memory_check_covers_every_family_before_allocating():
    out = _subprocess(MEMORY)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_population_mix_trains_from_the_cli(tmp_path, capsys):
    families = (
        "[{_target_:populations.quadratic.QuadraticFamily,dim:3},"
        "{_target_:populations.functions.TestFunctionFamily,function:rosenbrock,"
        "dim:2}]"
    )
    argv = [
        "population=mix",
        "es=pes",
        f"population.families={families}",
        "population.weights=[1.0,3.0]",
        "es.population_size=8",
        "es.truncation_length=2",
        "system.horizon=4",
        "num_iterations=2",
        "lopt.hidden_sizes=[4]",
        "meta_validation.every=1",
        "meta_validation.num_tasks=2",
        "evaluation.num_tasks=2",
        "evaluation.learning_rates=[1e-3,1e-2]",
        "progress=false",
        f"run_dir={tmp_path}",
    ]
    assert train_main(argv) == 0
    printed = capsys.readouterr().out
    assert "particles per family {'quadratic': 2, 'rosenbrock': 6}" in printed
    lines = [
        json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert [x["iteration"] for x in lines] == [0, 1]
    for name in ("quadratic", "rosenbrock"):
        assert np.isfinite(lines[-1][f"meta_loss/{name}"])
        assert lines[-1][f"nonfinite_steps/{name}"] == 0
    assert lines[0]["meta_validation_loss"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["families"]) == {"quadratic", "rosenbrock"}
