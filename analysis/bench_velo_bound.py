"""How close to the one-theta floor a VeLO-size PES iteration can get on this machine.

A PES iteration with P particles keeps each antithetic pair's accumulated score
dense (M = P/2 rows of D floats): every iteration weights those rows by the pairs'
new losses, so it reads all M x D of them at least once, and then applies Adam to
D meta-parameters (reads theta, both moments and the gradient, writes three).
Neither depends on how the unroll is done, so the iteration costs at least

    floor + read(M x D scores) + Adam(D)

where the floor is the same P x K unroll with ONE shared theta and no ES
(`bench_velo_es.floor_fn`). This times, interleaved in one process:

- `floor`: that unroll (10-d quadratic, `configs/lopt/hierarchical_velo.yaml`);
- `score_read`: `w @ S` for a (M, D) float32 S, the gradient's one pass;
- `score_read_bf16`: the same with S in bfloat16 (half the bytes);
- `score_update`: `S + u v^T` written into S's own buffer (donated), the pass
  that adds each truncation's perturbation to the stored scores (not in the
  bound: a design that folds perturbations in less often could skip it; in
  `bound_update`, the least an iteration that updates them every time costs);
- `adam`: `optax.adam` on D parameters, state donated as meta-training does;
- `low`: the low-rank PES iteration itself (`es.rank`, as `bench_velo_es`);

and reports both bounds as multiples of the floor beside the measured iteration's.

Usage:
    python analysis/bench_velo_bound.py [--population 16] [--rounds 15]
        [--out analysis/results/velo_es/bound]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from analysis.bench_step import round_robin, write_csv
from analysis.bench_velo_es import (
    ROOT,
    Threaded,
    compiled,
    estimator_fn,
    families,
    floor_fn,
    velo_lopt,
)
from es_l2o.unroll import LOptTraining


class ThreadedAdam:
    """`optax.adam` applied to D parameters, params and state donated and carried
    from each call to the next (as the estimators' `step_in_place` does)."""

    def __init__(self, num_params: int):
        adam = optax.adam(1e-3)
        params = jnp.zeros((num_params,), jnp.float32)
        self.grad = jnp.full((num_params,), 1e-3, jnp.float32)
        self.carry = (params, adam.init(params))

        def step(carry, grad):
            params, state = carry
            updates, state = adam.update(grad, state, params)
            return optax.apply_updates(params, updates), state

        self.step = jax.jit(step, donate_argnums=0)

    def __call__(self):
        self.carry = self.step(self.carry, self.grad)
        return self.carry[0]


def score_read(num_pairs: int, num_params: int, dtype):
    """(jitted `w @ S`, args) for a (num_pairs, num_params) score S of `dtype`,
    accumulated in float32."""
    scores = jax.random.normal(jax.random.key(2), (num_pairs, num_params), dtype)
    weights = jnp.linspace(-1.0, 1.0, num_pairs).astype(dtype)

    def read(w, s):
        return jnp.dot(w, s, preferred_element_type=jnp.float32)

    return jax.jit(read), (weights, scores)


class ThreadedScoreUpdate:
    """`S + u v^T` for a (num_pairs, num_params) float32 S, written in place."""

    def __init__(self, num_pairs: int, num_params: int):
        self.scores = jnp.zeros((num_pairs, num_params), jnp.float32)
        self.u = jnp.linspace(-1.0, 1.0, num_pairs)
        self.v = jnp.full((num_params,), 1e-3, jnp.float32)
        self.step = jax.jit(lambda s, u, v: s + u[:, None] * v, donate_argnums=0)

    def __call__(self):
        self.scores = self.step(self.scores, self.u, self.v)
        return self.scores


def bench(population: int, rounds: int, budget_s: float, lopt_name: str) -> dict:
    lopt = velo_lopt(lopt_name)
    theta = lopt.init(jax.random.key(1))
    num_params = sum(x.size for x in jax.tree.leaves(theta))
    system = LOptTraining(families()["quadratic"], lopt, (200, 2000), stagger="offset")
    fns = {}
    fn, args = floor_fn(system, theta, population)
    fns["floor"] = (compiled(fn, args)[0], args)
    for name, dtype in (("score_read", jnp.float32), ("score_read_bf16", jnp.bfloat16)):
        fn, args = score_read(population // 2, num_params, dtype)
        fns[name] = (compiled(fn, args)[0], args)
    fns["score_update"] = (ThreadedScoreUpdate(population // 2, num_params), ())
    fns["adam"] = (ThreadedAdam(num_params), ())
    fn, (key, state) = estimator_fn(system, theta, population, 1)
    fns["low"] = (Threaded(compiled(fn, (key, state))[0], state), (key,))
    times = round_robin(fns, rounds, budget_s)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    bound = ms["floor"] + ms["score_read"] + ms["adam"]
    bound_bf16 = ms["floor"] + ms["score_read_bf16"] + ms["adam"]
    bound_update = bound + ms["score_update"]
    return {
        "population": population,
        "num_params": num_params,
        "rounds": min(len(t) for t in times.values()),
        **{f"{name}_ms": round(v, 2) for name, v in ms.items()},
        "score_mib": round(population // 2 * num_params * 4 / 2**20, 1),
        "bound_ms": round(bound, 2),
        "bound_x_floor": round(bound / ms["floor"], 2),
        "bound_bf16_x_floor": round(bound_bf16 / ms["floor"], 2),
        "bound_update_ms": round(bound_update, 2),
        "bound_update_x_floor": round(bound_update / ms["floor"], 2),
        "low_x_floor": round(ms["low"] / ms["floor"], 2),
    }


def table(row: dict, meta: dict) -> str:
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in row.items()]
    notes = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return "\n".join(lines) + "\n\n" + notes + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--lopt", default="hierarchical_velo", help="configs/lopt/")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--out", default=str(ROOT / "analysis/results/velo_es/bound"))
    args = parser.parse_args(argv)
    if args.population < 2 or args.population % 2:
        parser.error(f"--population {args.population}: an even number >= 2")
    row = bench(args.population, args.rounds, args.budget_s, args.lopt)
    device = jax.devices()[0]
    meta = {
        "lopt": args.lopt,
        "load_average": os.getloadavg(),
        "machine": f"{os.cpu_count()} CPUs, jax {jax.__version__} on "
        f"{device.platform} ({device.device_kind})",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "bench_velo_bound.csv", [row])
    (out / "bench_velo_bound.json").write_text(
        json.dumps({"meta": meta, "row": row}, indent=2)
    )
    (out / "bench_velo_bound.md").write_text(table(row, meta))
    print(table(row, meta))


if __name__ == "__main__":
    main()
