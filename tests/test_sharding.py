"""The population axis over 8 (forced host) devices: the same theta as on one
device, for full-unroll and truncated estimators, full-rank and low-rank."""

import subprocess
import sys
import textwrap

import pytest
from xla_flags import with_devices

from es_l2o import sharding

SCRIPT = textwrap.dedent(
    """
    import math, re
    import jax, numpy as np, optax
    from es_l2o.es import FullES
    from es_l2o.lopt import MLPLOpt
    from es_l2o.sharding import population_mesh
    from es_l2o.unroll import LOptTraining
    from populations.quadratic import QuadraticFamily

    assert jax.device_count() == 8, jax.devices()
    lopt = MLPLOpt(hidden_sizes=(4,))
    system = LOptTraining(QuadraticFamily(), lopt, horizon=4)

    def compiled_text(es, key, state):
        # a second compile of the step: only where a test reads the program
        return es.step.lower(key, state).compile().as_text()

    def run(mesh, chunk=None, inspect=True):
        es = FullES(system, population_size=16, std=0.01, optimizer=optax.adam(1e-2),
                    mesh=mesh, particle_chunk=chunk)
        state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        for i in range(2):
            state, _ = es.step(jax.random.key(10 + i), state)
        assert es.step._cache_size() == 1, "the second step recompiled"
        if not inspect:
            return es.theta(state), None, None
        text = compiled_text(es, jax.random.key(0), state)
        return es.theta(state), theta_rows(text, es.num_dims), text

    def theta_rows(text, d):
        # the most thetas (or perturbations) one device's compiled program holds: the
        # largest f32 buffer with a D-sized axis (or a flat multiple of D), over D
        rows = 0
        for dims in re.findall(r"f32\\[([\\d,]+)\\]", text):
            dims = [int(x) for x in dims.split(",")]
            if d in dims or (len(dims) == 1 and dims[0] % d == 0):
                rows = max(rows, math.prod(dims) // d)
        return rows

    from es_l2o.es import PES
    from populations.digits import DigitsMLPFamily

    pes_system = LOptTraining(
        DigitsMLPFamily(hidden_sizes=(4,), batch_size=8), lopt, horizon=(3, 9),
        stagger=True,
    )

    def run_pes(mesh, noise="stored", estimator=PES, rank=None, inspect=False):
        es = estimator(pes_system, population_size=16, std=0.01, truncation_length=3,
                       optimizer=optax.adam(1e-2), mesh=mesh, noise=noise, rank=rank)
        state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        for i in range(3):
            state, _ = es.step(jax.random.key(20 + i), state)
        assert es.step._cache_size() == 1, "the second PES step recompiled"
        if not inspect:
            return es.theta(state), None
        text = compiled_text(es, jax.random.key(0), state)
        return es.theta(state), theta_rows(text, es.num_dims)

    # summation order across devices differs: theta agrees to float tolerance
    for noise in ("stored", "keys"):
        one_pes, _ = run_pes(population_mesh(1), noise)
        full_rank = one_pes if noise == "stored" else full_rank
        eight_pes, rows = run_pes(population_mesh(8), noise, inspect=True)
        for a, b in zip(jax.tree.leaves(one_pes), jax.tree.leaves(eight_pes)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        # each device holds the noise of its own 2 particles only, never the 8
        # pairs' or 16 particles' rows (keys: two Brownian-path points each;
        # stored: its block of 2 pairs' accumulators)
        assert rows == (2 if noise == "stored" else 4), (noise, rows)
    # noise reuse switches stored particles to fresh rows drawn on their devices
    from es_l2o.es import NoiseReuseES
    reuse_one, _ = run_pes(population_mesh(1), "stored", NoiseReuseES)
    reuse_eight, _ = run_pes(population_mesh(8), "stored", NoiseReuseES)
    for a, b in zip(jax.tree.leaves(reuse_one), jax.tree.leaves(reuse_eight)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # low-rank (EGGROLL) perturbations of theta's matrices: each pair's factors
    # and scores live on its particles' device
    low_one, _ = run_pes(population_mesh(1), rank=1)
    low_eight, _ = run_pes(population_mesh(8), rank=1)
    for a, b in zip(jax.tree.leaves(low_one), jax.tree.leaves(low_eight)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not all(np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(low_one), jax.tree.leaves(full_rank)))  # rank took effect

    one, _, _ = run(population_mesh(1), inspect=False)
    eight, rows, text = run(population_mesh(8))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the unroll was partitioned: each device trains 16 / 8 = 2 particles
    assert "f32[2,10]" in text, "no per-device slice of the population in the program"
    # keyed noise: no device holds the (16, D) population or the (8, D) draws,
    # only the thetas of its own particles (chunk at a time)
    assert rows == 2, f"a device holds {rows} thetas, not its 2 particles'"
    # chunked unrolls (a loop over each device's particles) change nothing
    for mesh, chunk in ((population_mesh(1), 4), (population_mesh(8), 1)):
        chunked, rows, text = run(mesh, chunk)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(chunked)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert rows == chunk, f"a device holds {rows} thetas, not a chunk of {chunk}"
    assert "f32[1,10]" in text, "no per-device chunk of one particle in the program"
    # the keyed gradient split over 8 devices: pairs when the 4 pairs do not split
    # over them are summed per particle; without antithetic sampling too
    from es_l2o.es.keyed import KeyedOpenES
    for antithetic in (True, False):
        keyed = KeyedOpenES(8, np.zeros(11, np.float32),
                            use_antithetic_sampling=antithetic)
        w = np.linspace(-1.0, 1.0, 8).astype(np.float32)
        dot = jax.jit(keyed.noise_dot, static_argnums=(2, 3))
        np.testing.assert_allclose(
            dot(jax.random.key(3), w, population_mesh(8), None),
            dot(jax.random.key(3), w, None, None), rtol=1e-5, atol=1e-6)
    print("SAME_THETA")
    """
)


