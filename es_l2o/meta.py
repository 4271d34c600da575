"""The meta-training loop: a jitted `estimator.step` per iteration, Python only for I/O.

The loop logs every iteration (`metrics.jsonl`, optional TensorBoard event files, a
progress bar with ETA), checkpoints the whole training state (`es_l2o.checkpoint`)
every `checkpoint_every` iterations and at the end, and on SIGINT / SIGTERM finishes
the current iteration, writes a checkpoint and raises `Interrupted`. Iteration i's
key is a pure function of the run's key and i, and a checkpoint holds every other
piece of state, so a run resumed from any checkpoint ends bitwise where an
uninterrupted run ends (on the same machine and software).

Example:
    >>> import jax, optax
    >>> from es_l2o.es import FullES
    >>> from es_l2o.lopt import MLPLOpt
    >>> from es_l2o.unroll import LOptTraining
    >>> from populations.quadratic import QuadraticFamily
    >>> lopt = MLPLOpt(hidden_sizes=(8,))
    >>> system = LOptTraining(QuadraticFamily(), lopt, horizon=10)
    >>> es = FullES(system, population_size=8)
    >>> result = meta_train(es, lopt.init(jax.random.key(0)), key=jax.random.key(1),
    ...                     num_iterations=3, progress=False)
    >>> len(result.history)
    3
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from es_l2o import checkpoint as ckpt
from es_l2o import sharding


class MetaTrainResult(NamedTuple):
    """What a meta-training run returns.

    state: the final estimator state; theta: its mean meta-parameters;
    history: one metrics dict per iteration run by this call (a resumed run starts at
    its checkpoint); best_theta / best_iteration / best_validation_loss: the theta
    with the lowest meta-validation loss (the final theta, and NaN, when no
    validation function was given); checkpoint: the last checkpoint written, if any.
    """

    state: Any
    theta: Any
    history: list[dict[str, float]]
    best_theta: Any
    best_iteration: int
    best_validation_loss: float
    checkpoint: Path | None = None


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


class Interrupted(Exception):
    """Meta-training stopped on SIGINT or SIGTERM, after writing a checkpoint.

    Attributes: signum, iteration (iterations done), checkpoint (its path, or None).
    """

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        where = f"; checkpoint: {checkpoint}" if checkpoint is not None else ""
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after iteration {iteration}"
            + where
        )


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (another key, iteration, state)."""


class NonFiniteThetaError(FloatingPointError):
    """An estimator produced a non-finite theta (which estimators must never do)."""


def _to_python(metrics: dict) -> dict[str, float]:
    out = {}
    for name, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[name] = (
                float(value) if np.issubdtype(value.dtype, np.floating) else int(value)
            )
    return out


def _progress_fields(record: dict) -> dict[str, str]:
    """The progress line: the meta-loss, and per family (metrics "meta_loss/NAME",
    "nonfinite_steps/NAME") its meta-loss and, where any, its non-finite steps."""
    fields = {"meta_loss": f"{record.get('meta_loss', math.nan):.4g}"}
    for name, value in record.items():
        what, _, family = name.partition("/")
        if what == "meta_loss" and family:
            fields[family] = f"{value:.3g}"
        elif what == "nonfinite_steps" and family and value:
            fields[f"{family}:nonfinite"] = str(value)
    return fields


def iteration_key(key: jax.Array, iteration: int) -> jax.Array:
    """The key of meta-iteration `iteration`: a pure function of the run's key."""
    return jax.random.fold_in(key, iteration)


def _split_run_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    key_init, key_steps = jax.random.split(key)
    return key_init, key_steps


# ------------------------------------------------------------------------------------
# snapshots <-> checkpoint files


def _snapshot_tree(snapshot: Snapshot) -> dict:
    tree = {"estimator": snapshot.state, "key": snapshot.key}
    if snapshot.best_theta is not None:
        tree["best_theta"] = snapshot.best_theta
    return tree


