"""Time per meta-iteration of the truncated estimators, and their memory.

Timing: P particles x K inner steps per meta-iteration (default 8 antithetic pairs,
K = 20, the per-parameter MLP optimizer with two hidden layers of 32), on

- quadratic: 10-d quadratics ||W x - y||^2;
- digits: an MLP 64-48-64-10 on the bundled 8x8 digits, batch 32 (6,906 parameters:
  the closest this family gets to the 6.9k-parameter 32-64-64-10 reference task).

Each estimator's meta-iteration is compared with floors that do the same P x K inner
steps, vmapped, without ES: `optax.adam` (the floor the issue names), and the learned
optimizer itself with one shared theta and with P distinct thetas (as in every ES
population: per-particle weights turn the optimizer's matmuls into batched ones);
`x_lopt_floor` is the ratio to the latter, i.e. what the ES machinery adds. Every
function is compiled first, then all are timed interleaved (one call each per round,
so load from other processes hits them alike); medians and 10th percentiles over the
rounds.

Memory (compile-only, nothing is allocated): the estimator state and XLA's temporary
buffers of one PES meta-iteration for a population of thousands with up to millions
of meta-parameters, with per-pair accumulators stored (P/2 x D floats, twice) or
regenerated from keys in chunks of pairs.

Usage:
    python analysis/bench_meta.py [OUT_DIR] [--rounds 30] [--skip-memory]

Writes OUT_DIR/bench_meta.csv, OUT_DIR/bench_memory.csv and OUT_DIR/bench_meta.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from analysis.bench_step import round_robin
from es_l2o.es import PES, NoiseReuseES, TruncatedES
from es_l2o.lopt import MLPLOpt
from es_l2o.unroll import LOptTraining, StepOutput, UnrolledSystem
from populations.digits import DigitsMLPFamily
from populations.quadratic import QuadraticFamily

#: reference timings (ms per outer iteration) of learned_optimization's PES
REFERENCE_MS = {"quadratic": (4.4, 5.5), "digits": (142.0, 324.0)}


def families():
    return {
        "quadratic": QuadraticFamily(dim=10),
        "digits": DigitsMLPFamily(hidden_sizes=(48, 64), batch_size=32),
    }


def adam_floor(family, population, truncation):
    """P x K adam steps, vmapped: returns (jitted fn, args)."""
    opt = optax.adam(1e-3)

    def init(key):
        task = family.task(family.sample(key))
        params = task.init(key)
        return params, opt.init(params)

    keys = jax.random.split(jax.random.key(0), population)
    cfgs = jax.vmap(family.sample)(keys)
    states = jax.jit(jax.vmap(init))(keys)

    @jax.jit
    def run(states, key):
        def one(cfg, state, key):
            task = family.task(cfg)

            def body(state, k):
                params, opt_state = state
                loss, grads = jax.value_and_grad(task.loss)(params, k)
                updates, opt_state = opt.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            return jax.lax.scan(body, state, jax.random.split(key, truncation))

        return jax.vmap(one)(cfgs, states, jax.random.split(key, population))

    return run, (states, jax.random.key(1))


def lopt_floor(system, theta, population, truncation, distinct: bool):
    """P x K learned-optimizer steps, vmapped (no ES): one shared theta, or P
    distinct thetas (as every ES population has)."""
    keys = jax.random.split(jax.random.key(0), population)
    states = jax.jit(jax.vmap(lambda k: system.init(k, theta)))(keys)
    if distinct:
        flat, unravel = ravel_pytree(theta)
        noise = 0.01 * jax.random.normal(jax.random.key(2), (population, flat.size))
        thetas = jax.vmap(unravel)(flat + noise)
    else:
        thetas = jax.tree.map(
            lambda x: jnp.broadcast_to(x, (population, *x.shape)), theta
        )

    @jax.jit
    def run(states, thetas, key):
        def body(states, t):
            step_keys = jax.random.split(jax.random.fold_in(key, t), population)
            states, out = system.batch_step(step_keys, thetas, states)
            return states, out.loss

        return jax.lax.scan(body, states, jnp.arange(truncation))

    return run, (states, thetas, jax.random.key(1))


def time_interleaved(fns: dict, rounds: int) -> dict:
    """Median and 10th percentile (ms) of each function, called round-robin."""
    return {
        name: (1e3 * float(np.median(t)), 1e3 * float(np.percentile(t, 10)))
        for name, t in round_robin(fns, rounds).items()
    }


def bench_timing(rounds, population, truncation, lopt_hidden):
    lopt = MLPLOpt(hidden_sizes=lopt_hidden)
    theta = lopt.init(jax.random.key(0))
    rows = []
    for task_name, family in families().items():
        system = LOptTraining(family, lopt, (200, 2000), stagger=True)
        fns = {
            "floor: adam": adam_floor(family, population, truncation),
            "floor: learned optimizer, one theta": lopt_floor(
                system, theta, population, truncation, distinct=False
            ),
            "floor: learned optimizer, P thetas": lopt_floor(
                system, theta, population, truncation, distinct=True
            ),
        }
        estimators = {
            "PES": (PES, {}),
            "PES (noise=keys)": (PES, {"noise": "keys"}),
            "TruncatedES": (TruncatedES, {}),
            "NoiseReuseES": (NoiseReuseES, {}),
        }
        for name, (cls, kwargs) in estimators.items():
            es = cls(
                system,
                population_size=population,
                std=0.01,
                optimizer=optax.adam(1e-4),
                truncation_length=truncation,
                max_grad_norm=10.0,
                **kwargs,
            )
            state = es.init(jax.random.key(1), theta)
            # advance a few iterations so that the timed state is a typical one
            for i in range(3):
                state, _ = es.step(jax.random.key(100 + i), state)
            fns[name] = (es.step, (jax.random.key(2), state))
        task_rounds = rounds if task_name == "digits" else 10 * rounds
        timed = time_interleaved(fns, task_rounds)
        adam_ms = timed["floor: adam"][0]
        lopt_ms = timed["floor: learned optimizer, P thetas"][0]
        ref_low, ref_high = REFERENCE_MS[task_name]
        for name, (median, p10) in timed.items():
            rows.append(
                {
                    "task": task_name,
                    "what": name,
                    "population": population,
                    "truncation": truncation,
                    "median_ms": round(median, 3),
                    "p10_ms": round(p10, 3),
                    "x_adam_floor": round(median / adam_ms, 2),
                    "x_lopt_floor": round(median / lopt_ms, 2),
                    "speedup_vs_reference": (
                        f"{ref_low / median:.2f}-{ref_high / median:.2f}"
                    ),
                    "rounds": task_rounds,
                }
            )
            print(rows[-1], flush=True)
    return rows


class VectorTheta(UnrolledSystem):
    """A cheap system with a D-dimensional theta, for memory measurements only."""

    def __init__(self, horizon):
        self.max_horizon = horizon

    def init(self, key, theta):
        del key, theta
        return {"s": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}

    def step(self, key, theta, state):
        del key
        reset = state["step"] >= self.max_horizon
        s = jnp.where(reset, 0.0, state["s"])
        s = 0.9 * s + jnp.mean(theta**2)
        step = jnp.where(reset, 1, state["step"] + 1)
        return {"s": s, "step": step}, StepOutput(s, reset, jnp.isfinite(s))


def _tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def bench_memory(populations, dims, truncation, chunk):
    rows = []
    for population in populations:
        for dim in dims:
            for noise, pair_chunk in (("stored", None), ("keys", chunk)):
                theta = jax.ShapeDtypeStruct((dim,), jnp.float32)
                es = PES(
                    VectorTheta(2000),
                    population_size=population,
                    truncation_length=truncation,
                    noise=noise,
                    pair_chunk=pair_chunk,
                    theta=theta,
                )
                key = jax.random.key(0)
                state = jax.eval_shape(es.init, key, theta)
                compiled = jax.jit(es._step).lower(key, state).compile()
                stats = compiled.memory_analysis()
                state_bytes = _tree_bytes(state)
                rows.append(
                    {
                        "population": population,
                        "meta_parameters": dim,
                        "noise": noise,
                        "pair_chunk": pair_chunk or population // 2,
                        "state_MiB": round(state_bytes / 2**20, 1),
                        "temp_MiB": round(stats.temp_size_in_bytes / 2**20, 1),
                        # the step returns a new state next to the old one
                        "peak_MiB": round(
                            (
                                state_bytes
                                + stats.temp_size_in_bytes
                                + stats.output_size_in_bytes
                            )
                            / 2**20,
                            1,
                        ),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def _markdown(rows, columns) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="analysis/results")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--truncation", type=int, default=20)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Meta-iteration benchmark",
        "",
        f"`python analysis/bench_meta.py {args.out_dir}` on "
        f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()});"
        f" load average at start {os.getloadavg()[0]:.1f}.",
        "",
    ]
    if not args.skip_timing:
        rows = bench_timing(args.rounds, args.population, args.truncation, (32, 32))
        with open(out / "bench_meta.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        lines += [
            f"## Time per meta-iteration (P = {args.population}, K = {args.truncation},"
            " MLPLOpt 32-32)",
            "",
            *_markdown(
                rows,
                [
                    "task",
                    "what",
                    "median_ms",
                    "p10_ms",
                    "x_adam_floor",
                    "x_lopt_floor",
                    "speedup_vs_reference",
                ],
            ),
            "",
            "Reference (learned_optimization PES): 4.4-5.5 ms (quadratic),"
            " 142-324 ms (digits-size MLP).",
            "",
        ]
    if not args.skip_memory:
        rows = bench_memory([1024, 4096], [100_000, 1_000_000], args.truncation, 16)
        with open(out / "bench_memory.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        lines += [
            "## PES memory: stored accumulators vs regenerated from keys",
            "",
            *_markdown(rows, list(rows[0])),
            "",
        ]
    (out / "bench_meta.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'bench_meta.md'}")


if __name__ == "__main__":
    main()