def _run_on_eight_devices(script: str, marker: str, timeout: int) -> None:
    """Runs `script` in a child process with 8 forced CPU devices; it must print
    `marker` and exit cleanly."""
    env = with_devices(8)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker in proc.stdout


def test_eight_devices_give_the_same_theta_as_one():
    _run_on_eight_devices(SCRIPT, "SAME_THETA", timeout=600)


SPLIT = textwrap.dedent(
    """
    import jax
    from es_l2o import sharding
    from es_l2o.es import FullES, PES, MultiFamilyES
    from es_l2o.lopt import MLPLOpt
    from es_l2o.unroll import LOptTraining
    from populations.quadratic import QuadraticFamily

    assert jax.device_count() == 8, jax.devices()
    lopt = MLPLOpt(hidden_sizes=(4,))
    system = LOptTraining(QuadraticFamily(), lopt, horizon=4)
    eight, four = sharding.population_mesh(8), sharding.population_mesh(4)
    sharding.check_population(5, sharding.population_mesh(1))  # one device: any
    sharding.check_population(16, eight)
    sharding.check_population(12, four)  # 12 splits over 4 of the 8 devices
    builds = {
        "check": lambda p, mesh: sharding.check_population(p, mesh),
        "FullES": lambda p, mesh: FullES(system, population_size=p, mesh=mesh),
        "PES": lambda p, mesh: PES(system, population_size=p, mesh=mesh),
        "MultiFamilyES": lambda p, mesh: MultiFamilyES.build(
            PES, [system, system], population_size=p, mesh=mesh),
    }
    for name, build in builds.items():
        build(16, eight)  # divides: accepted
        try:
            build(12, eight)
        except ValueError as err:
            text = str(err)
            assert "12" in text and "such as 16" in text, (name, text)
        else:
            raise AssertionError(f"{name} accepted 12 particles on 8 devices")
    try:
        sharding.population_mesh(9)
    except ValueError as err:
        assert "num_devices must lie in [1, 8]" in str(err), err
    else:
        raise AssertionError("a mesh of 9 of 8 devices was built")
    print("SPLIT_OK")
    """
)


def test_population_must_split_evenly_over_several_devices():
    _run_on_eight_devices(SPLIT, "SPLIT_OK", timeout=300)


def test_particle_chunk_must_divide_each_devices_particles():
    mesh = sharding.population_mesh(1)
    assert sharding.check_particle_chunk(None, 12, mesh) is None
    assert sharding.check_particle_chunk(4, 12, mesh) == 4
    assert sharding.check_particle_chunk(64, 12, mesh) is None  # one chunk: a vmap
    with pytest.raises(
        ValueError, match=r"particle_chunk 5 .* one of \[1, 2, 3, 4, 6, 12\]"
    ):
        sharding.check_particle_chunk(5, 12, mesh)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        sharding.check_particle_chunk(0, 12, mesh)


def test_memory_check_names_a_population_and_device_count_that_fit():
    mesh = sharding.population_mesh(1)
    with pytest.raises(
        MemoryError,
        match=r"population_size=4096 .* population_size <= 1024 or at least 4 devices",
    ):
        sharding.check_memory(
            population_size=4096,
            bytes_per_particle=1000,
            replicated_bytes=0,
            mesh=mesh,
            device_bytes=2_048_000,
        )
    sharding.check_memory(  # fits: no error
        population_size=1024,
        bytes_per_particle=1000,
        replicated_bytes=0,
        mesh=mesh,
        device_bytes=2_048_000,
    )
