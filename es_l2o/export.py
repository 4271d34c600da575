"""Save a learned optimizer to one file and load it back as an optax transform.

The file holds the meta-parameters and a JSON header (architecture name, its
constructor arguments, package version, user metadata, a SHA-256 checksum over
header and data). Loading parses JSON and raw little-endian arrays only: no pickle,
no code runs. Every array's path, shape and dtype is checked against the
architecture that the header names.

Example:
    >>> import jax, jax.numpy as jnp, optax, tempfile, os
    >>> from es_l2o.lopt import MLPLOpt
    >>> lopt = MLPLOpt(hidden_sizes=(8,))
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.eslo")
    >>> save(path, lopt, lopt.init(jax.random.key(0)), note="demo")
    >>> opt = load(path, num_steps=100)  # an optax.GradientTransformationExtraArgs
    >>> params = {"w": jnp.ones(3)}
    >>> updates, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import es_l2o
from es_l2o.lopt import LOPTS, LearnedOptimizer, check_num_steps, get_lopt_class

MAGIC = b"ES_L2O\x00\x01"
FORMAT = "es_l2o.optimizer"
FORMAT_VERSION = 1
#: dtypes a file may hold (names as numpy / ml_dtypes spell them)
ALLOWED_DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int32",
    "int64",
    "uint32",
    "bool",
)
_LENGTH = struct.Struct("<Q")


class OptimizerFileError(ValueError):
    """A file that is not a valid es_l2o file, or does not match what was expected."""


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _checksum(header: dict, payload: bytes) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(_canonical(body) + payload).hexdigest()


def _leaf_records(tree) -> tuple[list[dict], bytes]:
    records, chunks, offset = [], [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(jax.device_get(leaf))
        dtype = array.dtype.name
        if dtype not in ALLOWED_DTYPES:
            raise OptimizerFileError(
                f"cannot store leaf {jax.tree_util.keystr(path)} of dtype {dtype}; "
                f"valid dtypes: {ALLOWED_DTYPES}"
            )
        data = np.ascontiguousarray(array).tobytes()  # hosts are little-endian
        records.append(
            {
                "path": jax.tree_util.keystr(path),
                "dtype": dtype,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": len(data),
            }
        )
        chunks.append(data)
        offset += len(data)
    return records, b"".join(chunks)


def write_arrays(path: str | os.PathLike, tree, header: dict[str, Any]) -> None:
    """Writes `tree`'s arrays and a JSON `header` atomically (temp file, rename)."""
    records, payload = _leaf_records(tree)
    header = {**header, "leaves": records, "payload_bytes": len(payload)}
    header["sha256"] = _checksum(header, payload)
    blob = _canonical(header)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _LENGTH.pack(len(blob)) + blob + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_arrays(path: str | os.PathLike, expected_format: str) -> tuple[dict, dict]:
    """Reads and verifies a file written by `write_arrays`.

    Returns:
        (header, arrays) where arrays maps each leaf path string to a numpy array.

    Raises:
        FileNotFoundError: no file at `path`.
        OptimizerFileError: not such a file, truncated, corrupted, or of another format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(MAGIC):
        raise OptimizerFileError(
            f"{path!r} is not an es_l2o file (it does not start with the es_l2o marker)"
        )
    start = len(MAGIC) + _LENGTH.size
    if len(raw) < start:
        raise OptimizerFileError(f"{path!r} is truncated (no header length)")
    (length,) = _LENGTH.unpack(raw[len(MAGIC) : start])
    if len(raw) < start + length:
        raise OptimizerFileError(
            f"{path!r} is truncated: header of {length} bytes, file of {len(raw)} bytes"
        )
    try:
        header = json.loads(raw[start : start + length].decode())
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as err:
        raise OptimizerFileError(f"{path!r} has a corrupted header: {err}") from None
    payload = raw[start + length :]
    if header.get("format") != expected_format:
        raise OptimizerFileError(
            f"{path!r} holds format {header.get('format')!r}, "
            f"expected {expected_format!r}"
        )
    if header.get("payload_bytes") != len(payload):
        raise OptimizerFileError(
            f"{path!r} is truncated or padded: {len(payload)} data bytes, header "
            f"promises {header.get('payload_bytes')}"
        )
    if header.get("sha256") != _checksum(header, payload):
        raise OptimizerFileError(
            f"{path!r} is corrupted: its SHA-256 checksum does not match"
        )
    arrays = {}
    for record in header.get("leaves", []):
        dtype = record["dtype"]
        if dtype not in ALLOWED_DTYPES:
            raise OptimizerFileError(f"{path!r} holds unsupported dtype {dtype!r}")
        a, n = record["offset"], record["nbytes"]
        flat = np.frombuffer(payload[a : a + n], dtype=jnp.dtype(dtype))
        if flat.size != int(np.prod(record["shape"], dtype=np.int64)):
            raise OptimizerFileError(
                f"{path!r}: leaf {record['path']} has {flat.size} values for shape "
                f"{record['shape']}"
            )
        arrays[record["path"]] = flat.reshape(record["shape"])
    return header, arrays


def restore_tree(template, arrays: dict, source: str = "file"):
    """Rebuilds `template`'s pytree from `arrays` keyed by path, checking every leaf.

    `template` may hold `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {jax.tree_util.keystr(p): leaf for p, leaf in leaves_with_path}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise OptimizerFileError(
            f"{source} does not match the expected structure: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    leaves = []
    for path_str, leaf in expected.items():
        array = arrays[path_str]
        want_shape, want_dtype = tuple(jnp.shape(leaf)), jnp.dtype(leaf.dtype)
        if array.shape != want_shape or array.dtype != want_dtype:
            raise OptimizerFileError(
                f"{source}: leaf {path_str} is {array.dtype.name}{list(array.shape)}, "
                f"expected {want_dtype.name}{list(want_shape)}"
            )
        leaves.append(jnp.asarray(array))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save(path: str | os.PathLike, lopt: LearnedOptimizer, theta, **metadata) -> None:
    """Saves `theta` of the architecture `lopt` with JSON-serialisable `metadata`."""
    if type(lopt).name not in LOPTS or LOPTS[type(lopt).name] is not type(lopt):
        raise ValueError(
            f"{type(lopt).__name__} is not in the registry es_l2o.lopt.LOPTS "
            f"({sorted(LOPTS)}); register it so that files can name it"
        )
    try:
        json.dumps(metadata)
    except TypeError as err:
        raise ValueError(f"metadata must be JSON-serialisable: {err}") from None
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": type(lopt).name,
        "config": lopt.config(),
        "package_version": es_l2o.__version__,
        "metadata": metadata,
    }
    write_arrays(path, theta, header)


def load_theta(
    path: str | os.PathLike, architecture: str | None = None
) -> tuple[LearnedOptimizer, Any, dict]:
    """Reads a saved optimizer: `(lopt, theta, metadata)`.

    Args:
        path: the file written by `save`.
        architecture: if given, refuse a file of any other architecture.
    """
    header, arrays = read_arrays(path, FORMAT)
    if header.get("format_version") != FORMAT_VERSION:
        raise OptimizerFileError(
            f"{os.fspath(path)!r} has format version {header.get('format_version')!r}; "
            f"this es_l2o reads version {FORMAT_VERSION}"
        )
    name = header.get("architecture")
    if architecture is not None and name != architecture:
        raise OptimizerFileError(
            f"{os.fspath(path)!r} holds a {name!r} optimizer, expected {architecture!r}"
        )
    try:
        cls = get_lopt_class(name)
    except ValueError as err:
        raise OptimizerFileError(f"{os.fspath(path)!r}: {err}") from None
    config = header.get("config")
    try:
        lopt = cls(**config)
    except (TypeError, ValueError) as err:
        raise OptimizerFileError(
            f"{os.fspath(path)!r}: its config {config!r} does not build a {name!r} "
            f"optimizer: {err}"
        ) from None
    template = jax.eval_shape(lopt.init, jax.random.key(0))
    theta = restore_tree(template, arrays, source=repr(os.fspath(path)))
    return lopt, theta, dict(header.get("metadata", {}))


def load(
    path: str | os.PathLike, num_steps: int, architecture: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """Loads a saved learned optimizer as an optax transform for `num_steps` steps.

    The transform's update is `update(grads, state, params, *, value=loss)`: pass the
    parameters, and the current loss where the architecture reads it.
    """
    check_num_steps(num_steps)
    lopt, theta, _ = load_theta(path, architecture)
    return lopt.transform(theta, num_steps)
