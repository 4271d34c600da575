"""Every registered learned optimizer behaves like an optax transform, and survives a
save / load round trip; files of the earlier format still load; bad files are
refused with one clear line."""

import json
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

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
    path = tmp_path_factory.mktemp(request.param) / "opt.safetensors"
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


def test_the_file_is_plain_safetensors_with_named_tensors(saved):
    lopt, theta, path = saved
    tensors = safetensors.numpy.load_file(path)
    leaves = jax.tree_util.tree_flatten_with_path(theta)[0]
    assert sorted(tensors) == sorted(export.tensor_name(p) for p, _ in leaves)
    for p, leaf in leaves:
        tensor = tensors[export.tensor_name(p)]
        assert tensor.shape == leaf.shape and tensor.dtype == leaf.dtype
        np.testing.assert_array_equal(tensor, leaf)
    with safetensors.safe_open(path, framework="np") as f:
        metadata = f.metadata()
    assert set(metadata) == set(export.METADATA_KEYS)
    assert metadata["architecture"] == type(lopt).name
    assert json.loads(metadata["config"]) == json.loads(json.dumps(lopt.config()))
    assert json.loads(metadata["metadata"]) == {"note": "test"}
    assert json.loads(metadata["provenance"])["jax"] == jax.__version__
    assert metadata["sha256"] == export.digest(metadata, tensors)


# --- bad files and bad arguments (architecture-independent) ---

LOPT = MLPLOpt(hidden_sizes=(4,))


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "opt.safetensors"
    export.save(path, LOPT, LOPT.init(jax.random.key(0)), horizon=50)
    return path


@pytest.fixture(scope="module")
def legacy_file(tmp_path_factory):
    """A file of the earlier format, as the earlier `export.save` wrote it."""
    path = tmp_path_factory.mktemp("legacy") / "opt.eslo"
    header = {
        "format": export.FORMAT,
        "format_version": 1,
        "architecture": "mlp",
        "config": LOPT.config(),
        "package_version": "0.1.0",
        "metadata": {"horizon": 50},
    }
    export.write_arrays(path, LOPT.init(jax.random.key(0)), header)
    return path


def test_files_of_the_earlier_format_still_load(legacy_file, mlp_file):
    lopt, theta, metadata = export.load_theta(legacy_file)
    _, new_theta, new_metadata = export.load_theta(mlp_file)
    assert lopt.hidden_sizes == (4,) and metadata == new_metadata == {"horizon": 50}
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(new_theta), strict=True):
        np.testing.assert_array_equal(a, b)
    a, _, _ = _run(export.load(legacy_file, num_steps=20), PARAMS)
    b, _, _ = _run(export.load(mlp_file, num_steps=20), PARAMS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("num_steps", [0, -5, 2.5, "100", True])
def test_bad_num_steps(mlp_file, num_steps):
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        export.load(mlp_file, num_steps=num_steps)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        export.load(tmp_path / "nope.safetensors", num_steps=10)


def _split(raw):
    """A safetensors file's (header dict, data bytes)."""
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header, data):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _forge(path, change, rehash=True):
    """The file at `path` with its header changed by `change(header)`; with `rehash`
    its checksum is made to match again where the forged file still parses (as a
    forger would do)."""
    header, data = _split(path.read_bytes())
    change(header)
    if rehash and isinstance(header.get("__metadata__"), dict):
        try:
            tensors = safetensors.numpy.load(_join(header, data))
        except Exception:  # noqa: BLE001 - a structure the library refuses
            return _join(header, data)
        header["__metadata__"]["sha256"] = export.digest(
            header["__metadata__"], tensors
        )
    return _join(header, data)


def _meta(**entries):
    return lambda h: h["__metadata__"].update(entries)


def _tensor(name="layer_0/w", **fields):
    def change(header):
        for field, value in fields.items():
            if value is None:
                header[name].pop(field)
            else:
                header[name][field] = value

    return change


def _rename(header):
    header["layer_9/w"] = header.pop("layer_0/w")


