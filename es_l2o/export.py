"""Save a learned optimizer to one safetensors file and load it back as optax.

`save` writes a [safetensors](https://github.com/huggingface/safetensors) file: one
tensor per leaf of theta, named by its pytree path (`layer_0/w`), and string metadata
(`__metadata__`) holding

    format            "es_l2o.optimizer"
    format_version    "2"
    architecture      the registered name (`mlp`, `lstm`, ...)
    config            JSON: the architecture's constructor arguments
    package_version   the es_l2o version that wrote it
    provenance        JSON: when and with which jax / numpy / Python it was written
    metadata          JSON: the caller's notes (horizon, population, seed, ...)
    sha256            SHA-256 over the other entries and the tensors (see `digest`)

Loading parses JSON and raw little-endian bytes only (safetensors' own parser): no
pickle, no code runs. Every header entry, the checksum, and every tensor's name,
shape and dtype (against the architecture the file names) are checked; a file that
fails is refused with one line naming what is wrong. Files of the earlier es_l2o
format (`.eslo`: a marker, a JSON header and raw arrays) still load; whole-state
checkpoints (`es_l2o.checkpoint`) still use that format through `write_arrays`.

Example:
    >>> import jax, jax.numpy as jnp, optax, tempfile, os
    >>> from es_l2o.lopt import MLPLOpt
    >>> lopt = MLPLOpt(hidden_sizes=(8,))
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.safetensors")
    >>> save(path, lopt, lopt.init(jax.random.key(0)), note="demo")
    >>> opt = load(path, num_steps=100)  # an optax.GradientTransformationExtraArgs
    >>> params = {"w": jnp.ones(3)}
    >>> updates, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import struct
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors
import safetensors.numpy

import es_l2o
from es_l2o.files import write_atomic
from es_l2o.lopt import LOPTS, LearnedOptimizer, check_num_steps, get_lopt_class

FORMAT = "es_l2o.optimizer"
FORMAT_VERSION = 2
#: the earlier format (a marker, a JSON header, raw arrays), still read
LEGACY_FORMAT_VERSION = 1
MAGIC = b"ES_L2O\x00\x01"
SUFFIX = ".safetensors"
#: safetensors dtype codes a file may hold, and their numpy / ml_dtypes names
SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I32": "int32",
    "I64": "int64",
    "U32": "uint32",
    "BOOL": "bool",
}
#: dtypes a file may hold (names as numpy / ml_dtypes spell them)
ALLOWED_DTYPES = tuple(SAFETENSORS_DTYPES.values())
#: the `__metadata__` entries of a file: each a string, the JSON ones decoded
METADATA_JSON = {"config": dict, "provenance": dict, "metadata": dict}
METADATA_KEYS = (
    "format",
    "format_version",
    "architecture",
    "config",
    "package_version",
    "provenance",
    "metadata",
    "sha256",
)
_LENGTH = struct.Struct("<Q")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class OptimizerFileError(ValueError):
    """A file that is not a valid es_l2o file, or does not match what was expected."""


def _show(value) -> str:
    """A short repr with its type, for error messages: `'abc' (str)`."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ------------------------------------------------------------------------------------
# the earlier format: a marker, a JSON header, raw arrays (still used by checkpoints)


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _checksum(header: dict, payload: bytes) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(_canonical(body) + payload).hexdigest()


def _contiguous(array) -> np.ndarray:
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _host_array(leaf, name: str) -> np.ndarray:
    array = _contiguous(jax.device_get(leaf))
    if array.dtype.name not in ALLOWED_DTYPES:
        raise OptimizerFileError(
            f"cannot store leaf {name} of dtype {array.dtype.name}; "
            f"valid dtypes: {ALLOWED_DTYPES}"
        )
    return array


