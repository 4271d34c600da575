"""Throughput of meta-training against population size and device count.

For every (population, devices) pair the script builds the estimator of
`configs/experiment/population_scaling.yaml` with the population sharded over that
many devices, times meta-iterations (median of `repeats`, after a compile), and
records particle inner-steps per second, the meta-iteration time, peak memory and the
device kind. Results go to a CSV, a Markdown table and a log-log plot of throughput
against population with the ideal linear line.

    python analysis/population_scaling.py --out analysis/results/scaling_cpu \\
        --max-population 1024 --devices 1,8
    # on CPU, give several host devices to compare device counts:
    export XLA_FLAGS=--xla_force_host_platform_device_count=8
    python analysis/population_scaling.py

Extra Hydra overrides follow `--`, e.g. `-- system.horizon=10 lopt.hidden_sizes=[8]`.
"""

from __future__ import annotations

import argparse
import csv
import resource
import statistics
import time
from pathlib import Path

import jax
import numpy as np


def peak_memory_bytes(device) -> int:
    """Peak bytes in use on `device`, or this process's peak RSS on a CPU."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without statistics
        stats = {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure(cfg, population: int, devices: int, repeats: int) -> dict:
    from es_l2o.cli import instantiate
    from es_l2o.sharding import population_mesh
    from es_l2o.unroll import LOptTraining

    family = instantiate(cfg.population)
    lopt = instantiate(cfg.lopt)
    system = LOptTraining(family, lopt, horizon=int(cfg.system.horizon))
    estimator = instantiate(cfg.es)(
        system=system, population_size=population, mesh=population_mesh(devices)
    )
    state = estimator.init(jax.random.key(0), lopt.init(jax.random.key(1)))
    start = time.perf_counter()
    state, metrics = estimator.step(jax.random.key(2), state)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        state, metrics = estimator.step(jax.random.key(3 + i), state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    steps = population * estimator.num_steps
    return {
        "population": population,
        "devices": devices,
        "device_kind": jax.devices()[0].device_kind,
        "inner_steps_per_iteration": steps,
        "iteration_s": seconds,
        "particle_steps_per_s": steps / seconds,
        "compile_s": compile_s,
        "peak_memory_bytes": peak_memory_bytes(jax.devices()[0]),
    }


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for devices in sorted({r["devices"] for r in rows}):
        sel = sorted(
            (r for r in rows if r["devices"] == devices), key=lambda r: r["population"]
        )
        pops = np.array([r["population"] for r in sel])
        rate = np.array([r["particle_steps_per_s"] for r in sel])
        (line,) = ax.loglog(pops, rate, "o-", label=f"{devices} device(s)")
        ax.loglog(
            pops, rate[0] * pops / pops[0], ":", color=line.get_color(), alpha=0.6
        )
    ax.set_xlabel("population size")
    ax.set_ylabel("particle inner-steps per second")
    ax.set_title(f"{rows[0]['device_kind']} (dotted: ideal linear scaling)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="analysis/results/population_scaling")
    parser.add_argument("--max-population", type=int, default=None)
    parser.add_argument("--devices", default=None, help="comma-separated device counts")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args(argv)

    from es_l2o.cli import compose

    cfg = compose("config", ["experiment=population_scaling", *args.overrides])
    sizes = [int(p) for p in cfg.scaling.population_sizes]
    if args.max_population:
        sizes = [p for p in sizes if p <= args.max_population]
    counts = [
        int(d)
        for d in (
            args.devices.split(",") if args.devices else cfg.scaling.device_counts
        )
    ]
    counts = [d for d in counts if d <= jax.device_count()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for devices in counts:
        for population in sizes:
            if population % (2 * devices):
                continue
            try:
                row = measure(cfg, population, devices, int(cfg.scaling.repeats))
            except MemoryError as err:
                print(f"skip population {population} on {devices} device(s): {err}")
                break
            rows.append(row)
            write_csv(rows, out / "population_scaling.csv")  # kept if cut short
            print(
                f"devices {devices:2d}  population {population:6d}  "
                f"{row['iteration_s'] * 1e3:9.1f} ms/iteration  "
                f"{row['particle_steps_per_s']:12.0f} particle-steps/s",
                flush=True,
            )
    lines = [
        "| devices | population | ms / meta-iteration | particle inner-steps / s | "
        "peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['population']} | {r['iteration_s'] * 1e3:.1f} | "
            f"{r['particle_steps_per_s']:.0f} | {r['peak_memory_bytes'] / 2**20:.0f} |"
        )
    (out / "population_scaling.md").write_text(
        f"Device: {rows[0]['device_kind']}, horizon {cfg.system.horizon} inner steps, "
        f"{cfg.population._target_}, {cfg.lopt._target_}\n\n" + "\n".join(lines) + "\n"
    )
    plot(rows, out / "population_scaling.png")
    print((out / "population_scaling.md").read_text())


if __name__ == "__main__":
    main()
