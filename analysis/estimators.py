"""Bias and variance of the meta-gradient estimators against the exact gradient.

On a learned optimizer training 10-d quadratics for episodes of T steps, the exact
meta-gradient of J(theta) = E_task[mean loss over the episode] is computed by autodiff
through full unrolls (averaged over many tasks). Each estimator then estimates it at
one fixed theta: FullES from one full unroll per particle; PES, TruncatedES and
NoiseReuseES from one truncation of K steps of a staggered population, taken after
every particle has finished at least one episode.

While theta is fixed, antithetic pairs do not interact, so an estimate of a
population of P particles is exactly the mean of P/2 independent pairs' estimates:
the script runs many independent pairs per estimator and K (one compilation each)
and groups them into populations of every size. For each P and K it records

- cosine: mean cosine between a single estimate and the exact gradient;
- cosine_of_mean: cosine between the mean of all estimates (all pairs) and the exact
  gradient: near 1 for an unbiased estimator, given enough pairs;
- relative_bias: |mean of all estimates - exact| / |exact| (includes the remaining
  noise of that mean);
- relative_variance: mean |estimate - mean|^2 / |exact|^2 of a single estimate.

Usage:
    python analysis/estimators.py [OUT_DIR] [--chains 32] [--quick]
        [--estimators FullES,PES,TruncatedES,NoiseReuseES] [--plot-only]

`--chains` is the number of estimates at the largest population. Writes
OUT_DIR/estimators.csv and OUT_DIR/estimators.png (default analysis/results/).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from es_l2o.es import PES, FullES, NoiseReuseES, TruncatedES
from es_l2o.lopt import MLPLOpt
from es_l2o.unroll import LOptTraining
from populations.quadratic import QuadraticFamily

HORIZON = 64
STD = 0.01
TRUNCATED = {"PES": PES, "TruncatedES": TruncatedES, "NoiseReuseES": NoiseReuseES}


def setup():
    # a learned optimizer that takes real steps, so that early updates shape late
    # losses (the effect truncated ES misses)
    lopt = MLPLOpt(hidden_sizes=(4,), output_init_scale=1.0)
    theta = lopt.init(jax.random.key(0))
    family = QuadraticFamily(dim=10)
    return lopt, theta, family


def exact_gradient(family, lopt, theta, num_tasks: int, key):
    """d/dtheta of the mean episode loss over `num_tasks` tasks, and a split-half
    cosine that says how well `num_tasks` pins it down."""
    system = LOptTraining(family, lopt, HORIZON)

    def episode_loss(theta, key):
        key_init, key_steps = jax.random.split(key)
        state = system.init(key_init, theta)

        def body(state, k):
            state, out = system.step(k, theta, state)
            return state, out.loss

        _, losses = jax.lax.scan(body, state, jax.random.split(key_steps, HORIZON))
        return jnp.mean(losses)

    grad_one = jax.grad(episode_loss)
    keys = jax.random.split(key, num_tasks)
    grads = jax.jit(
        lambda keys: jax.lax.map(
            lambda k: ravel_pytree(grad_one(theta, k))[0], keys, batch_size=256
        )
    )(keys)
    grads = np.asarray(grads, np.float64)
    half = num_tasks // 2
    return grads.mean(0), _cosine(grads[:half].mean(0), grads[half:].mean(0))


def _cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def truncated_pair_estimates(cls, family, lopt, theta, truncation, num_pairs, key):
    """One estimate per independent antithetic pair (population 2), each taken after
    the pair has finished at least one episode."""
    system = LOptTraining(family, lopt, HORIZON, stagger=True)
    es = cls(
        system,
        population_size=2,
        std=STD,
        optimizer=optax.sgd(0.0),
        truncation_length=truncation,
    )
    warmup = math.ceil(HORIZON / truncation) + 1

    def chain(key):
        state = es.init(key, theta)

        def body(state, k):
            grad, aux = es.gradient(k, state)
            return aux["state"], ravel_pytree(grad)[0]

        keys = jax.random.split(jax.random.fold_in(key, 1), warmup + 1)
        _, grads = jax.lax.scan(body, state, keys)
        return grads[-1]

    keys = jax.random.split(key, num_pairs)
    return np.asarray(jax.jit(lambda k: jax.lax.map(chain, k, batch_size=4096))(keys))


def full_es_pair_estimates(family, lopt, theta, num_pairs, key):
    """FullES's estimate per independent pair, read off one SGD(1) step with identity
    fitness shaping (Open_ES: grad = sum_i f_i eps_i / (P std^2))."""
    system = LOptTraining(family, lopt, HORIZON)
    es = FullES(
        system,
        population_size=2,
        std=STD,
        optimizer=optax.sgd(1.0),
        meta_loss="train_mean",
        fitness_shaping="identity",
    )
    state = es.init(key, theta)
    flat0 = ravel_pytree(theta)[0]

    def one(k):
        new_state, _ = es.step(k, state)
        return flat0 - ravel_pytree(es.theta(new_state))[0]

    keys = jax.random.split(key, num_pairs)
    return np.asarray(jax.jit(lambda k: jax.lax.map(one, k, batch_size=4096))(keys))


def population_estimates(pair_estimates, population):
    """Estimates of a population of P particles: means over P/2 independent pairs.

    Pairs do not interact while theta is fixed, so a population's estimate is exactly
    the mean of its pairs' estimates.
    """
    pairs = population // 2
    count = len(pair_estimates) // pairs
    return pair_estimates[: count * pairs].reshape(count, pairs, -1).mean(1)


def summarize(estimates, exact):
    estimates = np.asarray(estimates, np.float64)
    mean = estimates.mean(0)
    norm2 = float(np.dot(exact, exact))
    return {
        "cosine": float(np.mean([_cosine(g, exact) for g in estimates])),
        "cosine_of_mean": _cosine(mean, exact),
        "relative_bias": float(np.linalg.norm(mean - exact) / math.sqrt(norm2)),
        "relative_variance": float(np.mean(np.sum((estimates - mean) ** 2, 1)) / norm2),
    }


def plot(rows, path: Path, populations, truncations):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["FullES", *TRUNCATED]
    colors = dict(
        zip(names, ["black", "tab:blue", "tab:red", "tab:green"], strict=True)
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    k_mid = truncations[len(truncations) // 2]
    p_max = max(populations)

    def select(name, **match):
        return [
            r
            for r in rows
            if r["estimator"] == name and all(r[k] == v for k, v in match.items())
        ]

    for name in names:
        sel = select(name) if name == "FullES" else select(name, truncation=k_mid)
        sel = sorted(sel, key=lambda r: r["population"])
        axes[0].plot(
            [r["population"] for r in sel],
            [r["cosine"] for r in sel],
            "o-",
            color=colors[name],
            label=name if name == "FullES" else f"{name} (K={k_mid})",
        )
        for ax, key in ((axes[1], "cosine"), (axes[2], "relative_bias")):
            if name == "FullES":
                value = select(name, population=p_max)[0][key]
                ax.axhline(
                    value, color=colors[name], ls="--", label=f"FullES (K=T={HORIZON})"
                )
                continue
            sel = sorted(select(name, population=p_max), key=lambda r: r["truncation"])
            ax.plot(
                [r["truncation"] for r in sel],
                [r[key] for r in sel],
                "o-",
                color=colors[name],
                label=name,
            )
    axes[0].set(xscale="log", xlabel="population P", ylabel="cosine(estimate, exact)")
    axes[0].set_title("single-estimate cosine vs population")
    axes[1].set(
        xscale="log", xlabel="truncation length K", ylabel="cosine(estimate, exact)"
    )
    axes[1].set_title(f"single-estimate cosine vs K (P={p_max})")
    axes[2].set(
        xscale="log",
        xlabel="truncation length K",
        ylabel="|mean - exact| / |exact|",
        ylim=(0, None),
    )
    axes[2].set_title("bias: error of the mean of all estimates")
    for ax in axes[1:]:
        ax.set_xticks(truncations, [str(k) for k in truncations])
        ax.minorticks_off()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Meta-gradient estimators on 10-d quadratics, episodes of T={HORIZON} steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="analysis/results")
    parser.add_argument("--chains", type=int, default=32)
    parser.add_argument("--exact-tasks", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="a tiny grid (smoke run)")
    parser.add_argument(
        "--estimators",
        default=",".join(["FullES", *TRUNCATED]),
        help="comma-separated subset to (re)run; rows of the others are kept from "
        "an existing CSV",
    )
    parser.add_argument("--plot-only", action="store_true", help="replot the CSV")
    args = parser.parse_args(argv)
    populations = [16, 64] if args.quick else [16, 64, 256, 1024]
    truncations = [8, 32] if args.quick else [4, 16, 64]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "estimators.csv"
    selected = args.estimators.split(",")
    unknown = set(selected) - {"FullES", *TRUNCATED}
    if unknown:
        parser.error(f"unknown estimators {sorted(unknown)}")
    kept = []
    if csv_path.exists() and (
        args.plot_only or set(selected) != {"FullES", *TRUNCATED}
    ):
        with open(csv_path) as f:
            kept = [
                {k: v if k == "estimator" else float(v) for k, v in row.items()}
                for row in csv.DictReader(f)
            ]
        for row in kept:
            for k in ("population", "truncation", "estimates"):
                row[k] = int(row[k])
        if args.plot_only:
            plot(kept, out / "estimators.png", populations, truncations)
            return
        kept = [row for row in kept if row["estimator"] not in selected]

    lopt, theta, family = setup()
    start = time.perf_counter()
    exact, split_cosine = exact_gradient(
        family, lopt, theta, args.exact_tasks, jax.random.key(1)
    )
    print(
        f"exact gradient: |g| = {np.linalg.norm(exact):.4g}, split-half cosine "
        f"{split_cosine:.4f} ({args.exact_tasks} tasks, "
        f"{time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    rows = []
    num_pairs = max(populations) // 2 * args.chains
    runs = [("FullES", HORIZON)] + [
        (name, truncation) for name in TRUNCATED for truncation in truncations
    ]
    for index, (name, truncation) in enumerate(runs):
        if name not in selected:
            continue
        sub = jax.random.fold_in(jax.random.key(2), index)  # same with any subset
        tic = time.perf_counter()
        if name == "FullES":
            pairs = full_es_pair_estimates(family, lopt, theta, num_pairs, sub)
        else:
            pairs = truncated_pair_estimates(
                TRUNCATED[name], family, lopt, theta, truncation, num_pairs, sub
            )
        for population in populations:
            estimates = population_estimates(pairs, population)
            rows.append(
                {
                    "estimator": name,
                    "population": population,
                    "truncation": truncation,
                    "estimates": len(estimates),
                }
                | summarize(estimates, exact)
            )
            print(rows[-1], flush=True)
        print(f"  {name} K={truncation}: {time.perf_counter() - tic:.1f} s", flush=True)
    order = ["FullES", *TRUNCATED]
    rows = sorted(
        kept + rows,
        key=lambda r: (order.index(r["estimator"]), r["truncation"], r["population"]),
    )
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "estimators.png", populations, truncations)
    print(
        f"wrote {out / 'estimators.csv'} and {out / 'estimators.png'} "
        f"in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
