"""Large tensors read in place against large tensors stacked by shape, in one process.

`features.ShapeGroups` gives every tensor above `BUCKET_MAX_ENTRIES` entries a group
of its own (`STACK_LARGE_TENSORS = False`, the default): it is read where it is, and
the compiled update holds one program per large tensor. With `STACK_LARGE_TENSORS =
True` large tensors of one shape share one vmapped program over a stacked copy. For
each benchmark model of `bench_step.py` and each learned optimizer, this compiles one
update and one train step under both settings and times them against `optax.adam`,
interleaving the runs so that load on the machine hits all alike.

Writes `bench_grouping.csv` and `bench_grouping.md` to the output folder (default
`analysis/results/`).

Example:
    python analysis/bench_grouping.py --sizes transformer --lopts hierarchical
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

from analysis.bench_step import (
    build_lopt,
    build_model,
    grid_main,
    make_fns,
    round_robin,
)
from es_l2o.lopt import features as F

SETTINGS = {"in place": False, "stacked": True}


def compiled(opt, loss_fn, params, batch):
    """((update, args), (train step, args), seconds to compile the update) of `opt`."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    state = opt.init(params)
    update, step = make_fns(opt, loss_fn)
    update_args, step_args = (grads, state, params, loss), (params, state, batch)
    start = time.perf_counter()
    update = update.lower(*update_args).compile()
    seconds = time.perf_counter() - start
    step = step.lower(*step_args).compile()
    return (update, update_args), (step, step_args), seconds


def bench(size: str, name: str, repeats: int, budget_s: float, num_steps: int):
    params, loss_fn, batch = build_model(size)
    lopt = build_lopt(name)
    theta = lopt.init(jax.random.key(0))
    updates, steps = {}, {}
    row = {"size": size, "optimizer": name}
    default = F.STACK_LARGE_TENSORS
    for label, stack in SETTINGS.items():
        F.STACK_LARGE_TENSORS = stack  # read when the update is traced
        try:
            opt = lopt.transform(theta, num_steps)
            updates[label], steps[label], row[f"compile_s_{label}"] = compiled(
                opt, loss_fn, params, batch
            )
            row[f"groups_{label}"] = len(F.ShapeGroups.of(params, F.matrix_shape))
        finally:
            F.STACK_LARGE_TENSORS = default
    updates["adam"], steps["adam"], _ = compiled(
        optax.adam(1e-3), loss_fn, params, batch
    )
    for what, fns in (("update", updates), ("step", steps)):
        times = {
            label: float(np.median(t))
            for label, t in round_robin(fns, repeats, budget_s).items()
        }
        for label, seconds in times.items():
            row[f"{what}_ms_{label}"] = 1e3 * seconds
        row[f"{what}_speedup"] = times["stacked"] / times["in place"]
    print(
        f"{size:>11} {name:>18}: update in place {row['update_ms_in place']:.3f} ms, "
        f"stacked {row['update_ms_stacked']:.3f} ms, adam {row['update_ms_adam']:.3f} "
        f"ms; step in place {row['step_ms_in place']:.3f} ms, stacked "
        f"{row['step_ms_stacked']:.3f} ms, adam {row['step_ms_adam']:.3f} ms",
        flush=True,
    )
    return row


def markdown(rows) -> str:
    lines = [
        "| model | optimizer | groups (in place / stacked) | update ms in place "
        "| stacked | Adam | stacked / in place | train step ms in place | stacked "
        "| Adam | compile s in place | stacked |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['optimizer']} | {r['groups_in place']} / "
            f"{r['groups_stacked']} | {r['update_ms_in place']:.2f} "
            f"| {r['update_ms_stacked']:.2f} | {r['update_ms_adam']:.2f} "
            f"| {r['update_speedup']:.2f} | {r['step_ms_in place']:.2f} "
            f"| {r['step_ms_stacked']:.2f} | {r['step_ms_adam']:.2f} "
            f"| {r['compile_s_in place']:.1f} | {r['compile_s_stacked']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    grid_main(
        bench,
        markdown,
        "bench_grouping",
        __doc__,
        sizes="1M,transformer",
        lopts="hierarchical,hierarchical_velo",
        argv=argv,
    )


if __name__ == "__main__":
    main()
