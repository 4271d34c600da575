"""Rough cost of each suite entry under Adam: the figures an evaluator budget needs.

For every entry: parameter count; compile and run time of one Adam run of 100 steps
on one task; and the evaluator-shaped workload: one optimizer over `num_lrs`
learning rates x `num_seeds` meta_test tasks for the entry's horizon, vmapped in one
jitted function, followed by the whole-split metrics. `eval_estimate_cpu` =
`num_optimizers` x (compile + run) of that workload: what an evaluator that
compiles one function per optimizer and task would spend. Times are process CPU
seconds (the table) and wall seconds (the JSON); on a shared machine CPU seconds
are the steadier figure. Compilation dominates on CPU: `--fast-compile` compiles
with XLA's lowest optimisation level (~3x faster to compile, 2-7x slower to run).

Run (CPU, 2 cores):
    python -m populations.benchmark --suite default --seeds 3 --json /tmp/cost.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_l2o.baselines import sweep
from populations import suites
from populations.common import num_params


def _adam_runs(family, num_steps: int):
    """run(cfgs, lrs, key) -> (losses, final metrics), over learning rates x tasks
    (the learning rates through `es_l2o.baselines.sweep`, as evaluation does)."""

    def one(opt, cfg, key):
        task = family.task(cfg)
        params = task.init(key)

        def body(carry, step_key):
            params, state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, step_key)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        keys = jax.random.split(key, num_steps)
        (params, _), losses = jax.lax.scan(body, (params, opt.init(params)), keys)
        return losses, task.metrics(params, key)

    def run(cfgs, lrs, key):
        on_tasks = lambda opt: jax.vmap(lambda cfg: one(opt, cfg, key))(cfgs)
        return sweep("adam", lrs, on_tasks)

    return run


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _compile_and_run(fn, args, options):
    """(outputs, compile wall/cpu seconds, run wall/cpu seconds) of jit(fn)(*args)."""
    with _Clock() as compile_clock:
        compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
    jax.block_until_ready(compiled(*args))  # first call: allocation, transfers
    with _Clock() as run_clock:
        out = jax.block_until_ready(compiled(*args))
    return out, compile_clock, run_clock


def measure(
    entry,
    num_seeds: int = 3,
    num_lrs: int = 7,
    num_optimizers: int = 6,
    fast_compile: bool = False,
):
    """Costs of one suite entry (seconds; `_cpu` figures are process CPU time)."""
    options = {"xla_backend_optimization_level": 0} if fast_compile else None
    family = suites.build_eval(entry)
    cfgs = family.enumerate(num_seeds)
    task = family.task(jax.tree.map(lambda x: x[0], cfgs))
    row = {
        "name": entry.name,
        "split": entry.split,
        "params": num_params(jax.eval_shape(task.init, jax.random.key(0))),
        "horizon": entry.horizon,
    }
    key = jax.random.key(0)
    one_cfg = jax.tree.map(lambda x: x[:1], cfgs)
    args = (one_cfg, jnp.asarray([1e-2]), key)
    _, comp, run = _compile_and_run(_adam_runs(family, 100), args, options)
    row.update(compile_100_s=comp.wall, compile_100_cpu=comp.cpu)
    row.update(adam_100_s=run.wall, adam_100_cpu=run.cpu)
    lrs = jnp.asarray(np.logspace(-4, 0, num_lrs), jnp.float32)
    runs = _adam_runs(family, entry.horizon)
    (losses, _), comp, run = _compile_and_run(runs, (cfgs, lrs, key), options)
    row.update(sweep_compile_s=comp.wall, sweep_compile_cpu=comp.cpu)
    row.update(sweep_run_s=run.wall, sweep_run_cpu=run.cpu)
    row["initial_loss"] = float(jnp.mean(losses[:, :, 0]))
    row["best_final_loss"] = float(jnp.min(jnp.mean(losses[:, :, -10:], axis=(1, 2))))
    row["eval_estimate_cpu"] = num_optimizers * (
        row["sweep_compile_cpu"] + row["sweep_run_cpu"]
    )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="default", choices=sorted(suites.SUITES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="entry names to measure")
    parser.add_argument(
        "--fast-compile",
        action="store_true",
        help="compile with xla_backend_optimization_level=0",
    )
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    print(
        "| entry | split | params | horizon | Adam 100 steps: compile / run | "
        "7 lr x seeds: compile / run | x6 |\n|" + "---|" * 7
    )
    for entry in suites.get_suite(args.suite):
        if args.only and entry.name not in args.only:
            continue
        row = measure(entry, num_seeds=args.seeds, fast_compile=args.fast_compile)
        rows.append(row)
        print(
            f"| {row['name']} | {row['split']} | {row['params']:,} | "
            f"{row['horizon']} | {row['compile_100_cpu']:.1f} / "
            f"{row['adam_100_cpu']:.3f} | {row['sweep_compile_cpu']:.1f} / "
            f"{row['sweep_run_cpu']:.2f} | {row['eval_estimate_cpu']:.0f} |",
            flush=True,
        )
    total = sum(r["eval_estimate_cpu"] for r in rows)
    print(f"\ntotal x6 estimate: {total:.0f} CPU seconds over {len(rows)} entries")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
