"""Variance of the ES gradient estimate against the rank of its perturbations.

FullES (Open_ES, antithetic, identity fitness shaping, std 0.01) on
`es_l2o.toy_systems.MatrixFeedback` (theta: two m x n / n x m matrices and a
vector), against the exact gradient of its episode loss (autodiff). For every rank
(full, and r = 1 ... min(m, n)) it draws `repeats` independent estimates of P
particles each and reports their mean squared error relative to |g|^2 (the
variance, since the estimate is unbiased up to O(std^2)) and the error of their
mean (the bias left after averaging).

Usage:
    python analysis/variance_rank.py [--m 16] [--n 12] [--population 256]
        [--repeats 64] [--out analysis/results/velo_es]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from analysis.bench_step import write_csv
from es_l2o.es import FullES
from es_l2o.toy_systems import MatrixFeedback

ROOT = Path(__file__).resolve().parents[1]


def estimates(system, theta, rank, population: int, repeats: int) -> jax.Array:
    es = FullES(
        system,
        population_size=population,
        std=0.01,
        optimizer=optax.sgd(0.0),
        fitness_shaping="identity",
        meta_loss="train_mean",
        rank=rank,
    )
    state = es.init(jax.random.key(0), theta)

    def one(key):
        return ravel_pytree(es._gradient(key, state)[0])[0]

    keys = jax.random.split(jax.random.key(1 + (rank or 0)), repeats)
    return jax.jit(jax.vmap(one))(keys)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--population", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "analysis/results/velo_es"))
    args = parser.parse_args(argv)
    system = MatrixFeedback(m=args.m, n=args.n, horizon=7)
    theta = system.initial_theta(jax.random.key(0))
    exact = ravel_pytree(jax.grad(system.episode_loss)(theta))[0]
    norm2 = float(jnp.sum(exact**2))
    ranks = [None, *sorted({1, 2, 4, min(args.m, args.n)})]
    rows = []
    for rank in ranks:
        g = estimates(system, theta, rank, args.population, args.repeats)
        rows.append(
            {
                "rank": "full" if rank is None else rank,
                "relative_mse": round(
                    float(jnp.mean(jnp.sum((g - exact) ** 2, 1))) / norm2, 4
                ),
                "relative_error_of_mean": round(
                    float(jnp.linalg.norm(jnp.mean(g, 0) - exact)) / norm2**0.5, 4
                ),
            }
        )
        print(rows[-1], flush=True)
    full = rows[0]["relative_mse"]
    for row in rows:
        row["x_full_rank_mse"] = round(row["relative_mse"] / full, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "variance_rank.csv", rows)
    lines = [
        f"MatrixFeedback m={args.m} n={args.n}, D={exact.size}, FullES P="
        f"{args.population}, {args.repeats} estimates per rank",
        "",
        "| rank | MSE / abs(g)^2 | x full rank | error of the mean |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['rank']} | {r['relative_mse']} | {r['x_full_rank_mse']} | "
        f"{r['relative_error_of_mean']} |"
        for r in rows
    ]
    (out / "variance_rank.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