MALFORMED = {
    "missing dtype": (_tensor(dtype=None), r"tensor 'layer_0/w' has no 'dtype'"),
    "missing shape": (_tensor(shape=None), r"tensor 'layer_0/w' has no 'shape'"),
    "negative shape": (_tensor(shape=[-12, 4]), r"has shape \[-12, 4\], expected"),
    "shape as a string": (_tensor(shape="12x4"), r"has shape '12x4', expected"),
    "unknown dtype": (_tensor(dtype="I8"), r"has dtype 'I8'; valid dtypes"),
    "bad offsets": (_tensor(data_offsets=[0]), r"data_offsets \[0\], expected"),
    "offsets off size": (_tensor(data_offsets=[0, 4]), r"spans 4 bytes for F32\[12, 4"),
    "entry as a string": (
        lambda h: h.update({"layer_0/w": "F32"}),
        r"tensor 'layer_0/w' is described by 'F32' \(str\)",
    ),
    "no metadata": (lambda h: h.pop("__metadata__"), "it has no __metadata__"),
    "metadata as a list": (
        lambda h: h.update(__metadata__=["mlp"]),
        r"its __metadata__ is \['mlp'\] \(list\), expected an object",
    ),
    "version as a number": (
        _meta(format_version=2),
        r"metadata entry 'format_version' is 2 \(int\), expected a string",
    ),
    "no architecture": (
        lambda h: h["__metadata__"].pop("architecture"),
        r"its metadata lacks \['architecture'\]",
    ),
    "config not JSON": (_meta(config="{hidden"), "'config' is not valid JSON"),
    "config a list": (_meta(config="[4]"), r"'config' holds \[4\] \(list\), expected"),
    "metadata a string": (_meta(metadata='"x"'), r"'metadata' holds 'x' \(str\)"),
    "other format": (_meta(format="es_l2o.checkpoint"), "holds format"),
    "newer version": (_meta(format_version="3"), "format version '3'; this es_l2o"),
    "other tensors": (_rename, r"missing \['layer_0/w'\], unexpected \['layer_9/w'\]"),
    "wider config": (
        _meta(config=json.dumps({**LOPT.config(), "hidden_sizes": [5]})),
        r"leaf layer_0/b is float32\[4\], expected float32\[5\]",
    ),
    "unknown architecture": (
        _meta(architecture="nonsense"),
        "unknown learned-optimizer architecture 'nonsense'",
    ),
    "config that builds nothing": (
        _meta(config='{"_target_": "os.system"}'),
        "does not build a 'mlp' optimizer",
    ),
    "stale checksum": (_meta(metadata='{"horizon": 51}'), "checksum does not match"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_are_one_clear_line(mlp_file, tmp_path, case):
    change, match = MALFORMED[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_forge(mlp_file, change, rehash=case != "stale checksum"))
    with pytest.raises(export.OptimizerFileError, match=match) as err:
        export.load(bad, num_steps=10)
    assert len(str(err.value).splitlines()) == 1 and str(bad) in str(err.value)


def _forge_legacy(path, **changes):
    """A file of the earlier format with header changes and a matching checksum."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[8:16])
    header, payload = json.loads(raw[16 : 16 + length]), raw[16 + length :]
    header.update(changes)
    header["sha256"] = export._checksum(header, payload)
    blob = export._canonical(header)
    return raw[:8] + struct.pack("<Q", len(blob)) + blob + payload


def _records(path, **fields):
    """The earlier format's leaf records with `fields` changed in the first one."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[8:16])
    records = json.loads(raw[16 : 16 + length])["leaves"]
    first = {k: v for k, v in {**records[0], **fields}.items() if v is not None}
    return [first, *records[1:]]


LEGACY_MALFORMED = {
    "record without dtype": (lambda p: _records(p, dtype=None), "has no 'dtype'"),
    "negative shape": (lambda p: _records(p, shape=[-4]), r"shape \[-4\], expected"),
    "leaves as a string": (lambda _: "leaves", r"its 'leaves' is 'leaves' \(str\)"),
    "record as a number": (lambda _: [7], r"leaf record 0 is 7 \(int\), expected"),
    "object dtype": (lambda p: _records(p, dtype="object"), "dtype 'object'; valid"),
    "offset outside": (lambda p: _records(p, offset=10**9), "outside the"),
    "size off shape": (lambda p: _records(p, shape=[3]), r"has 16 bytes for float32"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_MALFORMED))
def test_malformed_records_of_the_earlier_format_are_one_clear_line(
    legacy_file, tmp_path, case
):
    leaves, match = LEGACY_MALFORMED[case]
    bad = tmp_path / "bad.eslo"
    bad.write_bytes(_forge_legacy(legacy_file, leaves=leaves(legacy_file)))
    with pytest.raises(export.OptimizerFileError, match=match) as err:
        export.load(bad, num_steps=10)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": 7}, "format version 7; this es_l2o reads versions 1 and 2"),
        ({"config": [4]}, r"its 'config' is \[4\] \(list\), expected an object"),
        ({"architecture": ["mlp"]}, r"architecture \['mlp'\] is not a name"),
    ],
)
def test_bad_headers_of_the_earlier_format(legacy_file, tmp_path, changes, match):
    bad = tmp_path / "bad.eslo"
    bad.write_bytes(_forge_legacy(legacy_file, **changes))
    with pytest.raises(export.OptimizerFileError, match=match):
        export.load(bad, num_steps=10)


@pytest.mark.parametrize("which", ["new", "legacy"])
def test_truncated_padded_and_corrupted_files(mlp_file, legacy_file, tmp_path, which):
    raw = (mlp_file if which == "new" else legacy_file).read_bytes()
    bad = tmp_path / "bad"
    for cut in (0, 5, 20, len(raw) // 2, len(raw) - 1):
        bad.write_bytes(raw[:cut])
        with pytest.raises(export.OptimizerFileError, match="truncated"):
            export.load(bad, num_steps=10)
    bad.write_bytes(raw + b"\0")
    with pytest.raises(export.OptimizerFileError, match="padded"):
        export.load(bad, num_steps=10)
    flipped = bytearray(raw)
    flipped[-7] ^= 0x01  # a bit of theta
    bad.write_bytes(bytes(flipped))
    with pytest.raises(export.OptimizerFileError, match="checksum does not match"):
        export.load(bad, num_steps=10)


def test_unknown_or_unexpected_architecture(mlp_file):
    with pytest.raises(export.OptimizerFileError, match="holds a 'mlp' optimizer"):
        export.load(mlp_file, num_steps=10, architecture="lstm")


def test_a_pickle_is_never_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(export.OptimizerFileError, match="not an es_l2o file"):
        export.load(bad, num_steps=10)
    assert not (tmp_path / "pwned").exists()


def test_a_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "opt.safetensors"
    for _ in range(2):  # a new file, then over an existing one
        export.save(path, LOPT, LOPT.init(jax.random.key(1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.safetensors"]
