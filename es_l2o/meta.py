"""The meta-training loop: a jitted `estimator.step` per iteration, Python only for I/O.

`train` is the loop; what happens around each step is delegated to small
collaborators, each usable alone: a `RunLog` (metrics.jsonl, TensorBoard, progress
bar), a `Checkpointer` (the whole training state, every `every` iterations, at the
end, and on SIGINT / SIGTERM, after which `Interrupted` is raised), a `Validator`
with a `BestTheta` (meta-validation and the best theta so far). `meta_train` builds
them from plain keywords. Iteration i's key is a pure function of the run's key and
i, and a checkpoint holds every other piece of state, so a run resumed from any
checkpoint ends bitwise where an uninterrupted run ends (same machine and software).

Example:
    >>> import jax
    >>> from es_l2o.es import FullES
    >>> from es_l2o.lopt import MLPLOpt
    >>> from es_l2o.tasks import ToyQuadraticFamily
    >>> from es_l2o.unroll import LOptTraining
    >>> lopt = MLPLOpt(hidden_sizes=(4,))
    >>> system = LOptTraining(ToyQuadraticFamily(dim=2), lopt, horizon=3)
    >>> es = FullES(system, population_size=4)
    >>> result = meta_train(es, lopt.init(jax.random.key(0)), key=jax.random.key(1),
    ...                     num_iterations=2, progress=False)
    >>> len(result.history), sorted(result.history[0])[:2]
    (2, ['iteration', 'meta_loss'])
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax

from es_l2o import sharding
from es_l2o.checkpointer import (
    Checkpointer,
    ResumeError,
    Snapshot,
    check_snapshot,
    load_snapshot,
    save_snapshot,
    snapshot_tree,
    split_run_key,
    truncate_lines,
)
from es_l2o.es import common
from es_l2o.run_log import RunLog, scalars
from es_l2o.validation import BestTheta, Validator

__all__ = [
    "Checkpointer",
    "Interrupted",
    "MetaTrainResult",
    "NonFiniteThetaError",
    "ResumeError",
    "RunLog",
    "Snapshot",
    "Validator",
    "iteration_key",
    "load_snapshot",
    "meta_train",
    "save_snapshot",
    "snapshot_template",
    "train",
    "truncate_lines",
]

# the names snapshot_template uses
_split_run_key = split_run_key
_snapshot_tree = snapshot_tree


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


class NonFiniteThetaError(FloatingPointError):
    """An estimator produced a non-finite theta (which estimators must never do)."""


def iteration_key(key: jax.Array, iteration: int) -> jax.Array:
    """The key of meta-iteration `iteration`: a pure function of the run's key."""
    return jax.random.fold_in(key, iteration)


# ------------------------------------------------------------------------------------
# snapshots <-> checkpoint files


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


# ------------------------------------------------------------------------------------
# signals


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


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _start(estimator, theta, key, num_iterations, resume, checkpointer, validator):
    """The snapshot a run starts from: a fresh one, or `resume`'s (checked)."""
    key_init, key_steps = split_run_key(key)
    validating = validator is not None
    if resume is None:
        checkpointer.check_fresh()
        state = estimator.init(key_init, theta)
        loss = validator(theta) if validating else math.nan
        return Snapshot(state, key_steps, 0, 0, theta if validating else None, 0, loss)
    if isinstance(resume, Snapshot):
        template = snapshot_template(estimator, theta, key, validation=validating)
        check_snapshot(template, resume)
        snapshot = resume
    else:
        snapshot = load_snapshot(resume, estimator, theta, key, validation=validating)
    if snapshot.iteration > num_iterations:
        raise ResumeError(
            f"the checkpoint is at iteration {snapshot.iteration}, beyond "
            f"num_iterations={num_iterations}: give num_iterations >= "
            f"{snapshot.iteration}"
        )
    checkpointer.last_saved = snapshot.iteration
    return snapshot._replace(key=key_steps)


def _step(estimator, state, key_steps, iteration: int, checkpointer: Checkpointer):
    """One meta-iteration: (new state, its record); refuses a non-finite theta."""
    t0 = time.perf_counter()
    # the step that consumes its state where the estimator has one: the new state
    # then lives in the old one's buffers (a fresh P/2 x D score or Adam state costs
    # more to allocate on a CPU than to update in place)
    step = getattr(estimator, "step_in_place", estimator.step)
    state, metrics = step(iteration_key(key_steps, iteration), state)
    record = scalars(metrics)  # waits for the device: part of the wall time
    record = {"iteration": iteration, "wall_time_s": time.perf_counter() - t0, **record}
    if not record.get("theta_finite", 1):
        last = checkpointer.written
        raise NonFiniteThetaError(
            f"theta became non-finite at iteration {iteration} (the estimator "
            f"{type(estimator).__name__} must keep it finite)"
            + (f"; the last checkpoint is {last}" if last else "")
        )
    return state, record


