"""Evaluate an optimizer against Adam on held-out tasks of a population.

Held-out tasks come from a key stream that meta-training never uses (`heldout_keys`).
Every run of one optimizer is vmapped over tasks; Adam's learning-rate sweep is
vmapped over learning rates too, so the whole comparison compiles twice.

Example:
    >>> import optax
    >>> from populations.quadratic import QuadraticFamily
    >>> result = compare_with_adam(QuadraticFamily(), optax.sgd(1e-2), num_steps=20,
    ...                            num_tasks=2)
    >>> sorted(result["rows"])[:1]
    ['adam_best']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_l2o.tasks import TaskFamily

#: Adam's learning-rate sweep: 7 points, log-spaced from 1e-4 to 1e-1
ADAM_LEARNING_RATES = tuple(float(x) for x in np.logspace(-4, -1, 7))
#: the constant folded into evaluation keys; meta-training keys never fold it in
HELDOUT_STREAM = 0x5EED_E7A1


def heldout_keys(seed: int, num_tasks: int) -> jax.Array:
    """Keys of `num_tasks` held-out tasks (task configuration, init and data order)."""
    base = jax.random.fold_in(jax.random.key(seed), HELDOUT_STREAM)
    return jax.random.split(base, num_tasks)


def train_task(
    family: TaskFamily, optimizer: optax.GradientTransformation, num_steps: int, key
) -> dict[str, jax.Array]:
    """Trains one task drawn from `key` for `num_steps` steps; final metrics + curve.

    Returns the task's `metrics` of the final parameters (train / validation / test
    losses and accuracies where the task has them), `param_norm`, and `loss_curve`
    (the minibatch training loss at every step).
    """
    key_cfg, key_init, key_steps, key_eval = jax.random.split(key, 4)
    task = family.task(family.sample(key_cfg))
    params = task.init(key_init)

    def body(carry, step_key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(task.loss)(params, step_key)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), curve = jax.lax.scan(
        body, (params, optimizer.init(params)), jax.random.split(key_steps, num_steps)
    )
    out = dict(task.metrics(params, key_eval))
    out["param_norm"] = optax.tree.norm(params)
    out["loss_curve"] = curve
    return out


def evaluate_optimizer(
    family: TaskFamily, optimizer, num_steps: int, keys: jax.Array
) -> dict[str, np.ndarray]:
    """`train_task` on every key, vmapped: each metric has shape (num_tasks, ...)."""
    run = jax.jit(jax.vmap(lambda k: train_task(family, optimizer, num_steps, k)))
    return jax.tree.map(np.asarray, run(keys))


def evaluate_adam_sweep(
    family: TaskFamily,
    num_steps: int,
    keys: jax.Array,
    learning_rates: Sequence[float] = ADAM_LEARNING_RATES,
) -> dict[str, np.ndarray]:
    """Adam at every learning rate on every task: metrics (num_lrs, num_tasks, ...)."""
    adam = optax.inject_hyperparams(optax.adam)

    def one(lr, key):
        return train_task(family, adam(learning_rate=lr), num_steps, key)

    run = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    return jax.tree.map(np.asarray, run(jnp.asarray(learning_rates, jnp.float32), keys))


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean over `window` steps (shorter at the start)."""
    curve = np.asarray(curve, np.float64)
    if window <= 1 or curve.size == 0:
        return curve
    sums = np.cumsum(np.insert(curve, 0, 0.0))
    counts = np.minimum(np.arange(1, curve.size + 1), window)
    return (
        sums[1:] - sums[np.maximum(np.arange(1, curve.size + 1) - window, 0)]
    ) / counts


def steps_to_reach(curve: np.ndarray, target: float) -> int | None:
    """Steps until `curve` first reaches `target` or below (curve[t] is the loss
    after t + 1 steps); None when it never does."""
    hits = np.flatnonzero(np.asarray(curve) <= target)
    return int(hits[0]) + 1 if hits.size else None


