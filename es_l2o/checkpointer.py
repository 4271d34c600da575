"""What meta-training saves, when, and how a run continues from it.

A `Snapshot` is everything a run needs to continue: the estimator state, the run's
iteration key stream, the iterations done, the lines of metrics.jsonl that belong to
them and the best meta-validated theta so far. `save_snapshot` / `load_snapshot`
write and read one through `es_l2o.checkpoint` (the file format); a `Checkpointer`
decides when one is due and writes it.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> saved = []
    >>> checkpointer = Checkpointer(every=2, on_checkpoint=lambda i, s: saved.append(i))
    >>> [i for i in range(1, 6) if checkpointer.due(i, num_iterations=5)]
    [2, 4, 5]
    >>> _ = checkpointer.save(Snapshot({"w": jnp.zeros(2)}, None, 4, 4))
    >>> _ = checkpointer.save(Snapshot({"w": jnp.zeros(2)}, None, 4, 4))  # done
    >>> saved
    [4]
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from es_l2o import checkpoint as ckpt


class Snapshot(NamedTuple):
    """Everything meta-training needs to continue: what a checkpoint holds.

    state: the estimator state (evosax state with its optimizer state, particles'
    inner states, ...); key: the run's iteration key stream (`iteration_key(key, i)`);
    iteration: meta-iterations done; metrics_position: lines of metrics.jsonl that
    belong to them; best_*: the best meta-validated theta so far (best_theta is None
    without validation).
    """

    state: Any
    key: jax.Array
    iteration: int
    metrics_position: int
    best_theta: Any = None
    best_iteration: int = 0
    best_validation_loss: float = math.nan


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (another key, iteration, state)."""


