"""Every registered learned optimizer behaves like an optax transform, and survives a
save / load round trip; bad files are refused with clear errors."""

import hashlib
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from es_l2o import export
from es_l2o.lopt import LOPTS, MLPLOpt

PARAMS = {
    "scalar": jnp.array(0.5, jnp.float32),
    "vector": jnp.linspace(-1.0, 1.0, 3),
    "matrix": jnp.arange(20.0).reshape(4, 5) / 20.0,
    "conv": jnp.ones((3, 3, 2, 4)) * 0.1,
}


def _grads(params, scale=1.0):
    return jax.tree.map(lambda p: scale * (jnp.cos(p) + 0.1), params)


@pytest.fixture(scope="module", params=sorted(LOPTS))
def saved(request, tmp_path_factory):
    """(lopt, theta, path to its saved file) for every registered architecture."""
    lopt = LOPTS[request.param]()
    theta = lopt.init(jax.random.key(0))
    path = tmp_path_factory.mktemp(request.param) / "opt.eslo"
    export.save(path, lopt, theta, note="test")
    return lopt, theta, path


def _run(opt, params, steps=3, dtype=None, value=1.0):
    if dtype is not None:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    state = opt.init(params)
    update = jax.jit(opt.update)
    compiled = []
    for i in range(steps):
        grads = _grads(params, 1.0 + i)
        updates, state = update(grads, state, params, value=jnp.float32(value))
        params = optax.apply_updates(params, updates)
        compiled.append(update._cache_size())
    return updates, state, compiled


def test_round_trip_gives_identical_updates(saved):
    lopt, theta, path = saved
    original = lopt.transform(theta, num_steps=50)
    loaded = export.load(path, num_steps=50)
    a, _, _ = _run(original, PARAMS)
    b, _, _ = _run(loaded, PARAMS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    _, _, metadata = export.load_theta(path)
    assert metadata == {"note": "test"}


def test_updates_are_finite_nonzero_and_keep_shape_and_dtype(saved):
    lopt, theta, _ = saved
    opt = lopt.transform(theta, num_steps=50)
    for dtype in (jnp.float32, jnp.bfloat16):
        updates, _, compiled = _run(opt, PARAMS, dtype=dtype)
        for name, u in updates.items():
            assert u.shape == PARAMS[name].shape and u.dtype == dtype, name
            assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))), name
        assert optax.tree.norm(updates) > 0
        assert compiled[1:] == compiled[:1] * 2, "a later update call recompiled"


def test_init_works_on_abstract_inputs(saved):
    lopt, theta, _ = saved
    opt = lopt.transform(theta, num_steps=10)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), PARAMS)
    expected = jax.eval_shape(opt.init, PARAMS)
    got = jax.eval_shape(opt.init, abstract)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(expected)
    ]
    assert isinstance(opt.init(abstract), tuple)  # a NamedTuple state


def test_chain_multisteps_and_extra_arguments(saved):
    lopt, theta, _ = saved
    opt = lopt.transform(theta, num_steps=20)
    chained = optax.chain(opt, optax.scale(2.0))
    # jitted as in training (and one compile beats hundreds of eager dispatches)
    updates, _ = jax.jit(
        lambda g, s, p: chained.update(g, s, p, value=jnp.asarray(1.0), unknown=3)
    )(_grads(PARAMS), chained.init(PARAMS), PARAMS)
    single, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.asarray(1.0)))(
        _grads(PARAMS), opt.init(PARAMS), PARAMS
    )
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, 2.0 * b, rtol=1e-5, atol=1e-7)

    multi = optax.MultiSteps(opt, every_k_schedule=2)
    multi_update = jax.jit(
        lambda g, s, p: multi.update(g, s, p, value=jnp.asarray(1.0))
    )
    state = multi.init(PARAMS)
    first, state = multi_update(_grads(PARAMS), state, PARAMS)
    second, state = multi_update(_grads(PARAMS), state, PARAMS)
    assert optax.tree.norm(first) == 0  # accumulating
    np.testing.assert_allclose(
        optax.tree.norm(second), optax.tree.norm(single), rtol=1e-4
    )