def _leaf_records(tree) -> tuple[list[dict], bytes]:
    records, chunks, offset = [], [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = _host_array(leaf, jax.tree_util.keystr(path))
        data = array.tobytes()  # hosts are little-endian
        records.append(
            {
                "path": jax.tree_util.keystr(path),
                "dtype": array.dtype.name,
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
    write_atomic(path, MAGIC + _LENGTH.pack(len(blob)) + blob + payload)


def _check_shape(source: str, what: str, shape) -> None:
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise OptimizerFileError(
            f"{source}: {what} has shape {shape!r}, expected a list of integers >= 0"
        )


def _check_dtype(source: str, what: str, dtype, valid) -> None:
    if not isinstance(dtype, str) or dtype not in valid:
        raise OptimizerFileError(
            f"{source}: {what} has dtype {dtype!r}; valid dtypes: {tuple(valid)}"
        )


def _record_array(source: str, index: int, record, payload: bytes):
    """Checks one leaf record of the earlier format; returns (path, array)."""
    if not isinstance(record, dict):
        raise OptimizerFileError(
            f"{source}: leaf record {index} is {_show(record)}, expected an "
            "object with path, dtype, shape, offset, nbytes"
        )
    for field in ("path", "dtype", "shape", "offset", "nbytes"):
        if field not in record:
            raise OptimizerFileError(f"{source}: leaf record {index} has no {field!r}")
    path = record["path"]
    if not isinstance(path, str):
        raise OptimizerFileError(
            f"{source}: leaf record {index} has path {path!r}, expected a string"
        )
    what = f"leaf {path}"
    _check_dtype(source, what, record["dtype"], ALLOWED_DTYPES)
    _check_shape(source, what, record["shape"])
    start, size = record["offset"], record["nbytes"]
    if not (_is_count(start) and _is_count(size)) or start + size > len(payload):
        raise OptimizerFileError(
            f"{source}: {what} has offset {start!r} and nbytes {size!r}, outside the "
            f"{len(payload)} data bytes"
        )
    dtype = jnp.dtype(record["dtype"])
    count = int(np.prod(record["shape"], dtype=np.int64))
    if count * dtype.itemsize != size:
        raise OptimizerFileError(
            f"{source}: {what} has {size} bytes for {dtype.name}{record['shape']}, "
            f"expected {count * dtype.itemsize}"
        )
    flat = np.frombuffer(payload[start : start + size], dtype=dtype)
    return path, flat.reshape(record["shape"])


def _header_and_payload(path: str, raw: bytes) -> tuple[dict, bytes]:
    """The JSON header and the data bytes of a file's contents `raw`."""
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
    return header, raw[start + length :]


def read_arrays(path: str | os.PathLike, expected_format: str) -> tuple[dict, dict]:
    """Reads and verifies a file written by `write_arrays`.

    Returns:
        (header, arrays) where arrays maps each leaf path string to a numpy array.

    Raises:
        FileNotFoundError: no file at `path`.
        OptimizerFileError: not such a file, truncated, corrupted, of another format,
            or with a malformed leaf record.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    with open(path, "rb") as f:
        header, payload = _header_and_payload(path, f.read())
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
    records = header.get("leaves")
    if not isinstance(records, list):
        raise OptimizerFileError(
            f"{path!r}: its 'leaves' is {_show(records)}, expected a list of "
            "leaf records"
        )
    arrays = {}
    for index, record in enumerate(records):
        name, array = _record_array(repr(path), index, record, payload)
        if name in arrays:
            raise OptimizerFileError(f"{path!r}: leaf {name} appears twice")
        arrays[name] = array
    return header, arrays


def restore_tree(
    template,
    arrays: dict,
    source: str = "file",
    name_of: Callable[[tuple], str] = jax.tree_util.keystr,
):
    """Rebuilds `template`'s pytree from `arrays` keyed by path, checking every leaf.

    `template` may hold `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`);
    `name_of` turns a leaf's key path into the name `arrays` uses.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {name_of(p): leaf for p, leaf in leaves_with_path}
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


# ------------------------------------------------------------------------------------
# safetensors files


def tensor_name(path: tuple) -> str:
    """A leaf's key path as a tensor name: `(DictKey('layer_0'), DictKey('w'))` ->
    `layer_0/w`."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def tensors_of(theta) -> dict[str, np.ndarray]:
    """theta's leaves as host arrays keyed by `tensor_name`."""
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(theta)[0]:
        name = tensor_name(path)
        if not name or name in tensors or name == "__metadata__":
            raise OptimizerFileError(
                f"leaf {jax.tree_util.keystr(path)} cannot be stored as tensor "
                f"{name!r} (empty, reserved or taken by another leaf)"
            )
        tensors[name] = _host_array(leaf, name)
    return tensors


def digest(metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over the metadata entries but `sha256` (as sorted compact JSON), then
    each tensor in name order (name, dtype, shape as JSON; then its raw bytes)."""
    body = {k: v for k, v in metadata.items() if k != "sha256"}
    h = hashlib.sha256(_canonical(body))
    for name in sorted(tensors):
        array = _contiguous(tensors[name])
        h.update(json.dumps([name, array.dtype.name, list(array.shape)]).encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _provenance() -> dict[str, str]:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "written_at": now.isoformat(timespec="seconds"),
        "written_by": f"es_l2o {es_l2o.__version__}",
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save(path: str | os.PathLike, lopt: LearnedOptimizer, theta, **metadata) -> None:
    """Saves `theta` of the architecture `lopt` as a safetensors file at `path`.

    `metadata` (JSON-serialisable) is stored in the file and returned by
    `load_theta`. The file is written atomically (temporary file, rename).
    """
    if type(lopt).name not in LOPTS or LOPTS[type(lopt).name] is not type(lopt):
        raise ValueError(
            f"{type(lopt).__name__} is not in the registry es_l2o.lopt.LOPTS "
            f"({sorted(LOPTS)}); register it so that files can name it"
        )
    try:
        notes = json.dumps(metadata, sort_keys=True, allow_nan=True)
    except TypeError as err:
        raise ValueError(f"metadata must be JSON-serialisable: {err}") from None
    tensors = tensors_of(theta)
    entries = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "architecture": type(lopt).name,
        "config": json.dumps(lopt.config(), sort_keys=True),
        "package_version": es_l2o.__version__,
        "provenance": json.dumps(_provenance(), sort_keys=True),
        "metadata": notes,
    }
    entries["sha256"] = digest(entries, tensors)
    write_atomic(path, safetensors.numpy.save(tensors, metadata=entries))


def _check_entry(source: str, name: str, entry) -> tuple[str, list, int, int]:
    """One tensor entry of a safetensors header: (dtype, shape, begin, end)."""
    if not isinstance(entry, dict):
        raise OptimizerFileError(
            f"{source}: tensor {name!r} is described by {_show(entry)}, "
            "expected an object with dtype, shape, data_offsets"
        )
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise OptimizerFileError(f"{source}: tensor {name!r} has no {field!r}")
    what = f"tensor {name!r}"
    _check_dtype(source, what, entry["dtype"], SAFETENSORS_DTYPES)
    _check_shape(source, what, entry["shape"])
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(n) for n in offsets)
        or offsets[0] > offsets[1]
    ):
        raise OptimizerFileError(
            f"{source}: {what} has data_offsets {offsets!r}, expected [begin, end] "
            "with 0 <= begin <= end"
        )
    itemsize = jnp.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).itemsize
    count = int(np.prod(entry["shape"], dtype=np.int64))
    if offsets[1] - offsets[0] != count * itemsize:
        raise OptimizerFileError(
            f"{source}: {what} spans {offsets[1] - offsets[0]} bytes for "
            f"{entry['dtype']}{entry['shape']}, expected {count * itemsize}"
        )
    return entry["dtype"], entry["shape"], offsets[0], offsets[1]


def _check_metadata(source: str, entries) -> dict[str, str]:
    if entries is None:
        raise OptimizerFileError(
            f"{source} is not an es_l2o optimizer file: it has no __metadata__"
        )
    if not isinstance(entries, dict):
        raise OptimizerFileError(
            f"{source}: its __metadata__ is {_show(entries)}, expected an "
            "object of strings"
        )
    for key, value in entries.items():
        if not isinstance(value, str):
            raise OptimizerFileError(
                f"{source}: metadata entry {key!r} is {_show(value)}, expected a string"
            )
    missing = [k for k in METADATA_KEYS if k not in entries]
    if missing:
        raise OptimizerFileError(
            f"{source} is not an es_l2o optimizer file: its metadata lacks {missing}"
        )
    return entries


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict]:
    """Reads and checks a safetensors file's structure.

    Returns:
        (metadata, tensors): the `__metadata__` strings, and numpy arrays by name.

    Raises:
        FileNotFoundError: no file at `path`.
        OptimizerFileError: truncated, padded, or with a malformed header.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    source = repr(path)
    if len(raw) < _LENGTH.size:
        raise OptimizerFileError(f"{source} is truncated ({len(raw)} bytes)")
    (length,) = _LENGTH.unpack(raw[: _LENGTH.size])
    if length > _MAX_HEADER_BYTES:
        raise OptimizerFileError(
            f"{source} is not an es_l2o file (neither a safetensors file, its "
            f"header length being {length}, nor of the earlier es_l2o format)"
        )
    if len(raw) < _LENGTH.size + length:
        raise OptimizerFileError(
            f"{source} is truncated: header of {length} bytes, file of {len(raw)} bytes"
        )
    try:
        header = json.loads(raw[_LENGTH.size : _LENGTH.size + length].decode())
        if not isinstance(header, dict):
            raise ValueError(f"the header is {_show(header)}, not an object")
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError too
        raise OptimizerFileError(f"{source} has a corrupted header: {err}") from None
    metadata = _check_metadata(source, header.pop("__metadata__", None))
    entries = {name: _check_entry(source, name, e) for name, e in header.items()}
    data_bytes = len(raw) - _LENGTH.size - length
    end = max((e[3] for e in entries.values()), default=0)
    if data_bytes != end:
        raise OptimizerFileError(
            f"{source} is {'truncated' if data_bytes < end else 'padded'}: "
            f"{data_bytes} data bytes, its tensors span {end}"
        )
    try:
        parsed = safetensors.deserialize(raw)
    except safetensors.SafetensorError as err:
        raise OptimizerFileError(
            f"{source} is not a valid safetensors file: {err}"
        ) from None
    tensors = {}
    for name, view in parsed:
        dtype = jnp.dtype(SAFETENSORS_DTYPES[view["dtype"]])
        tensors[name] = np.frombuffer(bytes(view["data"]), dtype).reshape(view["shape"])
    return metadata, tensors


def _decode(source: str, metadata: dict[str, str]) -> dict[str, Any]:
    """The metadata strings of a checked file, JSON entries decoded and typed."""
    if metadata["format"] != FORMAT:
        raise OptimizerFileError(
            f"{source} holds format {metadata['format']!r}, expected {FORMAT!r}"
        )
    if metadata["format_version"] != str(FORMAT_VERSION):
        raise OptimizerFileError(
            f"{source} has format version {metadata['format_version']!r}; this "
            f"es_l2o reads versions {LEGACY_FORMAT_VERSION} and {FORMAT_VERSION}"
        )
    decoded: dict[str, Any] = dict(metadata)
    for key, kind in METADATA_JSON.items():
        try:
            decoded[key] = value = json.loads(metadata[key])
        except ValueError as err:
            raise OptimizerFileError(
                f"{source}: metadata entry {key!r} is not valid JSON: {err}"
            ) from None
        if not isinstance(value, kind):
            raise OptimizerFileError(
                f"{source}: metadata entry {key!r} holds {_show(value)}, "
                f"expected a JSON {'object' if kind is dict else kind.__name__}"
            )
    return decoded


def _read_any(path: str | os.PathLike) -> tuple[dict, dict, Callable]:
    """(header, arrays, name_of) of an optimizer file of either format."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    with open(path, "rb") as f:
        legacy = f.read(len(MAGIC)) == MAGIC
    if legacy:
        header, arrays = read_arrays(path, FORMAT)
        if header.get("format_version") != LEGACY_FORMAT_VERSION:
            raise OptimizerFileError(
                f"{path!r} has format version {header.get('format_version')!r}; this "
                f"es_l2o reads versions {LEGACY_FORMAT_VERSION} and {FORMAT_VERSION}"
            )
        for key in ("config", "metadata"):
            if not isinstance(header.get(key, {}), dict):
                raise OptimizerFileError(
                    f"{path!r}: its {key!r} is {_show(header[key])}, expected an object"
                )
        return header, arrays, jax.tree_util.keystr
    metadata, tensors = read_safetensors(path)
    if metadata["sha256"] != digest(metadata, tensors):
        raise OptimizerFileError(
            f"{path!r} is corrupted: its SHA-256 checksum does not match"
        )
    return _decode(repr(path), metadata), tensors, tensor_name


def load_theta(
    path: str | os.PathLike, architecture: str | None = None
) -> tuple[LearnedOptimizer, Any, dict]:
    """Reads a saved optimizer (either format): `(lopt, theta, metadata)`.

    Args:
        path: the file written by `save`.
        architecture: if given, refuse a file of any other architecture.
    """
    header, arrays, name_of = _read_any(path)
    source = repr(os.fspath(path))
    name = header.get("architecture")
    if architecture is not None and name != architecture:
        raise OptimizerFileError(
            f"{source} holds a {name!r} optimizer, expected {architecture!r}"
        )
    try:
        if not isinstance(name, str):
            raise ValueError(f"architecture {name!r} is not a name")
        cls = get_lopt_class(name)
    except ValueError as err:
        raise OptimizerFileError(f"{source}: {err}") from None
    config = header.get("config", {})
    try:
        lopt = cls(**config)
    except (TypeError, ValueError) as err:
        raise OptimizerFileError(
            f"{source}: its config {config!r} does not build a {name!r} "
            f"optimizer: {err}"
        ) from None
    template = jax.eval_shape(lopt.init, jax.random.key(0))
    theta = restore_tree(template, arrays, source=source, name_of=name_of)
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