def split_run_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(key of the estimator's init, key stream of the iterations) of a run's key."""
    key_init, key_steps = jax.random.split(key)
    return key_init, key_steps


def snapshot_tree(snapshot: Snapshot) -> dict:
    """The pytree a checkpoint file holds for `snapshot`."""
    tree = {"estimator": snapshot.state, "key": snapshot.key}
    if snapshot.best_theta is not None:
        tree["best_theta"] = snapshot.best_theta
    return tree


def save_snapshot(
    directory: str | os.PathLike,
    snapshot: Snapshot,
    *,
    keep: int = 3,
    metadata: dict | None = None,
) -> Path:
    """Writes `snapshot` as a checkpoint in `directory`; keeps the newest `keep`."""
    loss = snapshot.best_validation_loss
    notes = {
        **(metadata or {}),
        "best_iteration": int(snapshot.best_iteration),
        "best_validation_loss": float(loss) if math.isfinite(loss) else repr(loss),
    }
    return ckpt.save(
        directory,
        snapshot_tree(snapshot),
        iteration=snapshot.iteration,
        metrics_position=snapshot.metrics_position,
        metadata=notes,
        keep=keep,
    )


def _best_of(loaded: ckpt.Checkpoint) -> tuple[float, int]:
    """(best_validation_loss, best_iteration) from a checkpoint's metadata."""
    loss = loaded.metadata.get("best_validation_loss", "nan")
    best_iteration = loaded.metadata.get("best_iteration", loaded.iteration)
    try:
        loss = float(loss if isinstance(loss, int | float) else str(loss))
        if isinstance(best_iteration, bool) or not isinstance(best_iteration, int):
            raise ValueError(f"best_iteration {best_iteration!r}")
    except ValueError as err:
        raise ckpt.CheckpointError(
            f"{str(loaded.path)!r} has bad metadata: {err}"
        ) from None
    return loss, best_iteration


def read_snapshot(path: str | os.PathLike, template: dict, key: jax.Array) -> Snapshot:
    """Reads the checkpoint at `path` (a file or a folder's newest) of the run `key`
    whose checkpoint tree is shaped like `template` (`meta.snapshot_template`)."""
    loaded = ckpt.load(path, template)
    tree = loaded.tree
    _, key_steps = split_run_key(key)
    if not np.array_equal(
        jax.random.key_data(tree["key"]), jax.random.key_data(key_steps)
    ):
        raise ResumeError(
            f"{str(loaded.path)!r} was written by a run with another key (seed); "
            "resume it with the seed it was started with"
        )
    loss, best_iteration = _best_of(loaded)
    return Snapshot(
        state=tree["estimator"],
        key=tree["key"],
        iteration=loaded.iteration,
        metrics_position=loaded.metrics_position,
        best_theta=tree.get("best_theta"),
        best_iteration=best_iteration,
        best_validation_loss=loss,
    )


def load_snapshot(
    path: str | os.PathLike, estimator, theta, key: jax.Array, *, validation: bool
) -> Snapshot:
    """Reads a checkpoint file (or a folder's newest) of the run `(estimator, key)`.

    Args:
        path: a checkpoint file or a folder of checkpoints.
        estimator, theta, key: the run as `meta_train` receives it; every leaf of the
            checkpoint is checked against the estimator's state, and its key stream
            against `key`.
        validation: whether the run meta-validates (then it holds a best theta).

    Raises:
        es_l2o.checkpoint.CheckpointError: missing, corrupted, or of another
            structure.
        ResumeError: written by a run with another key.
    """
    # the template comes from the trainer, which owns the estimator's state shape
    from es_l2o.meta import snapshot_template

    template = snapshot_template(estimator, theta, key, validation=validation)
    return read_snapshot(path, template, key)


def check_snapshot(template: dict, snapshot: Snapshot) -> None:
    """Raises ResumeError unless `snapshot` has the structure, shapes and dtypes of
    `template`."""
    tree = snapshot_tree(snapshot)
    if jax.tree.structure(template) != jax.tree.structure(tree):
        raise ResumeError(
            "the snapshot to resume from does not match this estimator's state: "
            f"{jax.tree.structure(tree)} vs {jax.tree.structure(template)}"
        )
    for want, got in zip(jax.tree.leaves(template), jax.tree.leaves(tree), strict=True):
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ResumeError(
                f"the snapshot to resume from holds {got.dtype}{list(got.shape)} "
                f"where this estimator's state holds {want.dtype}{list(want.shape)}"
            )


def count_lines(path: str | os.PathLike | None) -> int:
    """Complete lines of the file at `path` (0 when there is none)."""
    if path is None or not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def truncate_lines(path: str | os.PathLike, num_lines: int) -> int:
    """Cuts the text file at `path` after its first `num_lines` lines.

    Returns the number of lines it keeps (fewer if it had fewer complete lines).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> _ = path.write_text("a\\nb\\nc")
        >>> truncate_lines(path, 1), path.read_text()
        (1, 'a\\n')
    """
    if not os.path.isfile(path):
        if num_lines:
            warnings.warn(
                f"{os.fspath(path)!r} is missing; its first {num_lines} lines are lost",
                stacklevel=2,
            )
        return 0
    with open(path, "rb") as f:
        data = f.read()
    end, kept = 0, 0
    while kept < num_lines:
        newline = data.find(b"\n", end)
        if newline < 0:
            break
        end, kept = newline + 1, kept + 1
    if kept < num_lines:
        warnings.warn(
            f"{os.fspath(path)!r} holds {kept} complete lines, the checkpoint expects "
            f"{num_lines}; continuing after them",
            stacklevel=2,
        )
    if end < len(data):
        os.truncate(path, end)
    return kept


class Checkpointer:
    """Saves a run's `Snapshot` when one is due: every `every` iterations, after
    the last one, and when the run is stopped.

    Args:
        directory: where checkpoints go (`es_l2o.checkpoint`); None writes none.
        every: iterations between checkpoints (0: only at the end and on a stop).
        keep: how many checkpoints to keep.
        metadata: JSON notes stored in every checkpoint's header.
        on_checkpoint: also called as `on_checkpoint(iteration, state)` on each save
            (e.g. to export the current theta).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        every: int = 0,
        keep: int = 3,
        metadata: dict | None = None,
        on_checkpoint: Callable[[int, Any], None] | None = None,
    ):
        for name, value, low in (("every", every, 0), ("keep", keep, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.directory = None if directory is None else Path(directory)
        self.every, self.keep = every, keep
        self.metadata, self.on_checkpoint = metadata, on_checkpoint
        self.last_saved: int | None = None
        self.written: Path | None = None

    @property
    def active(self) -> bool:
        """Whether a save does anything (then a stop request saves first)."""
        return self.directory is not None or self.on_checkpoint is not None

    def check_fresh(self) -> None:
        """Raises ValueError if `directory` already holds a run's checkpoints."""
        if self.directory is not None and ckpt.checkpoints(self.directory):
            raise ValueError(
                f"{os.fspath(self.directory)!r} already holds checkpoints of a run: "
                "resume from them, or checkpoint a new run into an empty folder"
            )

    def due(self, done: int, num_iterations: int) -> bool:
        """Whether a checkpoint is due after `done` of `num_iterations` iterations."""
        return done == num_iterations or bool(self.every and done % self.every == 0)

    def save(self, snapshot: Snapshot) -> Path | None:
        """Saves `snapshot` unless its iteration is already saved; the newest file."""
        if self.last_saved == snapshot.iteration:
            return self.written
        if self.directory is not None:
            self.written = save_snapshot(
                self.directory, snapshot, keep=self.keep, metadata=self.metadata
            )
        if self.on_checkpoint is not None:
            self.on_checkpoint(snapshot.iteration, snapshot.state)
        self.last_saved = snapshot.iteration
        return self.written
