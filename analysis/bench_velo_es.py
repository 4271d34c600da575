"""Evolution strategies at VeLO size: full-rank against low-rank perturbations.

One PES meta-iteration (P particles x K = 20 inner steps, stored per-pair noise) of
the hierarchical optimizer at VeLO's size (`configs/lopt/hierarchical_velo.yaml`,
2.3M meta-parameters) on

- quadratic: 10-d quadratics;
- digits: an MLP 64-48-64-10 on the bundled 8x8 digits, batch 32,

three ways, in one process:

- full: every particle runs its own theta (P x D floats read at every inner step);
- low: rank-`r` perturbations (`es.rank`, EGGROLL): every particle runs the shared
  mean plus its factors, so the matrices are read once per step for all;
- floor: the same P x K unroll with ONE shared theta and no ES at all.

The estimators run `step_in_place` (as meta-training does: the new state is
written into the old one's buffers), each call on the state the previous one
returned. Every function is compiled first, then all are timed interleaved (one
call each per round, so load from other processes hits them alike); medians over
the rounds. Memory is XLA's compiled estimate (arguments + temporaries, nothing
allocated by it). The reference: learned_optimization's PES iteration at this
size on the 10-d quadratic, P = 16, took 1,786 ms on this machine (FIELD-NOTES).

Usage:
    python analysis/bench_velo_es.py [--populations 16,64] [--families quadratic]
        [--rank 1] [--rounds 5] [--budget-s 120] [--out analysis/results/velo_es]
        [--variants full,low,floor]

Writes OUT/bench_velo_es.csv, OUT/bench_velo_es.json and OUT/bench_velo_es.md.
With `--estimator full_es` the iteration is FullES (Open_ES) over K-step full
unrolls instead (the floor then omits the unroll's initialisation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from analysis.bench_step import round_robin, write_csv
from es_l2o.es import PES, FullES
from es_l2o.lopt import HierarchicalLOpt
from es_l2o.unroll import LOptTraining
from populations.digits import DigitsMLPFamily
from populations.quadratic import QuadraticFamily

ROOT = Path(__file__).resolve().parents[1]
#: learned_optimization's VeLO-size PES iteration, 10-d quadratic, P = 16 (ms)
PEER_MS = 1786.0
TRUNCATION = 20


def velo_lopt(name: str = "hierarchical_velo") -> HierarchicalLOpt:
    cfg = yaml.safe_load((ROOT / "configs" / "lopt" / f"{name}.yaml").read_text())
    cfg.pop("_target_")
    return HierarchicalLOpt(**cfg)


def families() -> dict:
    return {
        "quadratic": QuadraticFamily(dim=10),
        "digits": DigitsMLPFamily(hidden_sizes=(48, 64), batch_size=32),
    }


def estimator_fn(system, theta, population: int, rank, estimator: str = "pes"):
    """(jitted meta-iteration, args) of PES with stored noise, or of FullES
    (Open_ES, K-step full unrolls), at `rank`: the `step_in_place` that
    meta-training runs (it consumes its state; `Threaded` carries it on)."""
    if estimator == "full_es":
        es = FullES(system, population_size=population, num_steps=TRUNCATION, rank=rank)
    else:
        es = PES(
            system,
            population_size=population,
            std=0.01,
            truncation_length=TRUNCATION,
            rank=rank,
        )
    state = es.init(jax.random.key(0), theta)
    return es.step_in_place, (jax.random.key(1), state)


class Threaded:
    """A compiled `step(key, state) -> (state, metrics)` that consumes its state,
    called as `run(key)` with the state it returned last."""

    def __init__(self, step, state):
        self.step, self.state = step, state

    def __call__(self, key):
        self.state, metrics = self.step(key, self.state)
        return metrics


def floor_fn(system, theta, population: int):
    """(jitted P x K unroll with one shared theta, args): no perturbation, no ES."""
    keys = jax.random.split(jax.random.key(0), population)
    inner = jax.jit(jax.vmap(system.init, in_axes=(0, None)))(keys, theta)

    # the training step alone (the estimators' `batch_step` draws new episodes
    # only when one ends; none does within 20 steps of horizons >= 200 often
    # enough to matter here)
    train_step = jax.vmap(system._train_step, in_axes=(0, None, 0))

    @jax.jit
    def run(theta, inner, key):
        def body(inner, step_key):
            keys = jax.random.split(step_key, population)
            inner, (loss, _) = train_step(keys, theta, inner)
            return inner, loss

        steps = jax.random.split(key, TRUNCATION)
        inner, losses = jax.lax.scan(body, inner, steps)
        return inner, jnp.mean(losses)

    return run, (theta, inner, jax.random.key(1))


def compiled(fn, args):
    """(the compiled call, XLA's estimate of the bytes it holds: arguments and
    temporaries; -1 where the backend gives none). Compiled once, timed as is."""
    call = fn.lower(*args).compile()
    stats = call.memory_analysis()
    size = (
        -1 if stats is None else stats.argument_size_in_bytes + stats.temp_size_in_bytes
    )
    return call, int(size)


VARIANTS = ("full", "low", "floor")


def bench(
    family_name,
    population,
    rank,
    rounds,
    budget_s,
    lopt_name,
    estimator,
    variants=VARIANTS,
):
    """Rows for one (family, population): full, low rank, floor (those asked)."""
    lopt = velo_lopt(lopt_name)
    theta = lopt.init(jax.random.key(1))
    system = LOptTraining(families()[family_name], lopt, (200, 2000), stagger="offset")
    makers = {
        "full": lambda: estimator_fn(system, theta, population, None, estimator),
        "low": lambda: estimator_fn(system, theta, population, rank, estimator),
        "floor": lambda: floor_fn(system, theta, population),
    }
    fns = {name: makers[name]() for name in variants}
    memory = {}
    for name, (fn, args) in fns.items():
        call, memory[name] = compiled(fn, args)
        if name == "floor":
            fns[name] = (call, args)
        else:  # the state goes from each call to the next
            key, state = args
            fns[name] = (Threaded(call, state), (key,))
    times = round_robin(fns, rounds, budget_s)
    floor = statistics.median(times["floor"]) if "floor" in times else float("nan")
    rows = []
    for name, samples in times.items():
        ms = 1e3 * statistics.median(samples)
        rows.append(
            {
                "family": family_name,
                "population": population,
                "variant": name,
                "rank": rank if name == "low" else "",
                "median_ms": round(ms, 1),
                "ms_per_particle": round(ms / population, 2),
                "x_floor": round(ms / (1e3 * floor), 2),
                "rounds": len(samples),
                "memory_mib": round(memory[name] / 2**20, 1),
            }
        )
    return rows


def write(rows, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "bench_velo_es.csv", rows)
    (out / "bench_velo_es.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    (out / "bench_velo_es.md").write_text(table(rows, meta))


def table(rows, meta: dict) -> str:
    head = "| family | P | variant | ms / iteration | ms / particle | x floor | MiB |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['population']} | {r['variant']} | "
            f"{r['median_ms']:,} | {r['ms_per_particle']} | {r['x_floor']} | "
            f"{r['memory_mib']:,} |"
        )
    notes = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return "\n".join(lines) + "\n\n" + notes + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--populations", default="16,64,256")
    parser.add_argument("--families", default="quadratic,digits")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--estimator", default="pes", choices=("pes", "full_es"))
    parser.add_argument("--lopt", default="hierarchical_velo", help="configs/lopt/")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--out", default=str(ROOT / "analysis/results/velo_es"))
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="which of full,low,floor to time (full rank streams P x D floats per "
        "step: leave it out to time low rank and the floor without its cache misses)",
    )
    args = parser.parse_args(argv)
    variants = tuple(args.variants.split(","))
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        parser.error(f"--variants {args.variants!r}: choose from {','.join(VARIANTS)}")
    rows = []
    for family in args.families.split(","):
        for population in (int(p) for p in args.populations.split(",")):
            start = time.perf_counter()
            rows += bench(
                family,
                population,
                args.rank,
                args.rounds,
                args.budget_s,
                args.lopt,
                args.estimator,
                variants,
            )
            seconds = time.perf_counter() - start
            print(table(rows[-len(variants) :], {}), f"({seconds:.0f} s)")
            write(rows, Path(args.out), _meta(args))  # kept if cut short
    print(table(rows, _meta(args)))


def _meta(args) -> dict:
    device = jax.devices()[0]
    return {
        "estimator": f"{args.estimator}, K = {TRUNCATION}, lopt {args.lopt}",
        "variants timed together": args.variants,
        "peer_ms (learned_optimization, quadratic, P=16)": PEER_MS,
        "load_average": os.getloadavg(),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} on {device.platform} "
        f"({device.device_kind})",
    }


if __name__ == "__main__":
    main()