def speedup(
    baseline_curve: np.ndarray, target: float, horizon: int
) -> tuple[float, bool]:
    """VeLO's speedup: steps the baseline needs to reach `target`, over `horizon`.

    The baseline may have run longer than `horizon` (say 2x); when it never reaches
    the target the speedup is capped at `len(baseline_curve) / horizon` and the
    second value is False.

    Example:
        >>> speedup(np.array([3.0, 2.0, 1.0, 0.5]), target=1.0, horizon=2)
        (1.5, True)
        >>> speedup(np.array([3.0, 2.0]), target=1.0, horizon=1)
        (2.0, False)
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    steps = steps_to_reach(baseline_curve, target)
    if steps is None:
        return len(baseline_curve) / horizon, False
    return steps / horizon, True


def _summary(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        name: float(np.mean(values))
        for name, values in metrics.items()
        if name != "loss_curve"
    }


def compare_with_adam(
    family: TaskFamily,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    *,
    num_tasks: int = 8,
    seed: int = 0,
    learning_rates: Sequence[float] = ADAM_LEARNING_RATES,
    reference_learning_rate: float = 1e-3,
) -> dict[str, Any]:
    """The optimizer vs Adam at `reference_learning_rate` vs Adam with the best rate.

    Adam's best learning rate is chosen per metric: the rate with the lowest mean
    final training loss for the training column, the rate with the lowest mean
    validation loss for the validation columns (loss and accuracy).

    Returns:
        {"rows": {name: {metric: mean over tasks}}, "per_task": ..., "learning_rates":
        ..., "best_lr": {"train": lr, "validation": lr}, "num_steps", "num_tasks"}
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    learning_rates = [float(x) for x in learning_rates]
    if reference_learning_rate not in learning_rates:
        learning_rates = sorted([*learning_rates, float(reference_learning_rate)])
    keys = heldout_keys(seed, num_tasks)
    learned = evaluate_optimizer(family, optimizer, num_steps, keys)
    sweep = evaluate_adam_sweep(family, num_steps, keys, learning_rates)
    per_lr = [
        _summary({k: v[i] for k, v in sweep.items()})
        for i in range(len(learning_rates))
    ]

    def pick(metric):
        scores = [row.get(metric, np.inf) for row in per_lr]
        scores = [s if np.isfinite(s) else np.inf for s in scores]
        return int(np.argmin(scores))

    train_idx = pick("train_loss")
    val_idx = pick("val_loss") if "val_loss" in per_lr[0] else train_idx
    best = dict(per_lr[val_idx])
    best["train_loss"] = per_lr[train_idx]["train_loss"]
    best["param_norm_train_lr"] = per_lr[train_idx]["param_norm"]
    reference = per_lr[learning_rates.index(float(reference_learning_rate))]
    return {
        "rows": {
            "learned": _summary(learned),
            f"adam_lr_{reference_learning_rate:g}": reference,
            "adam_best": best,
        },
        "best_lr": {
            "train": learning_rates[train_idx],
            "validation": learning_rates[val_idx],
        },
        "learning_rates": learning_rates,
        "per_learning_rate": per_lr,
        "per_task": {
            "learned": {k: v.tolist() for k, v in learned.items() if k != "loss_curve"},
        },
        "num_steps": int(num_steps),
        "num_tasks": int(num_tasks),
    }


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of `compare_with_adam`'s result."""
    columns = [
        ("train_loss", "train loss"),
        ("val_loss", "val loss"),
        ("val_accuracy", "val acc"),
        ("test_loss", "test loss"),
        ("test_accuracy", "test acc"),
        ("param_norm", "param norm"),
    ]
    first = next(iter(result["rows"].values()))
    columns = [(k, label) for k, label in columns if k in first]
    lr = result["best_lr"]
    lines = [
        f"held-out tasks: {result['num_tasks']}, horizon: {result['num_steps']} steps; "
        f"Adam's best rate: {lr['train']:.2g} (train column), "
        f"{lr['validation']:.2g} (validation / test columns)",
        "",
        "| optimizer | " + " | ".join(label for _, label in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in result["rows"].items():
        cells = [f"{row[k]:.4f}" if k in row else "-" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
