"""The meta-training loop: a jitted `estimator.step` per iteration, Python only for I/O.

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

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np


class MetaTrainResult(NamedTuple):
    """What a meta-training run returns.

    state: the final estimator state; theta: its mean meta-parameters;
    history: one metrics dict per iteration; best_theta / best_iteration /
    best_validation_loss: the theta with the lowest meta-validation loss (the final
    theta, and NaN, when no validation function was given).
    """

    state: Any
    theta: Any
    history: list[dict[str, float]]
    best_theta: Any
    best_iteration: int
    best_validation_loss: float


def _to_python(metrics: dict) -> dict[str, float]:
    out = {}
    for name, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[name] = (
                float(value) if np.issubdtype(value.dtype, np.floating) else int(value)
            )
    return out


def iteration_key(key: jax.Array, iteration: int) -> jax.Array:
    """The key of meta-iteration `iteration`: a pure function of the run's key."""
    return jax.random.fold_in(key, iteration)


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
) -> MetaTrainResult:
    """Runs `num_iterations` meta-iterations of `estimator` starting from `theta`.

    Args:
        estimator: any estimator of `es_l2o.es` (`init`, jitted `step`, `theta`).
        theta: the initial meta-parameters.
        key: the run's key; iteration i uses `iteration_key(key, i)`.
        num_iterations: meta-iterations to run.
        metrics_path: if given, one JSON line per iteration is appended there
            (iteration, wall time, and every scalar metric of the estimator).
        progress: show a progress bar with ETA and the current meta-loss.
        on_checkpoint: called as `on_checkpoint(iteration, state)` every
            `checkpoint_every` iterations and after the last one.
        validate: meta-validation loss of a theta (lower is better), evaluated on
            the initial theta, every `validate_every` iterations and after the last
            one; the best theta is returned as `best_theta`.
    """
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    key_init, key_steps = jax.random.split(key)
    state = estimator.init(key_init, theta)
    history = []
    best = (math.inf, 0, theta)
    if validate is not None:
        best = (float(validate(theta)), 0, theta)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=num_iterations, desc="meta-training", unit="it", dynamic_ncols=True
        )
    log = open(metrics_path, "a") if metrics_path is not None else None  # noqa: SIM115
    try:
        for iteration in range(num_iterations):
            start = time.perf_counter()
            state, metrics = estimator.step(iteration_key(key_steps, iteration), state)
            record = _to_python(metrics)
            record = {
                "iteration": iteration,
                "wall_time_s": time.perf_counter() - start,
                **record,
            }
            done = iteration + 1
            if validate is not None and (
                done == num_iterations
                or (validate_every and done % validate_every == 0)
            ):
                current = estimator.theta(state)
                record["meta_validation_loss"] = loss = float(validate(current))
                if loss < best[0]:
                    best = (loss, done, current)
            history.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(meta_loss=f"{record.get('meta_loss', math.nan):.4g}")
                bar.update(1)
            if on_checkpoint is not None and (
                done == num_iterations
                or (checkpoint_every and done % checkpoint_every == 0)
            ):
                on_checkpoint(done, state)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    theta = estimator.theta(state)
    if validate is None:
        return MetaTrainResult(state, theta, history, theta, num_iterations, math.nan)
    return MetaTrainResult(state, theta, history, best[2], best[1], best[0])
