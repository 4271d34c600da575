"""Does a learned optimizer stay stable as a vector grows? Diagonal quadratics.

Runs an exported optimizer for `--steps` steps on diagonal ill-conditioned
quadratics (`populations.quadratic.IllConditionedQuadraticFamily`, rotate=False,
condition 10-1,000) of several dimensions, a few tasks each, and prints the
initial and final loss of every run: the `default` suite's `quadratic_ill_1000d`
is the 1,000-d member of this family.

Usage:
    python -m analysis.dimension_scan FILE [--dims 10,50,200,400,1000,3000]
        [--tasks 3] [--steps 100] [--out DIR]

Writes OUT/dimension_scan.csv and OUT/dimension_scan.md where `--out` is given.

Example:
    >>> rows = scan(
    ...     "es_l2o/pretrained/generalist.safetensors", dims=(10,), tasks=1, steps=5
    ... )
    >>> rows[0]["dim"], rows[0]["finite"]
    (10, True)
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import jax
import optax

from es_l2o import export
from populations.quadratic import IllConditionedQuadraticFamily


def make_step(opt, family):
    """One jitted step of `opt` on a task of `family` given by its sampled config
    (compiled once per dimension, not once per task)."""

    @jax.jit
    def step(params, state, key, cfg):
        loss, grads = jax.value_and_grad(family.task(cfg).loss)(params, key)
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    return step


def run_task(opt, step, task, cfg, key: jax.Array, steps: int) -> tuple[float, float]:
    """(initial loss, final loss) of `steps` calls of `step` on `task`."""
    key_init, key_steps = jax.random.split(key)
    params = task.init(key_init)
    state = opt.init(params)
    initial = float(task.loss(params, key_steps))
    for key in jax.random.split(key_steps, steps):
        params, state = step(params, state, key, cfg)
    return initial, float(task.loss(params, key_steps))


def scan(path, dims=(10, 50, 200, 400, 1000, 3000), tasks=3, steps=100) -> list:
    """One row per (dimension, task): initial and final loss, finite, descended."""
    opt = export.load(path, num_steps=steps)
    rows = []
    for dim in dims:
        family = IllConditionedQuadraticFamily(
            dim=dim, rotate=False, log10_condition_range=(1.0, 3.0)
        )
        step = make_step(opt, family)
        for seed in range(tasks):
            cfg = family.sample(jax.random.key(seed))
            key = jax.random.key(100 + seed)
            initial, final = run_task(opt, step, family.task(cfg), cfg, key, steps)
            rows.append(
                {
                    "dim": dim,
                    "task": seed,
                    "initial_loss": initial,
                    "final_loss": final,
                    "finite": math.isfinite(final),
                    "descended": math.isfinite(final) and final < initial,
                }
            )
    return rows


def table(rows) -> str:
    lines = ["| dim | task | initial loss | final loss | descended |", "|---" * 5 + "|"]
    for r in rows:
        lines.append(
            f"| {r['dim']} | {r['task']} | {r['initial_loss']:.4g} | "
            f"{r['final_loss']:.4g} | {'yes' if r['descended'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", help="an exported optimizer (.safetensors)")
    parser.add_argument("--dims", default="10,50,200,400,1000,3000")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        dims = tuple(int(d) for d in args.dims.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 2:
        parser.error(f"--dims {args.dims!r}: a comma-separated list of integers >= 2")
    rows = scan(args.file, dims, args.tasks, args.steps)
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "dimension_scan.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        command = f"python -m analysis.dimension_scan {args.file} --steps {args.steps}"
        head = f"`{command}`\n\n"
        (out / "dimension_scan.md").write_text(head + text)


if __name__ == "__main__":
    main()
