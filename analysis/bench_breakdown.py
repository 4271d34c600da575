"""Where a hierarchical train step spends its time beyond Adam's, in one process.

For each benchmark model of `bench_step.py` this times, interleaved so that load on
the machine hits all alike:

- `grad`: the forward and backward pass alone (`jax.value_and_grad`, jitted);
- the whole train step (forward, backward, update, apply) with `optax.adam` and
  with the learned optimizer;
- the same train step with `NoParamMLP`, the learned optimizer with its
  per-parameter MLP and the features that only the MLP reads cut out: the step is
  the clipped gradient times one generated weight. Its accumulators (momenta, second
  moment, factored moments), the per-tensor statistics and the per-tensor LSTM are
  unchanged, so its cost is that of everything but the per-parameter network.

From these it reports the cost each optimizer adds to `grad` inside the train step,
the share of that cost which the per-parameter MLP accounts for, and the added cost
that a train step of 1.5x Adam's would allow (`1.5 * adam_step - grad`).

Writes `bench_breakdown.csv` and `bench_breakdown.md` to the output folder (default
`analysis/results/`).

Example:
    python analysis/bench_breakdown.py --sizes 100k,1M --repeats 20
"""

from __future__ import annotations

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
from es_l2o.lopt.hierarchical import HierarchicalLOpt

TARGET_RATIO = 1.5


class NoParamMLP(HierarchicalLOpt):
    """`HierarchicalLOpt` whose per-parameter MLP is the clipped gradient times one
    generated weight (a cost ablation, not an optimizer)."""

    def per_param_mlp(self, features, weights):
        clipped = features.entries[1][1]  # input 1 of `param_features`: clip(g)
        return clipped * weights[0], 0.0


def bench(size: str, name: str, repeats: int, budget_s: float, num_steps: int):
    params, loss_fn, batch = build_model(size)
    lopt = build_lopt(name)
    if not isinstance(lopt, HierarchicalLOpt):
        raise ValueError(
            f"{name!r} is a {type(lopt).__name__}; the breakdown needs a "
            "hierarchical optimizer (hierarchical or hierarchical_velo)"
        )
    theta = lopt.init(jax.random.key(0))
    opts = {
        "adam": optax.adam(1e-3),
        name: lopt.transform(theta, num_steps),
        "no per-param MLP": NoParamMLP(**lopt.config()).transform(theta, num_steps),
    }
    fns = {"grad": (jax.jit(jax.value_and_grad(loss_fn)), (params, batch))}
    for label, opt in opts.items():
        _, step = make_fns(opt, loss_fn)
        fns[label] = (step, (params, opt.init(params), batch))
    runs = round_robin(fns, repeats, budget_s)
    times = {label: 1e3 * float(np.median(t)) for label, t in runs.items()}
    grad, adam, full, no_mlp = (
        times[k] for k in ("grad", "adam", name, "no per-param MLP")
    )
    row = {
        "size": size,
        "num_params": sum(x.size for x in jax.tree.leaves(params)),
        "optimizer": name,
        "grad_ms": grad,
        "adam_step_ms": adam,
        "step_ms": full,
        "no_mlp_step_ms": no_mlp,
        "step_ratio": full / adam,
        "no_mlp_step_ratio": no_mlp / adam,
        "adam_added_ms": adam - grad,
        "added_ms": full - grad,
        "mlp_ms": full - no_mlp,
        "allowed_added_ms": TARGET_RATIO * adam - grad,
        "repeats": len(runs["grad"]),
    }
    print(
        f"{size:>11} {name:>18}: grad {grad:.3f} ms, step adam {adam:.3f} ms, "
        f"{name} {full:.3f} ms ({full / adam:.2f}x), without per-param MLP "
        f"{no_mlp:.3f} ms ({no_mlp / adam:.2f}x)",
        flush=True,
    )
    return row


def markdown(rows) -> str:
    lines = [
        "| model | params | optimizer | grad ms | Adam step ms | step ms | x Adam "
        "| step without per-param MLP ms | x Adam | added to grad: Adam "
        "| optimizer | of which per-param MLP | allowed at 1.5x |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['num_params']:,} | {r['optimizer']} "
            f"| {r['grad_ms']:.2f} | {r['adam_step_ms']:.2f} | {r['step_ms']:.2f} "
            f"| {r['step_ratio']:.2f} | {r['no_mlp_step_ms']:.2f} "
            f"| {r['no_mlp_step_ratio']:.2f} | {r['adam_added_ms']:.2f} "
            f"| {r['added_ms']:.2f} | {r['mlp_ms']:.2f} "
            f"| {r['allowed_added_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    grid_main(
        bench,
        markdown,
        "bench_breakdown",
        __doc__,
        sizes="100k,1M,transformer",
        lopts="hierarchical",
        argv=argv,
    )


if __name__ == "__main__":
    main()