def test_empty_pytree_and_lone_scalar(saved):
    lopt, theta, _ = saved
    opt = lopt.transform(theta, num_steps=5)
    updates, _ = opt.update({}, opt.init({}), {}, value=jnp.asarray(1.0))
    assert updates == {}
    scalar = jnp.array(2.0)
    updates, _ = opt.update(
        jnp.array(0.3), opt.init(scalar), scalar, value=jnp.asarray(1.0)
    )
    assert updates.shape == () and bool(jnp.isfinite(updates))


def test_traced_num_steps_under_vmap(saved):
    lopt, theta, _ = saved

    def first_update(num_steps):
        opt = lopt.transform(theta, num_steps)
        updates, _ = opt.update(_grads(PARAMS), opt.init(PARAMS), PARAMS, value=1.0)
        return updates

    out = jax.jit(jax.vmap(first_update))(jnp.array([10, 1000], jnp.int32))
    assert jax.tree.leaves(out)[0].shape[0] == 2


# --- bad files and bad arguments (architecture-independent) ---


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    lopt = MLPLOpt(hidden_sizes=(4,))
    path = tmp_path_factory.mktemp("mlp") / "opt.eslo"
    export.save(path, lopt, lopt.init(jax.random.key(0)))
    return path


@pytest.mark.parametrize("num_steps", [0, -5, 2.5, "100", True])
def test_bad_num_steps(mlp_file, num_steps):
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        export.load(mlp_file, num_steps=num_steps)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        export.load(tmp_path / "nope.eslo", num_steps=10)


def test_truncated_file(mlp_file, tmp_path):
    raw = mlp_file.read_bytes()
    for cut in (5, 20, len(raw) // 2, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.eslo"
        bad.write_bytes(raw[:cut])
        with pytest.raises(
            export.OptimizerFileError, match="truncated|not an es_l2o|corrupt"
        ):
            export.load(bad, num_steps=10)


def test_corrupted_bytes_fail_the_checksum(mlp_file, tmp_path):
    raw = bytearray(mlp_file.read_bytes())
    raw[-7] ^= 0x01  # a bit of theta
    bad = tmp_path / "flip.eslo"
    bad.write_bytes(bytes(raw))
    with pytest.raises(export.OptimizerFileError, match="checksum"):
        export.load(bad, num_steps=10)


def _rewrite_header(path, out, change):
    raw = path.read_bytes()
    start = len(export.MAGIC) + 8
    (length,) = export._LENGTH.unpack(raw[len(export.MAGIC) : start])
    header = json.loads(raw[start : start + length])
    payload = raw[start + length :]
    change(header)
    header.pop("sha256")
    header["sha256"] = hashlib.sha256(export._canonical(header) + payload).hexdigest()
    blob = export._canonical(header)
    out.write_bytes(export.MAGIC + export._LENGTH.pack(len(blob)) + blob + payload)
    return out


def test_shape_mismatch_is_refused_even_with_a_valid_checksum(mlp_file, tmp_path):
    bad = _rewrite_header(
        mlp_file, tmp_path / "wide.eslo", lambda h: h["config"].update(hidden_sizes=[5])
    )
    with pytest.raises(
        export.OptimizerFileError, match=r"is float32\[4\], expected float32\[5\]"
    ):
        export.load(bad, num_steps=10)


def test_unknown_or_unexpected_architecture(mlp_file, tmp_path):
    bad = _rewrite_header(
        mlp_file, tmp_path / "arch.eslo", lambda h: h.update(architecture="nonsense")
    )
    with pytest.raises(export.OptimizerFileError, match="unknown learned-optimizer"):
        export.load(bad, num_steps=10)
    with pytest.raises(export.OptimizerFileError, match="holds a 'mlp' optimizer"):
        export.load(mlp_file, num_steps=10, architecture="lstm")


def test_a_pickle_is_never_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    bad = tmp_path / "evil.eslo"
    bad.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(export.OptimizerFileError, match="not an es_l2o file"):
        export.load(bad, num_steps=10)
    assert not (tmp_path / "pwned").exists()
