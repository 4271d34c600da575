"""Checkpoints of a whole meta-training state through Orbax, the last k kept.

A checkpoint holds any pytree of arrays (the estimator state with its evosax state
and meta-optimizer state, every particle's inner state, the run's key, ...) plus the
iteration and the number of lines of `metrics.jsonl` written at that point. It is a
folder `ckpt_<iteration>` written by `orbax.checkpoint.CheckpointManager`: `state/`
holds the arrays (each process writes the shards it holds), `meta/` a JSON record
(format, iteration, metrics position, the caller's metadata, every leaf's path,
dtype and shape, and a SHA-256 over the leaves). Typed PRNG keys are stored as their
raw key data and rewrapped with their implementation.

In a run over several processes (`jax.distributed`) every process calls `save` and
`load`: each writes and reads only the shards of its own devices (arrays spread over
hosts never gather anywhere), process 0 writes the record and, once every process has
finished, the seal. The leaves' checksum is computed on the devices where the arrays
live (integer sums of mixed words, the same for any sharding), so a checkpoint of two
processes loads in one and the other way round. `load` places each leaf with the
sharding its template leaf carries (`jax.ShapeDtypeStruct(..., sharding=...)`), e.g.
onto the estimator's mesh.

Orbax writes a checkpoint into a temporary folder and renames it when complete; then
`files.sha256.json` (the seal) lists the SHA-256 of each of its files. A checkpoint
without a seal does not count, so a kill at any moment leaves the old set of
checkpoints (and a temporary or unsealed folder, which the next save deletes).
Loading checks the files against the seal before Orbax reads them, reads JSON and raw
arrays only (never runs code), checks every leaf's path, shape and dtype against a
template before reading arrays, and the arrays' checksum after.

Example:
    >>> import jax, jax.numpy as jnp, tempfile
    >>> tree = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
    >>> directory = tempfile.mkdtemp()
    >>> path = save(directory, tree, iteration=5, metrics_position=5)
    >>> path.name
    'ckpt_00000005'
    >>> restored = load(directory, jax.eval_shape(lambda: tree))
    >>> restored.iteration, bool(jnp.all(restored.tree["w"] == tree["w"]))
    (5, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import es_l2o
from es_l2o import sharding
from es_l2o.export import OptimizerFileError
from es_l2o.files import remove_temp_files, write_atomic

FORMAT = "es_l2o.checkpoint"
FORMAT_VERSION = 2
PREFIX = "ckpt"
_NAME = re.compile(r"^" + PREFIX + r"_(\d{8,})$")
#: the file that lists the SHA-256 of every file of a complete checkpoint
SEAL = "files.sha256.json"
#: PRNG implementations a checkpoint may name for its typed keys
KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
#: the record's "checksum": how its "sha256" over the leaves is computed (records
#: without one hash every leaf's bytes on the host, as es_l2o did before)
CHECKSUM = "sha256 of per-leaf device word sums"


class CheckpointError(OptimizerFileError):
    """A checkpoint that is missing, corrupted or does not fit the expected state."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint.

    tree: the saved pytree (leaves as jax arrays); iteration: meta-iterations done;
    metrics_position: lines of metrics.jsonl written when it was saved; metadata: the
    JSON metadata given to `save`; path: the folder it came from.
    """

    tree: Any
    iteration: int
    metrics_position: int
    metadata: dict
    path: Path


def _is_key(leaf) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_impl_name(dtype) -> str:
    for name in KEY_IMPLS:
        if jax.random.key(0, impl=name).dtype == dtype:
            return name
    raise CheckpointError(
        f"cannot store PRNG keys of type {dtype}; valid implementations: {KEY_IMPLS}"
    )


def _unkey(tree) -> tuple[Any, dict[str, str]]:
    """Replaces typed key leaves by their key data; returns {leaf path: impl}."""
    impls = {}

    def convert(path, leaf):
        if _is_key(leaf):
            impls[jax.tree_util.keystr(path)] = _key_impl_name(leaf.dtype)
            return jax.random.key_data(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, tree), impls


def _is_empty(leaf) -> bool:
    return math.prod(leaf.shape) == 0


def _without_empty(tree):
    """Zero-size leaves (Orbax refuses to write them) as 0-d placeholders; their
    shapes stay in the record's leaf table, and `_with_empty` restores them."""

    def placeholder(x):
        if not _is_empty(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((), x.dtype)
        return np.zeros((), x.dtype)

    return jax.tree.map(placeholder, tree)


def _with_empty(tree, template):
    """`tree` with the zero-size leaves of `template` (on its shardings)."""

    def fill(leaf, like):
        if not _is_empty(like):
            return leaf
        where = getattr(like, "sharding", None)
        if where is None:
            return jnp.zeros(like.shape, like.dtype)
        empty = np.zeros(like.shape, like.dtype)
        return jax.make_array_from_callback(like.shape, where, lambda i: empty[i])

    return jax.tree.map(fill, tree, template)


def _path_names(keystr: str) -> tuple[str, ...]:
    """The names in a `keystr` path, whatever the containers: `.a[0]`, `['a']['0']`
    and `['a'][0]` all give ("a", "0")."""
    found = re.findall(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]", keystr)
    return tuple("".join(parts) for parts in found)


def checkpoint_path(directory: str | os.PathLike, iteration: int) -> Path:
    """Where `save` puts the checkpoint of `iteration` in `directory`."""
    return Path(directory) / f"{PREFIX}_{int(iteration):08d}"


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in `directory`, oldest (lowest iteration) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), directory / name)
        for name in os.listdir(directory)
        if (m := _NAME.match(name)) and (directory / name / SEAL).is_file()
    ]
    return [path for _, path in sorted(found)]


