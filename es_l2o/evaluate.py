"""Evaluate an optimizer against tuned hand-designed baselines on held-out tasks.

Held-out tasks come from a key stream that meta-training never uses (`heldout_keys`).
Every run of one optimizer is vmapped over tasks; a baseline's learning-rate sweep
(`es_l2o.baselines.sweep`) is vmapped over learning rates too, so comparing with
Adam compiles twice, and a suite entry compiles once for the learned optimizer and
once for all baselines.

Example:
    >>> import optax
    >>> from es_l2o.tasks import ToyQuadraticFamily
    >>> result = compare_with_adam(ToyQuadraticFamily(dim=2), optax.sgd(0.5),
    ...                            num_steps=10, num_tasks=2, learning_rates=[1e-1])
    >>> sorted(result["rows"]), result["best_lr"]["train"]
    (['adam_best', 'adam_lr_0.001', 'learned'], 0.1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_l2o.baselines import get_baseline, sweep
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
    optimizer = optax.with_extra_args_support(optimizer)
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

    def on_tasks(adam):
        return jax.vmap(lambda k: train_task(family, adam, num_steps, k))(keys)

    run = jax.jit(lambda rates: sweep("adam", rates, on_tasks))
    return jax.tree.map(np.asarray, run(jnp.asarray(learning_rates, jnp.float32)))


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
    pick = lambda metric: _best_index(np.asarray([r[metric] for r in per_lr]))
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


# --------------------------------------------------------------------------------------
# Suites: the learned optimizer against every baseline, per task, in two compilations
# --------------------------------------------------------------------------------------

#: the baselines of a suite evaluation, in report order
SUITE_BASELINES = ("sgd", "momentum", "rmsprop", "adagrad", "adam")


def _run_scan(task, opt, carry, keys):
    """`len(keys)` steps of `opt` on `task` from carry (params, state); curve too."""

    def body(carry, step_key):
        params, state = carry
        loss, grads = jax.value_and_grad(task.loss)(params, step_key)
        updates, state = opt.update(grads, state, params, value=loss)
        return (optax.apply_updates(params, updates), state), loss

    return jax.lax.scan(body, carry, keys)


def _final(task, params, key):
    out = dict(task.metrics(params, key))
    out["param_norm"] = optax.tree.norm(params)
    return out


def _seed_keys(seed: int, num_seeds: int, num_steps: int):
    """(step keys (seeds, steps), metric keys (seeds,)): shared by all optimizers."""
    base = jax.random.fold_in(jax.random.key(seed), HELDOUT_STREAM)
    keys = jax.random.split(base, num_seeds)
    steps = jax.vmap(lambda k: jax.random.split(k, num_steps + 1))(keys)
    return steps[:, 1:], steps[:, 0]


def _run_learned(family, tx, cfgs, step_keys, metric_keys):
    tx = optax.with_extra_args_support(tx)

    def one(cfg, keys, metric_key):
        task = family.task(cfg)
        params = task.init(metric_key)
        (params, _), curve = _run_scan(task, tx, (params, tx.init(params)), keys)
        return _final(task, params, metric_key), curve

    return jax.tree.map(
        np.asarray, jax.jit(jax.vmap(one))(cfgs, step_keys, metric_keys)
    )


def _run_baselines(family, names, learning_rates, cfgs, step_keys, metric_keys,
                   horizon):  # fmt: skip
    """Every baseline in `names` at every learning rate on every seed, in one
    compile: {name: (metrics (lrs, seeds), curves (lrs, seeds, steps))}. Runs stop
    at `horizon` steps, except Adam's, whose curve goes on to the end of
    `step_keys` (for the speedup); metrics are always those at `horizon`."""

    def seeds(tx, extend: bool):
        tx = optax.with_extra_args_support(tx)

        def one(cfg, keys, metric_key):
            task = family.task(cfg)
            params = task.init(metric_key)
            carry = (params, tx.init(params))
            carry, curve = _run_scan(task, tx, carry, keys[:horizon])
            metrics = _final(task, carry[0], metric_key)
            if extend and keys.shape[0] > horizon:
                curve = jnp.concatenate(
                    [curve, _run_scan(task, tx, carry, keys[horizon:])[1]]
                )
            return metrics, curve

        return jax.vmap(one)(cfgs, step_keys, metric_keys)

    def run(rates):
        return {
            name: sweep(name, rates, lambda tx, e=name == "adam": seeds(tx, e))
            for name in names
        }

    rates = jnp.asarray(learning_rates, jnp.float32)
    return jax.tree.map(np.asarray, jax.jit(run)(rates))


def _best_index(values: np.ndarray) -> int:
    """Index of the lowest finite value (non-finite count as +inf)."""
    values = np.where(np.isfinite(values), values, np.inf)
    return int(np.argmin(values))


#: a win must beat the reference by this relative margin (float noise is no win)
WIN_MARGIN = 1e-4


def _wins(learned: float, reference: float) -> bool:
    """The learned value is finite and below the reference by `WIN_MARGIN`."""
    if learned is None or not np.isfinite(learned):
        return False
    if not np.isfinite(reference):
        return True
    return bool(learned < reference - WIN_MARGIN * abs(reference))


def weight_inflation(row: dict[str, Any], norm_ratio: float = 1.5) -> bool:
    """Flags a task that the learned optimizer wins on training loss vs tuned Adam,
    loses on validation loss, with parameters `norm_ratio`x larger than Adam's.

    Example:
        >>> weight_inflation({"learned": {"train_loss": 0.1, "val_loss": 2.0,
        ...     "param_norm": 30.0}, "adam": {"train_loss": 0.3, "val_loss": 1.0,
        ...     "param_norm_train": 10.0}})
        True
    """
    learned, adam = row["learned"], row["adam"]
    if learned.get("val_loss") is None or adam.get("val_loss") is None:
        return False
    return bool(
        _wins(learned["train_loss"], adam["train_loss"])
        and not _wins(learned["val_loss"], adam["val_loss"])
        and learned["param_norm"] > norm_ratio * adam["param_norm_train"]
    )


def _mean(x) -> float:
    return float(np.mean(x))


def _baseline_row(metrics, learning_rates, has_val: bool) -> tuple[dict, int]:
    """A baseline's row from its sweep's metrics (lrs, seeds), and the index of its
    train-best learning rate."""
    per_lr = {
        k: metrics[k].mean(1).tolist()
        for k in ("train_loss", "val_loss", "param_norm")
        if k in metrics
    }
    t = _best_index(np.asarray(per_lr["train_loss"]))
    v = _best_index(np.asarray(per_lr["val_loss"])) if has_val else t
    row = {
        "learning_rates": list(learning_rates),
        "per_lr": per_lr,
        "best_lr_train": learning_rates[t],
        "best_lr_val": learning_rates[v],
        "train_loss": per_lr["train_loss"][t],
        "val_loss": per_lr["val_loss"][v] if has_val else None,
        "param_norm_train": per_lr["param_norm"][t],
        "param_norm_val": per_lr["param_norm"][v],
    }
    return row, t


def _speedup_of(curves: dict, horizon: int, smooth_window: int | None) -> dict:
    """The speedup of the learned curve over Adam's (both seed-means)."""
    window = smooth_window or max(1, horizon // 10)
    target = float(smooth(np.asarray(curves["learned"]), window)[-1])
    adam_curve = smooth(np.asarray(curves["adam"]), window)
    value, reached = (
        speedup(adam_curve, target, horizon) if np.isfinite(target) else (0.0, False)
    )
    return {"value": value, "reached": reached, "target": target}


def _add_wins(row: dict, baselines: Sequence[str], has_val: bool) -> None:
    """win_{train,val}_loss_vs_{adam,best}, param_norm_ratio, weight_inflation."""
    learned = row["learned"]
    for metric in ("train_loss", "val_loss"):
        if not has_val and metric == "val_loss":
            row[f"win_{metric}_vs_adam"] = row[f"win_{metric}_vs_best"] = None
            continue
        best = min(
            (row[b][metric] for b in baselines),
            key=lambda x: x if np.isfinite(x) else np.inf,
        )
        row[f"win_{metric}_vs_adam"] = _wins(learned[metric], row["adam"][metric])
        row[f"win_{metric}_vs_best"] = _wins(learned[metric], best)
    row["param_norm_ratio"] = learned["param_norm"] / max(
        row["adam"]["param_norm_train"], 1e-12
    )
    row["weight_inflation"] = weight_inflation(row)


def evaluate_entry(
    optimizer,
    entry,
    *,
    num_seeds: int = 3,
    learning_rates: Sequence[float] = ADAM_LEARNING_RATES,
    baselines: Sequence[str] = SUITE_BASELINES,
    speedup_cap: float = 2.0,
    seed: int = 0,
    smooth_window: int | None = None,
) -> dict[str, Any]:
    """One suite entry: the learned optimizer and every baseline's lr sweep.

    `entry` has `name`, `family`, `split`, `horizon` and `eval_family()` (its
    family restricted to held-out tasks, with `enumerate(n)`), as
    `populations.suites.SuiteEntry`. Returns a row (see `evaluate_suite`) plus
    "curves": seed-mean training-loss curves of the learned optimizer and of each
    baseline at its train-best rate (Adam's extended to `speedup_cap` x horizon).
    """
    if "adam" not in baselines:
        raise ValueError(f"baselines must include 'adam' (speedup), got {baselines}")
    for name in baselines:
        get_baseline(name)  # an unknown name fails before anything compiles
    if speedup_cap < 1:
        raise ValueError(f"speedup_cap must be >= 1, got {speedup_cap}")
    horizon = int(entry.horizon)
    total = max(horizon, int(round(speedup_cap * horizon)))
    family = entry.eval_family()
    cfgs = family.enumerate(num_seeds)
    step_keys, metric_keys = _seed_keys(seed, num_seeds, total)
    learning_rates = [float(x) for x in learning_rates]
    learned_m, learned_curve = _run_learned(
        family, optimizer(horizon), cfgs, step_keys[:, :horizon], metric_keys
    )
    swept = _run_baselines(
        family, baselines, learning_rates, cfgs, step_keys, metric_keys, horizon
    )
    has_val = "val_loss" in learned_m
    row: dict[str, Any] = {
        "name": entry.name,
        "family": entry.family,
        "split": entry.split,
        "horizon": horizon,
        "learned": {
            "train_loss": _mean(learned_m["train_loss"]),
            "val_loss": _mean(learned_m["val_loss"]) if has_val else None,
            "param_norm": _mean(learned_m["param_norm"]),
        },
    }
    curves = {"learned": learned_curve.mean(0).tolist()}
    for name in baselines:
        metrics, curve = swept[name]
        row[name], t = _baseline_row(metrics, learning_rates, has_val)
        curves[name] = curve[t].mean(0).tolist()
    row["speedup"] = _speedup_of(curves, horizon, smooth_window)
    _add_wins(row, baselines, has_val)
    row["curves"] = curves
    return row


def summarize_suite(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per split ("iid", "ood", "all"): tasks, won fractions, median speedup."""
    out = {}
    for split in ("iid", "ood", "all"):
        chosen = [r for r in rows if split == "all" or r["split"] == split]
        if not chosen:
            continue
        summary: dict[str, Any] = {"num_tasks": len(chosen)}
        for metric in ("train_loss", "val_loss"):
            for ref in ("adam", "best"):
                flags = [r[f"win_{metric}_vs_{ref}"] for r in chosen]
                flags = [f for f in flags if f is not None]
                summary[f"won_{metric}_vs_{ref}"] = (
                    sum(flags) / len(flags) if flags else None
                )
        speedups = [r["speedup"]["value"] for r in chosen]
        summary["median_speedup"] = float(np.median(speedups))
        summary["never_reached"] = sum(not r["speedup"]["reached"] for r in chosen)
        summary["weight_inflation"] = sum(r["weight_inflation"] for r in chosen)
        out[split] = summary
    return out


def _row_line(row: dict[str, Any]) -> str:
    """One line of progress about a suite row."""
    return (
        f"{row['name']}: learned {row['learned']['train_loss']:.4g} / "
        f"adam {row['adam']['train_loss']:.4g} train loss, speedup "
        f"{row['speedup']['value']:.2f}"
        f"{'' if row['speedup']['reached'] else ' (never reached)'} "
        f"[{row['seconds']:.1f}s]"
    )


def evaluate_suite(
    optimizer,
    suite_entries,
    *,
    num_seeds: int = 3,
    learning_rates: Sequence[float] = ADAM_LEARNING_RATES,
    baselines: Sequence[str] = SUITE_BASELINES,
    speedup_cap: float = 2.0,
    seed: int = 0,
    log=None,
) -> dict[str, Any]:
    """The learned optimizer vs every baseline (tuned per metric) on a suite.

    `optimizer` maps a horizon to an optax transform (e.g.
    `lambda n: export.load(path, n)`). Per entry: the learned optimizer on
    `num_seeds` meta_test tasks (one compile) and every baseline x learning rate on
    the same tasks and data order (one compile). Each baseline's rate is chosen per
    metric on the seed-mean; the speedup is the steps tuned Adam (train-best rate,
    run to `speedup_cap` x horizon) needs to reach the learned optimizer's final
    smoothed training loss, over the horizon.

    Returns:
        {"rows": [row per entry], "summary": summarize_suite(rows), "settings": ...};
        a row has "learned" {train_loss, val_loss, param_norm}, one dict per
        baseline (learning_rates, per_lr lists, best_lr_train / _val, train_loss,
        val_loss, param_norm_train / _val), "speedup" {value, reached, target},
        win_{train,val}_loss_vs_{adam,best}, param_norm_ratio, weight_inflation,
        "curves".

    Example (suites of real tasks: `populations.suites`):
        >>> from typing import NamedTuple
        >>> from es_l2o.tasks import ToyQuadraticFamily
        >>> class Entry(NamedTuple):  # what a suite entry provides
        ...     name: str = "toy"
        ...     family: str = "toy_quadratic"
        ...     split: str = "iid"
        ...     horizon: int = 5
        ...     def eval_family(self):
        ...         return ToyQuadraticFamily(dim=2)
        >>> res = evaluate_suite(lambda n: optax.sgd(0.5), [Entry()], num_seeds=2,
        ...                      learning_rates=[0.1], baselines=("adam",))
        >>> res["summary"]["all"]["num_tasks"], res["rows"][0]["adam"]["best_lr_train"]
        (1, 0.1)
    """
    import time

    rows = []
    for entry in suite_entries:
        start = time.perf_counter()
        row = evaluate_entry(
            optimizer,
            entry,
            num_seeds=num_seeds,
            learning_rates=learning_rates,
            baselines=baselines,
            speedup_cap=speedup_cap,
            seed=seed,
        )
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if log is not None:
            log(_row_line(row))
    return {
        "rows": rows,
        "summary": summarize_suite(rows),
        "settings": {
            "num_seeds": int(num_seeds),
            "learning_rates": [float(x) for x in learning_rates],
            "baselines": list(baselines),
            "speedup_cap": float(speedup_cap),
            "seed": int(seed),
        },
    }


def _fmt(x, spec=".4g") -> str:
    return "-" if x is None else format(x, spec)


def suite_markdown(result: dict[str, Any]) -> str:
    """Markdown report of `evaluate_suite`: summary per split, then per task."""
    s = result["settings"]
    lines = [
        f"seeds per task: {s['num_seeds']}; baselines {', '.join(s['baselines'])}, "
        f"each tuned per metric over {len(s['learning_rates'])} learning rates; "
        f"Adam run to {s['speedup_cap']:g}x horizon for the speedup.",
        "",
        "| split | tasks | won train vs Adam | won val vs Adam | won train vs best "
        "| won val vs best | median speedup | never reached | weight inflation |",
        "|---" * 9 + "|",
    ]
    for split, m in result["summary"].items():
        lines.append(
            f"| {split} | {m['num_tasks']} | "
            + " | ".join(
                _fmt(m[f"won_{k}"], ".2f")
                for k in (
                    "train_loss_vs_adam",
                    "val_loss_vs_adam",
                    "train_loss_vs_best",
                    "val_loss_vs_best",
                )
            )
            + f" | {m['median_speedup']:.2f} | {m['never_reached']} | "
            f"{m['weight_inflation']} |"
        )
    lines += [
        "",
        "| task | split | horizon | learned train | Adam train | best baseline train "
        "| learned val | Adam val | speedup | norm learned / Adam | flag |",
        "|---" * 11 + "|",
    ]
    for r in result["rows"]:
        names = s["baselines"]
        best = min(names, key=lambda b: np.nan_to_num(r[b]["train_loss"], nan=np.inf))
        sp = r["speedup"]
        flag = "weight inflation" if r["weight_inflation"] else ""
        lines.append(
            f"| {r['name']} | {r['split']} | {r['horizon']} | "
            f"{_fmt(r['learned']['train_loss'])} | {_fmt(r['adam']['train_loss'])} | "
            f"{_fmt(r[best]['train_loss'])} ({best}) | "
            f"{_fmt(r['learned']['val_loss'])} | {_fmt(r['adam']['val_loss'])} | "
            f"{sp['value']:.2f}{'' if sp['reached'] else ' (never reached)'} | "
            f"{r['learned']['param_norm']:.3g} / {r['adam']['param_norm_train']:.3g} "
            f"| {flag} |"
        )
    return "\n".join(lines)


def write_suite_report(result: dict[str, Any], out_dir) -> dict[str, str]:
    """Writes suite.md, suite.csv and suite.json into `out_dir`; their paths."""
    import csv
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: str(out / f"suite.{k}") for k in ("md", "csv", "json")}
    Path(paths["md"]).write_text(suite_markdown(result) + "\n")
    Path(paths["json"]).write_text(json.dumps(result, indent=1, default=float))
    fields = ["name", "split", "horizon", "optimizer", "metric", "lr", "value"]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields + ["speedup", "reached", "weight_inflation"])
        for r in result["rows"]:
            tail = [
                r["speedup"]["value"],
                r["speedup"]["reached"],
                r["weight_inflation"],
            ]
            for k, v in r["learned"].items():
                writer.writerow(
                    [r["name"], r["split"], r["horizon"], "learned", k, "", v, *tail]
                )
            for b in result["settings"]["baselines"]:
                for k, lr_key in (
                    ("train_loss", "best_lr_train"),
                    ("val_loss", "best_lr_val"),
                ):
                    writer.writerow(
                        [
                            r["name"],
                            r["split"],
                            r["horizon"],
                            b,
                            k,
                            r[b][lr_key],
                            r[b][k],
                            *tail,
                        ]
                    )
                writer.writerow(
                    [
                        r["name"],
                        r["split"],
                        r["horizon"],
                        b,
                        "param_norm",
                        r[b]["best_lr_train"],
                        r[b]["param_norm_train"],
                        *tail,
                    ]
                )
    return paths
