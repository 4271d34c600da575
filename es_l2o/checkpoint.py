"""Checkpoints of a whole meta-training state, written atomically, the last k kept.

A checkpoint holds any pytree of arrays (the estimator state with its evosax state
and meta-optimizer state, every particle's inner state, the run's key, ...) plus the
iteration and the number of lines of `metrics.jsonl` written at that point. The file
format is that of `es_l2o.export.write_arrays` (a JSON header and raw little-endian
arrays, with a SHA-256 checksum over both; optimizer files used it before they became
safetensors): loading parses JSON and bytes only, never runs code, and checks every
leaf's path, shape and dtype against a template. Typed PRNG
keys are stored as their raw key data and rewrapped with their implementation.

Each file is written to a temporary file, flushed, fsynced and renamed over its final
name, and the directory is fsynced, so a kill at any moment leaves either the old
set of checkpoints or the old set plus a complete new one.

Example:
    >>> import jax, jax.numpy as jnp, tempfile
    >>> tree = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
    >>> directory = tempfile.mkdtemp()
    >>> path = save(directory, tree, iteration=5, metrics_position=5)
    >>> path.name
    'ckpt-00000005.eslc'
    >>> restored = load(directory, jax.eval_shape(lambda: tree))
    >>> restored.iteration, bool(jnp.all(restored.tree["w"] == tree["w"]))
    (5, True)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax

import es_l2o
from es_l2o.export import OptimizerFileError, read_arrays, restore_tree, write_arrays
from es_l2o.files import remove_temp_files

FORMAT = "es_l2o.checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".eslc"
_NAME = re.compile(r"^ckpt-(\d{8,})" + re.escape(SUFFIX) + r"$")
#: PRNG implementations a checkpoint may name for its typed keys
KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


class CheckpointError(OptimizerFileError):
    """A checkpoint that is missing, corrupted or does not fit the expected state."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint.

    tree: the saved pytree (leaves as jax arrays); iteration: meta-iterations done;
    metrics_position: lines of metrics.jsonl written when it was saved; metadata: the
    JSON metadata given to `save`; path: the file it came from.
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


def checkpoint_path(directory: str | os.PathLike, iteration: int) -> Path:
    """Where `save` puts the checkpoint of `iteration` in `directory`."""
    return Path(directory) / f"ckpt-{int(iteration):08d}{SUFFIX}"


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in `directory`, oldest (lowest iteration) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), directory / name)
        for name in os.listdir(directory)
        if (m := _NAME.match(name))
    ]
    return [path for _, path in sorted(found)]


def iteration_of(path: str | os.PathLike) -> int:
    """The iteration a checkpoint's file name gives (its header holds the same)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{str(path)!r} is not named like a checkpoint")
    return int(match.group(1))


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory`, or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


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
        iteration: meta-iterations done; names the file.
        metrics_position: lines of metrics.jsonl that belong to this state.
        metadata: JSON-serialisable notes stored in the header.
        keep: how many checkpoints to keep (older ones are deleted).

    Returns:
        The path of the new checkpoint.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer, got {keep!r}")
    if int(iteration) < 0 or int(metrics_position) < 0:
        raise ValueError(
            "iteration and metrics_position must be >= 0, got "
            f"{iteration} and {metrics_position}"
        )
    directory = Path(directory)
    data, impls = _unkey(tree)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": es_l2o.__version__,
        "iteration": int(iteration),
        "metrics_position": int(metrics_position),
        "key_impls": impls,
        "metadata": dict(metadata or {}),
    }
    path = checkpoint_path(directory, iteration)
    write_arrays(path, data, header)
    for old in checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    remove_temp_files(directory)  # of killed writes
    return path


def load(path: str | os.PathLike, template) -> Checkpoint:
    """Reads a checkpoint and rebuilds `template`'s pytree from it.

    Args:
        path: a checkpoint file, or a folder (its newest checkpoint is read).
        template: the expected pytree, e.g. `jax.eval_shape` of the estimator's
            `init`; every leaf's path, shape and dtype is checked against it.

    Raises:
        CheckpointError: no checkpoint there, or one that is corrupted, truncated, of
            another format, or of another structure than `template`.
    """
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint (ckpt-*{SUFFIX}) in {str(path)!r}")
        path = found
    elif not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    try:
        header, arrays = read_arrays(path, FORMAT)
    except OptimizerFileError as err:
        raise CheckpointError(str(err)) from None
    source = repr(str(path))
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format version "
            f"{header.get('format_version')!r}; this es_l2o reads {FORMAT_VERSION}"
        )
    iteration, position = header.get("iteration"), header.get("metrics_position")
    for name, value in (("iteration", iteration), ("metrics_position", position)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{source} has a bad {name}: {value!r}")
    expected_impls = {}

    def data_template(path_, leaf):
        if _is_key(leaf):
            expected_impls[jax.tree_util.keystr(path_)] = _key_impl_name(leaf.dtype)
            return jax.eval_shape(jax.random.key_data, leaf)
        return leaf

    plain = jax.tree_util.tree_map_with_path(data_template, template)
    if header.get("key_impls") != expected_impls:
        raise CheckpointError(
            f"{source} holds PRNG keys {header.get('key_impls')!r}, expected "
            f"{expected_impls!r}"
        )
    try:
        restored = restore_tree(plain, arrays, source=source)
    except OptimizerFileError as err:
        raise CheckpointError(str(err)) from None

    def rewrap(path_, leaf):
        impl = expected_impls.get(jax.tree_util.keystr(path_))
        return leaf if impl is None else jax.random.wrap_key_data(leaf, impl=impl)

    tree = jax.tree_util.tree_map_with_path(rewrap, restored)
    metadata = header.get("metadata")
    return Checkpoint(
        tree,
        iteration,
        position,
        metadata if isinstance(metadata, dict) else {},
        path,
    )