def _copy(tree):
    """`tree` with every array copied."""
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _owned(state, theta, resume):
    """`state` with nothing the caller holds and no array twice: the loop's steps
    consume their state (`step_in_place`), so a resumed `Snapshot` is copied, and
    so is any array of a fresh state that is one of `theta`'s."""
    if isinstance(resume, Snapshot):
        return _copy(state)
    return common.distinct_arrays(state, jax.tree.leaves(theta))


def train(
    estimator,
    theta,
    *,
    key: jax.Array,
    num_iterations: int,
    log: RunLog | None = None,
    checkpointer: Checkpointer | None = None,
    validator: Validator | None = None,
    resume: Snapshot | str | os.PathLike | None = None,
    handle_signals: bool = True,
) -> MetaTrainResult:
    """Runs meta-iterations of `estimator` from `theta` up to `num_iterations` in all.

    `log` reports every iteration, `checkpointer` saves when due (and, with
    `handle_signals`, on SIGINT / SIGTERM, then raises `Interrupted`), `validator`
    scores the mean theta when due. Arguments and errors: see `meta_train`.

    Each iteration runs the estimator's `step_in_place` where it has one (else its
    `step`): the state it is given is consumed, so a checkpoint callback that keeps
    arrays of the state must copy them.
    """
    _check_count("num_iterations", num_iterations, 0)
    log = RunLog(progress=False) if log is None else log
    checkpointer = Checkpointer() if checkpointer is None else checkpointer
    first = _start(
        estimator, theta, key, num_iterations, resume, checkpointer, validator
    )
    state, done, history = _owned(first.state, theta, resume), first.iteration, []
    best = BestTheta(first.best_validation_loss, first.best_iteration, first.best_theta)

    def snapshot() -> Snapshot:
        return Snapshot(
            state, first.key, done, log.position, best.theta, best.iteration, best.loss
        )

    position = None if resume is None else first.metrics_position
    catch = handle_signals and checkpointer.active
    with (
        log.open(total=num_iterations, start=done, position=position),
        _stop_on_signals(catch) as stop,
    ):
        for iteration in range(first.iteration, num_iterations):
            if stop.signum is not None:
                break
            state, record = _step(estimator, state, first.key, iteration, checkpointer)
            done = iteration + 1
            if validator is not None and validator.due(done, num_iterations):
                current = _copy(estimator.theta(state))  # the state's are consumed
                record["meta_validation_loss"] = loss = validator(current)
                best = best.offer(loss, done, current)
            history.append(record)
            log.write(record)
            if checkpointer.due(done, num_iterations):
                checkpointer.save(snapshot())
        if stop.signum is not None:
            raise Interrupted(stop.signum, done, checkpointer.save(snapshot()))
    final = estimator.theta(state)
    if validator is None:
        best = BestTheta(math.nan, num_iterations, final)
    written = checkpointer.written
    return MetaTrainResult(
        state, final, history, best.theta, best.iteration, best.loss, written
    )


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
    """`train` with its collaborators built from plain keywords.

    Args:
        estimator: any estimator of `es_l2o.es` (`init`, jitted `step`, `theta`).
        theta: the initial meta-parameters (on resume: those the run started from;
            they fix the state's structure).
        key: the run's key; iteration i uses `iteration_key(key_steps, i)`.
        num_iterations: the run's total (a resumed run does those after it).
        metrics_path, tensorboard_dir, progress: the `RunLog`.
        on_checkpoint, checkpoint_*: the `Checkpointer` (`checkpoint_dir` must hold
            no checkpoint unless resuming).
        validate, validate_every: the `Validator` (loss of a theta, lower is
            better); the best theta is returned.
        resume: a `Snapshot`, or a checkpoint file or folder, to continue from.
        handle_signals: with checkpoints, SIGINT / SIGTERM finish the iteration,
            write a checkpoint and raise `Interrupted`. Main thread only.

    Raises:
        Interrupted: stopped by SIGINT / SIGTERM (after writing a checkpoint).
        NonFiniteThetaError: the estimator produced a non-finite theta.
        es_l2o.checkpoint.CheckpointError: `resume` names a bad checkpoint file.
        ResumeError: the checkpoint belongs to another run or lies beyond
            `num_iterations`.
    """
    return train(
        estimator,
        theta,
        key=key,
        num_iterations=num_iterations,
        log=RunLog(metrics_path, tensorboard_dir=tensorboard_dir, progress=progress),
        checkpointer=Checkpointer(
            checkpoint_dir,
            every=checkpoint_every,
            keep=checkpoint_keep,
            metadata=checkpoint_metadata,
            on_checkpoint=on_checkpoint,
        ),
        validator=None if validate is None else Validator(validate, validate_every),
        resume=resume,
        handle_signals=handle_signals,
    )
