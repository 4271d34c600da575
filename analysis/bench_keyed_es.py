"""FullES with keyed Open_ES against evosax's own ask and tell, in one process.

`FullES(algorithm="Open_ES")` regenerates every particle's perturbation from a key
(`es_l2o.es.keyed.KeyedOpenES`); an Open_ES subclass it does not recognise takes
evosax's path, which builds the (P, D) population. Both meta-steps are timed
alternately on the digits MLP population (`mlp` optimizer, 20 inner steps), and the
median meta-iteration time and particle inner-steps per second of each are printed.
With `--memory` it compiles both steps instead (quadratic population, `MLPLOpt((32,))`,
horizon 4) and prints XLA's temporary bytes per device, with `--chunk` particles per
device at a time.

Example:
    python analysis/bench_keyed_es.py --population 64
    python analysis/bench_keyed_es.py --memory --population 4096 --chunk 64
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python analysis/bench_keyed_es.py --population 128 --devices 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax
from evosax.algorithms import Open_ES

from es_l2o.es import FullES
from es_l2o.lopt import MLPLOpt
from es_l2o.sharding import population_mesh
from es_l2o.unroll import LOptTraining
from populations.digits import DigitsMLPFamily
from populations.quadratic import QuadraticFamily

HORIZON = 20


class EvosaxOpenES(Open_ES):
    """evosax's Open_ES under another name: FullES asks for the whole population."""


def compiled_memory(population: int, devices: int, chunk: int | None) -> None:
    """Temporary bytes of one compiled meta-step, keyed and evosax's."""
    lopt = MLPLOpt(hidden_sizes=(32,))
    system = LOptTraining(QuadraticFamily(), lopt, horizon=4)
    row = []
    for name, algorithm in (("keyed", "Open_ES"), ("evosax", EvosaxOpenES)):
        es = FullES(
            system,
            population_size=population,
            optimizer=optax.adam(1e-2),
            algorithm=algorithm,
            mesh=population_mesh(devices),
            particle_chunk=chunk,
        )
        state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        stats = es.step.lower(jax.random.key(0), state).compile().memory_analysis()
        row.append(f"{name} {stats.temp_size_in_bytes / 2**20:.1f} MiB")
    print(
        f"population {population}, D {es.num_dims}, {devices} device(s), "
        f"particle_chunk {chunk}: temporary memory " + ", ".join(row)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--chunk", type=int, default=None)
    args = parser.parse_args(argv)
    if args.memory:
        return compiled_memory(args.population, args.devices, args.chunk)

    lopt = MLPLOpt()
    system = LOptTraining(DigitsMLPFamily(), lopt, horizon=HORIZON)
    runs = {}
    for name, algorithm in (("keyed", "Open_ES"), ("evosax", EvosaxOpenES)):
        es = FullES(
            system,
            population_size=args.population,
            optimizer=optax.adam(1e-2),
            algorithm=algorithm,
            mesh=population_mesh(args.devices),
        )
        state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        state, metrics = es.step(jax.random.key(2), state)  # compile
        jax.block_until_ready(metrics)
        runs[name] = {"es": es, "state": state, "times": []}
    for i in range(args.repeats):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["es"].step(jax.random.key(3 + i), run["state"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)
    print(
        f"{jax.devices()[0].device_kind}, population {args.population}, "
        f"{args.devices} device(s), {HORIZON} inner steps"
    )
    medians = {name: statistics.median(run["times"]) for name, run in runs.items()}
    for name, seconds in medians.items():
        rate = args.population * HORIZON / seconds
        print(
            f"  {name:7s} {1e3 * seconds:8.1f} ms / meta-iteration "
            f"{rate:9.0f} particle-steps / s"
        )
    print(f"  keyed / evosax time: {medians['keyed'] / medians['evosax']:.2f}")


if __name__ == "__main__":
    main()
