"""Meta-training with low-rank perturbations against full rank: the same run twice.

Meta-trains `lopt=hierarchical` (its CPU size) on `population=digits_mlp` with PES,
the same seed, iterations and settings, once per `es.rank` (null: full rank), each
run its own `es_l2o.cli` process one after the other, then reads every run's
`metrics.jsonl` and reports:

- meta_loss: the mean training meta-loss of the particles over the last `--window`
  iterations (the loss PES minimises, noisy: particles run different tasks);
- validation: the meta-validation loss of the mean theta (fixed held-out tasks),
  at the last check and the best over the run;
- ratio: each against the full-rank run's (1.0 = equal; the target of low rank is
  within 10%, ratio <= 1.1).

Usage:
    python analysis/rank_vs_full.py [--ranks null,1,2] [--iterations 2000]
        [--horizon 200] [--window 200] [--runs /tmp/rank_vs_full]
        [--out analysis/results/velo_es] [--read-only]

Writes OUT/rank_vs_full.csv and OUT/rank_vs_full.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from analysis.bench_step import write_csv

ROOT = Path(__file__).resolve().parents[1]


def command(rank: str, args, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "es_l2o.cli",
        "lopt=hierarchical",
        "population=digits_mlp",
        "es=pes",
        f"es.rank={rank}",
        f"seed={args.seed}",
        f"num_iterations={args.iterations}",
        f"system.horizon={args.horizon}",
        "system.stagger=true",
        f"meta_validation.every={args.validate_every}",
        "checkpoint_every=0",
        f"run_dir={run_dir}",
        "progress=false",
    ]


def read(run_dir: Path, window: int) -> dict:
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    losses = [r["meta_loss"] for r in records if "meta_loss" in r]
    key = "meta_validation_loss"
    validation = [r[key] for r in records if key in r]
    wall = [r["wall_time_s"] for r in records if "wall_time_s" in r]
    return {
        "iterations": len(records),
        "meta_loss": statistics.fmean(losses[-window:]),
        "first_meta_loss": statistics.fmean(losses[:window]),
        "validation_last": validation[-1] if validation else float("nan"),
        "validation_best": min(validation) if validation else float("nan"),
        "ms_per_iteration": 1e3 * statistics.median(wall),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="null,1", help="es.rank values; null first")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="/tmp/rank_vs_full")
    parser.add_argument("--out", default=str(ROOT / "analysis/results/velo_es"))
    parser.add_argument("--read-only", action="store_true", help="read the runs only")
    args = parser.parse_args(argv)
    ranks = args.ranks.split(",")
    runs = Path(args.runs)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = {}
    for rank in ranks:
        run_dir = runs / f"rank_{rank}"
        if args.read_only:
            continue
        start = time.perf_counter()
        subprocess.run(command(rank, args, run_dir), check=True, env=env, cwd=ROOT)
        times[rank] = time.perf_counter() - start
        print(f"rank {rank}: {times[rank]:.0f} s", flush=True)
    rows = []
    base = read(runs / f"rank_{ranks[0]}", args.window)
    for rank in ranks:
        got = read(runs / f"rank_{rank}", args.window)
        rows.append(
            {
                "rank": rank,
                **{k: round(v, 4) for k, v in got.items()},
                "meta_loss_ratio": round(got["meta_loss"] / base["meta_loss"], 3),
                "validation_last_ratio": round(
                    got["validation_last"] / base["validation_last"], 3
                ),
                "validation_best_ratio": round(
                    got["validation_best"] / base["validation_best"], 3
                ),
                "run_s": round(times.get(rank, float("nan")), 1),
            }
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "rank_vs_full.csv", rows)
    cmd = " ".join(command("RANK", args, runs / "rank_RANK")[1:])
    lines = [
        "| es.rank | meta-loss (last "
        f"{args.window}) | x full | validation last | x full | validation best "
        "| x full | ms / iteration |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['rank']} | {r['meta_loss']:.4g} | {r['meta_loss_ratio']} | "
            f"{r['validation_last']:.4g} | {r['validation_last_ratio']} | "
            f"{r['validation_best']:.4g} | {r['validation_best_ratio']} | "
            f"{r['ms_per_iteration']:.0f} |"
        )
    notes = [
        f"- command: python {cmd}",
        f"- meta-loss: mean training meta-loss of the last {args.window} iterations "
        f"(first {args.window}: "
        + ", ".join(f"rank {r['rank']} {r['first_meta_loss']:.4g}" for r in rows)
        + ")",
        f"- load_average: {os.getloadavg()}",
    ]
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    (out / "rank_vs_full.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