def iteration_of(path: str | os.PathLike) -> int:
    """The iteration a checkpoint's folder name gives (its record holds the same)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{str(path)!r} is not named like a checkpoint")
    return int(match.group(1))


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory`, or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


def _manager(directory: Path, keep: int | None = None):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        step_prefix=PREFIX,
        step_format_fixed_length=8,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,  # of saves that a kill cut short
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _leaf_table(tree) -> list[list]:
    """[[path, dtype, shape], ...] of every leaf, in flattening order."""
    return [
        [jax.tree_util.keystr(p), np.dtype(leaf.dtype).name, list(np.shape(leaf))]
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _digest_bytes(tree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (gathered on the host):
    the checksum of records without a "checksum" entry."""
    h = hashlib.sha256()
    for (path, dtype, shape), leaf in zip(
        _leaf_table(tree), jax.tree.leaves(tree), strict=True
    ):
        h.update(json.dumps([path, dtype, shape]).encode())
        h.update(sharding.fetch(leaf).tobytes())
    return h.hexdigest()


def _mix(h):
    """murmur3's finaliser on uint32 words."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x):
    """A leaf's raw bits as a flat uint32 vector (one word per 1-, 2- or 4-byte
    element, two per 8-byte one)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = np.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _word_sums(leaves):
    """Two uint32 sums per leaf of its words mixed with their positions. Integer
    sums wrap exactly in any order, so they do not depend on how the leaf is split
    over devices and processes; each device sums its own shard."""
    out = []
    for leaf in leaves:
        w = _words(leaf)
        i = jnp.arange(w.size, dtype=jnp.uint32)
        a = _mix(w ^ _mix(i * np.uint32(0x9E3779B9) + np.uint32(1)))
        b = _mix((w + np.uint32(0x7F4A7C15)) ^ _mix(i ^ np.uint32(0x5BD1E995)))
        out.append(
            jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])
        )
    return out