def snapshot_template(estimator, theta, key: jax.Array, *, validation: bool) -> dict:
    """The abstract checkpoint tree of a run: the shapes, dtypes and shardings of
    the estimator's initial state (every estimator builds what it needs in its
    constructor; init runs concretely so that each leaf keeps its mesh sharding,
    onto which a checkpoint is restored)."""
    key_init, key_steps = _split_run_key(key)
    state = sharding.abstract(estimator.init(key_init, theta))
    shapes = jax.eval_shape(lambda: (key_steps, theta))
    return _snapshot_tree(
        Snapshot(state, shapes[0], 0, 0, shapes[1] if validation else None)
    )


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
        _snapshot_tree(snapshot),
        iteration=snapshot.iteration,
        metrics_position=snapshot.metrics_position,
        metadata=notes,
        keep=keep,
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
    template = snapshot_template(estimator, theta, key, validation=validation)
    loaded = ckpt.load(path, template)
    tree = loaded.tree
    _, key_steps = _split_run_key(key)
    if not np.array_equal(
        jax.random.key_data(tree["key"]), jax.random.key_data(key_steps)
    ):
        raise ResumeError(
            f"{str(loaded.path)!r} was written by a run with another key (seed); "
            "resume it with the seed it was started with"
        )
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
    return Snapshot(
        state=tree["estimator"],
        key=tree["key"],
        iteration=loaded.iteration,
        metrics_position=loaded.metrics_position,
        best_theta=tree.get("best_theta"),
        best_iteration=best_iteration,
        best_validation_loss=loss,
    )


def _check_snapshot(template: dict, snapshot: Snapshot) -> None:
    tree = _snapshot_tree(snapshot)
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


# ------------------------------------------------------------------------------------
# files and signals


def _count_lines(path) -> int:
    if path is None or not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def truncate_lines(path: str | os.PathLike, num_lines: int) -> int:
    """Cuts the text file at `path` after its first `num_lines` lines.

    Returns the number of lines it keeps (fewer if it had fewer complete lines).
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


class _StopRequest:
    """A signal handler that records the first SIGINT / SIGTERM; a second SIGINT
    stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        del frame
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            print(
                f"\n{signal.Signals(signum).name} received: finishing the current "
                "iteration, then writing a checkpoint (Ctrl-C again stops at once, "
                "without one)",
                file=sys.stderr,
                flush=True,
            )
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[_StopRequest]:
    request = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------
# the loop


