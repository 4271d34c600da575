"""Several task families in one meta-iteration against one family at a time.

For the first 1, 3 and 7 families of `configs/population/mix.yaml`, compiles the
meta-step of `MultiFamilyES` over them and the meta-step of each family's own
single-family estimator over the same particles (the family's share of the
population), then times every compiled step in interleaved rounds in this one
process, so that load on the machine hits all alike. Reports medians: compile time
and per-iteration time of the n-family step against the sum of its n single-family
steps.

Writes `bench_families.csv` and `bench_families.md` to `--out` (default
`analysis/results/`).

Example:
    python -m analysis.bench_families                      # short CPU default
    python -m analysis.bench_families --lopt hierarchical --truncation 20 \\
        --horizon 50 --population-size 16 --weights mix --counts 7
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import jax
import numpy as np

from analysis.bench_step import round_robin
from es_l2o.cli import compose, instantiate
from es_l2o.es import MultiFamilyES
from es_l2o.unroll import LOptTraining

ROOT = Path(__file__).resolve().parents[1]


def build(args):
    """(families, weights, lopt, make_estimator) from the Hydra configs."""
    overrides = [
        "population=mix",
        f"es={args.es}",
        f"lopt={args.lopt}",
        f"es.truncation_length={args.truncation}" if args.es != "open_es" else "",
    ]
    if args.lopt == "mlp":
        overrides.append("lopt.hidden_sizes=[8]")
    cfg = compose("config", [o for o in overrides if o])
    mixture = instantiate(cfg.population)
    make_estimator = instantiate(cfg.es)
    keywords = getattr(make_estimator, "keywords", {})
    extra = {}
    if keywords.get("loss_normalization") == "none":
        extra["loss_normalization"] = "initial"  # as es-l2o-train does for a mix
    weights = mixture.weights if args.weights == "mix" else [1.0] * len(mixture)
    return mixture.families, weights, instantiate(cfg.lopt), make_estimator, extra


def compile_step(estimator, theta, key):
    """(compiled step, its arguments, seconds to compile)."""
    state = estimator.init(key, theta)
    start = time.perf_counter()
    compiled = estimator.step.lower(key, state).compile()
    return compiled, (key, state), time.perf_counter() - start


def bench(args) -> list[dict]:
    families, weights, lopt, make_estimator, extra = build(args)
    theta = lopt.init(jax.random.key(0))
    key = jax.random.key(1)
    systems = [
        LOptTraining(f, lopt, args.horizon, stagger=args.es != "open_es")
        for f in families
    ]
    fns, compile_s, sums = {}, {}, {}
    for n in args.counts:
        multi = MultiFamilyES.build(
            make_estimator,
            systems[:n],
            weights[:n],
            population_size=args.population_size * n // max(args.counts)
            if args.weights == "uniform"
            else args.population_size,
            **extra,
        )
        name = f"{n} families"
        fn, fn_args, compile_s[name] = compile_step(multi, theta, key)
        fns[name] = (fn, fn_args)
        sums[name] = []
        for i, size in enumerate(multi.population_sizes):
            single = f"family {i} x{size}"
            sums[name].append(single)
            if single not in fns:
                est = make_estimator(system=systems[i], population_size=size, **extra)
                fn, fn_args, compile_s[single] = compile_step(est, theta, key)
                fns[single] = (fn, fn_args)
        print(f"compiled {name} and its single families", flush=True)
    times = round_robin(fns, args.repeats)
    median = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for n in args.counts:
        name = f"{n} families"
        rows.append(
            {
                "families": n,
                "particles": sum(int(s.split("x")[-1]) for s in sums[name]),
                "compile_s": compile_s[name],
                "single_compile_sum_s": sum(compile_s[s] for s in sums[name]),
                "iteration_ms": 1e3 * median[name],
                "single_iteration_sum_ms": 1e3 * sum(median[s] for s in sums[name]),
            }
        )
    return rows


def markdown(rows, args) -> str:
    lines = [
        f"es={args.es}, lopt={args.lopt}, truncation {args.truncation}, horizon "
        f"{args.horizon}, weights {args.weights}; medians of {args.repeats} "
        f"interleaved rounds on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)).",
        "",
        "| families | particles | compile (s) | sum of single compiles (s) | "
        "iteration (ms) | sum of single iterations (ms) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["iteration_ms"] / r["single_iteration_sum_ms"]
        lines.append(
            f"| {r['families']} | {r['particles']} | {r['compile_s']:.1f} | "
            f"{r['single_compile_sum_s']:.1f} | {r['iteration_ms']:.1f} | "
            f"{r['single_iteration_sum_ms']:.1f} | {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "analysis" / "results"))
    parser.add_argument("--es", default="pes", help="configs/es: pes, tes, nres")
    parser.add_argument("--lopt", default="mlp", help="configs/lopt")
    parser.add_argument("--truncation", type=int, default=5)
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument(
        "--population-size",
        type=int,
        default=14,
        help="particles of the largest count (uniform weights: split evenly)",
    )
    parser.add_argument("--weights", choices=("uniform", "mix"), default="uniform")
    parser.add_argument(
        "--counts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3, 7]
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--name", default="bench_families")
    args = parser.parse_args(argv)
    rows = bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, args)
    (out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