def _digest(tree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and word sums (`_word_sums`),
    computed where the leaves live: nothing is gathered."""
    leaves = jax.tree.leaves(tree)
    groups: dict[tuple, list[int]] = {}  # one computation per set of devices
    for i, leaf in enumerate(leaves):
        where = leaf.sharding.device_set if isinstance(leaf, jax.Array) else ()
        groups.setdefault(tuple(sorted(d.id for d in where)), []).append(i)
    sums = [None] * len(leaves)
    for indices in groups.values():
        for i, words in zip(
            indices, _word_sums([leaves[i] for i in indices]), strict=True
        ):
            sums[i] = words
    h = hashlib.sha256()
    for (path, dtype, shape), words in zip(_leaf_table(tree), sums, strict=True):
        h.update(json.dumps([path, dtype, shape]).encode())
        h.update(sharding.fetch(words).astype("<u4").tobytes())
    return h.hexdigest()


def _global(tree):
    """In a run over several processes, leaves that each process holds whole and
    alone (keys, the initial theta: the same in every process) become arrays
    replicated over every device, which Orbax writes once; others are kept."""
    if jax.process_count() == 1:
        return tree
    everywhere = sharding.replicated_everywhere()

    def convert(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf
        return sharding.put_global(np.asarray(jax.device_get(leaf)), everywhere)

    return jax.tree.map(convert, tree)


def _file_digests(path: Path) -> dict[str, str]:
    """{path relative to `path`: SHA-256} of every file in the folder but the seal."""
    digests = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != SEAL:
            digests[f.relative_to(path).as_posix()] = hashlib.sha256(
                f.read_bytes()
            ).hexdigest()
    return digests


def _seal(path: Path) -> None:
    """Marks the checkpoint folder `path` complete: the SHA-256 of each of its files."""
    write_atomic(path / SEAL, json.dumps(_file_digests(path), indent=1))


def _check_seal(source: str, path: Path) -> None:
    """Refuses a checkpoint folder whose files differ from its seal (before Orbax
    reads them: a damaged file there would leave its reader's threads failing)."""
    try:
        sealed = json.loads((path / SEAL).read_text())
        if not isinstance(sealed, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        raise CheckpointError(
            f"{source} is incomplete (no {SEAL}: its save was cut short)"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{source} has a corrupted {SEAL}: {err}") from None
    found = _file_digests(path)
    for name, digest in sorted(sealed.items()):
        if name not in found:
            raise CheckpointError(f"{source} is damaged: its file {name} is missing")
        if found[name] != digest:
            raise CheckpointError(
                f"{source} is corrupted: its file {name} does not match its SHA-256"
            )


def _remove_unsealed(directory: Path) -> None:
    """Deletes checkpoint folders without a seal (a kill between Orbax's rename and
    the seal), which would block saving their iteration again."""
    if directory.is_dir():
        for name in os.listdir(directory):
            if _NAME.match(name) and not (directory / name / SEAL).is_file():
                shutil.rmtree(directory / name, ignore_errors=True)


def _check_save_settings(iteration, metrics_position, keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer, got {keep!r}")
    if int(iteration) < 0 or int(metrics_position) < 0:
        raise ValueError(
            "iteration and metrics_position must be >= 0, got "
            f"{iteration} and {metrics_position}"
        )


def _record(data, impls, iteration, metrics_position, metadata) -> dict:
    """The JSON record stored beside a checkpoint's arrays."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": es_l2o.__version__,
        "iteration": int(iteration),
        "metrics_position": int(metrics_position),
        "key_impls": impls,
        "metadata": dict(metadata or {}),
        "leaves": _leaf_table(data),
        "checksum": CHECKSUM,
        "sha256": _digest(data),
    }


def save(
    directory: str | os.PathLike,
    tree,
    *,
    iteration: int,
    metrics_position: int = 0,
    metadata: dict | None = None,
    keep: int = 3,
) -> Path:
    """Writes `tree` as the checkpoint of `iteration` and keeps the newest `keep`.

    Args:
        directory: the checkpoint folder (created if missing).
        tree: a pytree of arrays; typed PRNG keys are allowed.
        iteration: meta-iterations done; names the checkpoint.
        metrics_position: lines of metrics.jsonl that belong to this state.
        metadata: JSON-serialisable notes stored in its record.
        keep: how many checkpoints to keep (older ones are deleted).

    Returns:
        The path of the new checkpoint (a folder).
    """
    _check_save_settings(iteration, metrics_position, keep)
    import orbax.checkpoint as ocp

    directory = Path(directory)
    data, impls = _unkey(tree)
    data = _global(data)
    record = _record(data, impls, iteration, metrics_position, metadata)
    try:
        json.dumps(record)
    except TypeError as err:
        raise ValueError(f"metadata must be JSON-serialisable: {err}") from None
    if sharding.is_main_process():
        remove_temp_files(directory)  # of the earlier file format's killed writes
        _remove_unsealed(directory)
    sharding.sync(f"es_l2o.checkpoint.save {iteration}: cleaned")
    with _manager(directory, keep) as manager:
        manager.save(
            int(iteration),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_empty(data)),
                meta=ocp.args.JsonSave(record),
            ),
            force=True,
        )
        manager.wait_until_finished()
    path = checkpoint_path(directory, iteration)
    # every process's shards are written (Orbax finalises after all of them)
    sharding.sync(f"es_l2o.checkpoint.save {iteration}: written")
    if sharding.is_main_process():
        _seal(path)
    sharding.sync(f"es_l2o.checkpoint.save {iteration}: sealed")
    return path


def _first_line(err: BaseException) -> str:
    """The start of an error's message (tensorstore appends long specs)."""
    text = str(err).strip()
    text = text.splitlines()[0].split(" [tensorstore_spec")[0] if text else ""
    text = text or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _restore(path: Path, **items):
    """Orbax's restore of `items` from the checkpoint folder `path`."""
    import orbax.checkpoint as ocp

    try:
        with _manager(path.parent) as manager:
            return manager.restore(iteration_of(path), args=ocp.args.Composite(**items))
    except Exception as err:  # noqa: BLE001 - any damage, as one line
        raise CheckpointError(
            f"{str(path)!r} is damaged (corrupted or truncated): {_first_line(err)}"
        ) from None


def _check_record(source: str, record) -> dict:
    if not isinstance(record, dict):
        raise CheckpointError(f"{source} has a corrupted record: {record!r:.60}")
    if record.get("format") != FORMAT:
        raise CheckpointError(
            f"{source} holds format {record.get('format')!r}, expected {FORMAT!r}"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format version "
            f"{record.get('format_version')!r}; this es_l2o reads {FORMAT_VERSION}"
        )
    for name in ("iteration", "metrics_position"):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{source} has a bad {name}: {value!r}")
    if not isinstance(record.get("leaves"), list):
        raise CheckpointError(f"{source} has a corrupted record: no list of leaves")
    return record


def _check_leaves(source: str, stored: list, template) -> None:
    """The stored [[path, dtype, shape], ...] against `template`'s leaves."""
    expected = {path: (dtype, shape) for path, dtype, shape in _leaf_table(template)}
    try:
        found = {path: (dtype, shape) for path, dtype, shape in stored}
    except (TypeError, ValueError):
        raise CheckpointError(f"{source} has a corrupted list of leaves") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the expected structure: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for path, (dtype, shape) in expected.items():
        if found[path] != (dtype, shape):
            got_dtype, got_shape = found[path]
            raise CheckpointError(
                f"{source}: leaf {path} is {got_dtype}{got_shape}, expected "
                f"{dtype}{shape}"
            )


def _targets(template):
    """`template` with a sharding on every leaf: the template leaf's own, else the
    default device (alone) or every device (several processes: `_localise` then
    gives each process its own copy, as it had when saving)."""
    if jax.process_count() == 1:
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        default = sharding.replicated_everywhere()

    def target(x):
        where = getattr(x, "sharding", None)
        where = default if where is None else where
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    return jax.tree.map(target, template)


def _localise(tree, template):
    """Leaves restored onto every device for a template leaf without a sharding, as
    this process's own single-device arrays (several processes only)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(
        lambda x, t: (
            x if getattr(t, "sharding", None) is not None else x.addressable_data(0)
        ),
        tree,
        template,
    )


def _key_data_template(leaf):
    """The abstract key data of an abstract typed key, with the key's sharding."""
    shape = jax.eval_shape(jax.random.key_data, leaf)
    where = getattr(leaf, "sharding", None)
    if isinstance(where, jax.sharding.NamedSharding):
        spec = tuple(where.spec) + (None,) * (shape.ndim - len(where.spec))
        where = jax.sharding.NamedSharding(
            where.mesh, jax.sharding.PartitionSpec(*spec)
        )
    elif where is not None and not isinstance(where, jax.sharding.SingleDeviceSharding):
        where = None
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where)


def _checkpoint_folder(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest checkpoint inside it."""
    if path.is_dir() and not _NAME.match(path.name):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint ({PREFIX}_*) in {str(path)!r}")
        return found
    if not path.is_dir() or not _NAME.match(path.name):
        raise CheckpointError(f"no checkpoint folder ({PREFIX}_*) at {str(path)!r}")
    return path


def _without_keys(source: str, template, record: dict):
    """`template` with PRNG keys as their raw data, and each key's implementation
    by path (refused where the checkpoint's record names others)."""
    expected_impls = {}

    def data_template(path_, leaf):
        if _is_key(leaf):
            expected_impls[jax.tree_util.keystr(path_)] = _key_impl_name(leaf.dtype)
            return _key_data_template(leaf)
        return leaf

    plain = jax.tree_util.tree_map_with_path(data_template, template)
    if record.get("key_impls") != expected_impls:
        raise CheckpointError(
            f"{source} holds PRNG keys {record.get('key_impls')!r}, expected "
            f"{expected_impls!r}"
        )
    return plain, expected_impls


def load(path: str | os.PathLike, template) -> Checkpoint:
    """Reads a checkpoint and rebuilds `template`'s pytree from it.

    Args:
        path: a checkpoint folder, or a folder of checkpoints (its newest is read).
        template: the expected pytree, e.g. `jax.eval_shape` of the estimator's
            `init`; every leaf's path, shape and dtype is checked against it. Leaves
            that carry a sharding are restored with it (each process reading only
            its own devices' shards); others go to the default device.

    Raises:
        CheckpointError: no checkpoint there, or one that is corrupted, truncated, of
            another format, or of another structure than `template`.
    """
    import orbax.checkpoint as ocp

    path = _checkpoint_folder(Path(path))
    source = repr(str(path))
    _check_seal(source, path)
    record = _restore(path, meta=ocp.args.JsonRestore())["meta"]
    record = _check_record(source, record)
    plain, expected_impls = _without_keys(source, template, record)
    _check_leaves(source, record["leaves"], plain)
    target = _targets(_without_empty(plain))
    restored = _restore(path, state=ocp.args.StandardRestore(target))["state"]
    restored = _with_empty(restored, plain)
    digest = _digest if record.get("checksum") == CHECKSUM else _digest_bytes
    if digest(restored) != record.get("sha256"):
        raise CheckpointError(
            f"{source} is corrupted: its SHA-256 checksum does not match"
        )
    restored = _localise(restored, plain)

    def rewrap(path_, leaf):
        impl = expected_impls.get(jax.tree_util.keystr(path_))
        return leaf if impl is None else jax.random.wrap_key_data(leaf, impl=impl)

    tree = jax.tree_util.tree_map_with_path(rewrap, restored)
    metadata = record.get("metadata")
    return Checkpoint(
        tree,
        record["iteration"],
        record["metrics_position"],
        metadata if isinstance(metadata, dict) else {},
        path,
    )


def record(path: str | os.PathLike) -> dict:
    """A sealed checkpoint's record (iteration, metrics position, the caller's
    `metadata`, ...) without reading its arrays.

    Raises:
        CheckpointError: the folder is not a sealed checkpoint, or its record is
            damaged.
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    _check_seal(repr(str(path)), path)
    return _check_record(
        repr(str(path)), _restore(path, meta=ocp.args.JsonRestore())["meta"]
    )


def arrays(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """A checkpoint's record and arrays without a template: `(record, {path: array})`.

    For tools and tests; the leaf paths are those of the restored containers (dicts
    and lists where the run had dataclasses and tuples), and the checksum is not
    checked (`load` does, against the run's template).
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    _check_seal(repr(str(path)), path)
    record = _check_record(
        repr(str(path)), _restore(path, meta=ocp.args.JsonRestore())["meta"]
    )
    # onto this process's first device, whatever topology wrote it
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = _restore(path, state=ocp.args.StandardRestore(fallback_sharding=here))[
        "state"
    ]
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    # zero-size leaves by their path's names (the containers may differ)
    empty = {
        _path_names(path): shape
        for path, _, shape in record["leaves"]
        if math.prod(shape) == 0
    }

    def host(path, leaf):
        shape = empty.get(_path_names(jax.tree_util.keystr(path)))
        if shape is not None:
            return np.zeros(shape, leaf.dtype)
        return np.asarray(jax.device_get(leaf))

    return record, {jax.tree_util.keystr(p): host(p, x) for p, x in flat}