def meta_train(
    estimator,
    theta,
    *,
    key: jax.Array,
    num_iterations: int,
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int, Any], None] | None = None,
    checkpoint_every: int = 0,
    validate: Callable[[Any], float] | None = None,
    validate_every: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_keep: int = 3,
    checkpoint_metadata: dict | None = None,
    resume: Snapshot | str | os.PathLike | None = None,
    handle_signals: bool = True,
    tensorboard_dir: str | os.PathLike | None = None,
) -> MetaTrainResult:
    """Runs meta-iterations of `estimator` from `theta` up to `num_iterations` in all.

    Args:
        estimator: any estimator of `es_l2o.es` (`init`, jitted `step`, `theta`).
        theta: the initial meta-parameters (on resume: those the run started from;
            they fix the state's structure).
        key: the run's key; iteration i uses `iteration_key(key_steps, i)`.
        num_iterations: the total meta-iterations of the run (a resumed run does the
            ones after its checkpoint).
        metrics_path: if given, one JSON line per iteration is appended there
            (iteration, wall time, and every scalar metric of the estimator); on
            resume it is first cut back to the lines of the checkpoint.
        progress: show a progress bar with ETA and the current meta-loss.
        on_checkpoint: called as `on_checkpoint(iteration, state)` whenever a
            checkpoint is due: every `checkpoint_every` iterations, after the last
            one, and on SIGINT / SIGTERM.
        validate: meta-validation loss of a theta (lower is better), evaluated on
            the initial theta, every `validate_every` iterations and after the last
            one; the best theta is returned as `best_theta`.
        checkpoint_dir: if given, the whole state is checkpointed there (see
            `es_l2o.checkpoint`) when a checkpoint is due; it must hold no
            checkpoint unless resuming.
        checkpoint_keep: how many checkpoints to keep.
        checkpoint_metadata: JSON notes stored in every checkpoint's header.
        resume: a `Snapshot`, or a checkpoint file or folder, to continue from.
        handle_signals: with checkpoints, SIGINT / SIGTERM finish the current
            iteration, write a checkpoint and raise `Interrupted` (a second SIGINT
            stops at once). Main thread only.
        tensorboard_dir: if given, every iteration's scalars also go to a
            TensorBoard event file there.

    Raises:
        Interrupted: stopped by SIGINT / SIGTERM (after writing a checkpoint).
        NonFiniteThetaError: the estimator produced a non-finite theta.
        es_l2o.checkpoint.CheckpointError: `resume` names a bad checkpoint file.
        ResumeError: the checkpoint belongs to another run or lies beyond
            `num_iterations`.
    """
    for name, value, low in (
        ("num_iterations", num_iterations, 0),
        ("checkpoint_every", checkpoint_every, 0),
        ("validate_every", validate_every, 0),
        ("checkpoint_keep", checkpoint_keep, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    validating = validate is not None
    key_init, key_steps = _split_run_key(key)
    if resume is None:
        if checkpoint_dir is not None and ckpt.checkpoints(checkpoint_dir):
            raise ValueError(
                f"{os.fspath(checkpoint_dir)!r} already holds checkpoints of a run: "
                "resume from them, or checkpoint a new run into an empty folder"
            )
        state = estimator.init(key_init, theta)
        start = 0
        position = _count_lines(metrics_path)
        best_loss = float(validate(theta)) if validating else math.nan
        best = (best_loss, 0, theta if validating else None)
    else:
        if isinstance(resume, Snapshot):
            template = snapshot_template(estimator, theta, key, validation=validating)
            _check_snapshot(template, resume)
            snapshot = resume
        else:
            snapshot = load_snapshot(
                resume, estimator, theta, key, validation=validating
            )
        if snapshot.iteration > num_iterations:
            raise ResumeError(
                f"the checkpoint is at iteration {snapshot.iteration}, beyond "
                f"num_iterations={num_iterations}: give num_iterations >= "
                f"{snapshot.iteration}"
            )
        state, start = snapshot.state, snapshot.iteration
        position = snapshot.metrics_position
        if metrics_path is not None:
            position = truncate_lines(metrics_path, position)
        best = (
            snapshot.best_validation_loss,
            snapshot.best_iteration,
            snapshot.best_theta,
        )

    history: list[dict[str, float]] = []
    last_saved = start if resume is not None else None
    written: Path | None = None

    def save(done: int) -> None:
        nonlocal last_saved, written
        if last_saved == done:
            return
        if checkpoint_dir is not None:
            written = save_snapshot(
                checkpoint_dir,
                Snapshot(state, key_steps, done, position, best[2], best[1], best[0]),
                keep=checkpoint_keep,
                metadata=checkpoint_metadata,
            )
        if on_checkpoint is not None:
            on_checkpoint(done, state)
        last_saved = done

    bar = log = board = None
    catch = handle_signals and (checkpoint_dir is not None or on_checkpoint is not None)
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=num_iterations,
                initial=start,
                desc="meta-training",
                unit="it",
                dynamic_ncols=True,
            )
        if metrics_path is not None:
            log = open(metrics_path, "a")  # noqa: SIM115
        if tensorboard_dir is not None:
            from es_l2o.summaries import ScalarWriter

            board = ScalarWriter(
                tensorboard_dir, purge_step=start if resume is not None else None
            )
        with _stop_on_signals(catch) as stop:
            done = start
            for iteration in range(start, num_iterations):
                if stop.signum is not None:
                    break
                t0 = time.perf_counter()
                new_state, metrics = estimator.step(
                    iteration_key(key_steps, iteration), state
                )
                record = _to_python(metrics)
                record = {
                    "iteration": iteration,
                    "wall_time_s": time.perf_counter() - t0,
                    **record,
                }
                if not record.get("theta_finite", 1):
                    where = f"; the last checkpoint is {written}" if written else ""
                    raise NonFiniteThetaError(
                        f"theta became non-finite at iteration {iteration} (the "
                        f"estimator {type(estimator).__name__} must keep it finite)"
                        + where
                    )
                state, done = new_state, iteration + 1
                if validating and (
                    done == num_iterations
                    or (validate_every and done % validate_every == 0)
                ):
                    current = estimator.theta(state)
                    record["meta_validation_loss"] = loss = float(validate(current))
                    if math.isfinite(loss) and not loss >= best[0]:  # NaN best too
                        best = (loss, done, current)
                history.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    position += 1
                if board is not None:
                    board.scalars(
                        iteration, {k: v for k, v in record.items() if k != "iteration"}
                    )
                    board.flush()
                if bar is not None:
                    bar.set_postfix(_progress_fields(record))
                    bar.update(1)
                if done == num_iterations or (
                    checkpoint_every and done % checkpoint_every == 0
                ):
                    save(done)
            if stop.signum is not None:
                save(done)
                raise Interrupted(stop.signum, done, written)
    finally:
        for closeable in (bar, log, board):
            if closeable is not None:
                closeable.close()
    theta = estimator.theta(state)
    if not validating:
        return MetaTrainResult(
            state, theta, history, theta, num_iterations, math.nan, written
        )
    return MetaTrainResult(state, theta, history, best[2], best[1], best[0], written)
