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
import math
from pathlib import Path

import jax

from analysis.bench_step import write_csv
from es_l2o import export
from es_l2o.evaluate import evaluate_optimizer
from populations.quadratic import IllConditionedQuadraticFamily


def scan(path, dims=(10, 50, 200, 400, 1000, 3000), tasks=3, steps=100) -> list:
    """One row per (dimension, task): initial and final loss, finite, descended.
    Each dimension's tasks train together (`es_l2o.evaluate.evaluate_optimizer`)."""
    opt = export.load(path, num_steps=steps)
    keys = jax.random.split(jax.random.key(0), tasks)
    rows = []
    for dim in dims:
        family = IllConditionedQuadraticFamily(
            dim=dim, rotate=False, log10_condition_range=(1.0, 3.0)
        )
        out = evaluate_optimizer(family, opt, steps, keys)
        for task in range(tasks):
            initial = float(out["loss_curve"][task, 0])
            final = float(out["train_loss"][task])
            rows.append(
                {
                    "dim": dim,
                    "task": task,
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
        write_csv(out / "dimension_scan.csv", rows)
        command = (
            f"python -m analysis.dimension_scan {args.file} --dims {args.dims} "
            f"--tasks {args.tasks} --steps {args.steps}"
        )
        head = f"`{command}`\n\n"
        (out / "dimension_scan.md").write_text(head + text)


if __name__ == "__main__":
    main()
