"""Keeps a meta-training stage's small files in the repository: its exported
optimizer, its config and a summary of its metrics (not particle checkpoints).

    python -m analysis.archive_stage RUN analysis/results/generalist/stages/NAME \\
        [--optimizer RUN/theta.safetensors]

The summary holds the iterations, wall-clock hours, the final theta norm and the
meta-loss (all families and per family) averaged over windows of `--window`
iterations: a stage's progress at a glance, and what the next stage starts from.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from es_l2o import export


def windowed_meta_loss(records: list[dict], window: int) -> list[dict]:
    """Mean meta-loss (overall and per family) over consecutive windows.

    Example:
        >>> rows = [{"iteration": i, "meta_loss": float(i)} for i in range(4)]
        >>> windowed_meta_loss(rows, 2)
        [{'from': 0, 'to': 1, 'meta_loss': 0.5}, {'from': 2, 'to': 3, 'meta_loss': 2.5}]
    """
    keys = [k for k in records[0] if k == "meta_loss" or k.startswith("meta_loss/")]
    out = []
    for start in range(0, len(records), window):
        chunk = records[start : start + window]
        row = {"from": chunk[0]["iteration"], "to": chunk[-1]["iteration"]}
        for key in keys:
            values = np.asarray([r[key] for r in chunk if key in r], np.float64)
            row[key] = round(float(np.nanmean(values)), 5)
        out.append(row)
    return out


def summary(run: Path, window: int) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {
        "iterations": records[-1]["iteration"] + 1,
        "hours": sum(float(r.get("wall_time_s", 0.0)) for r in records) / 3600.0,
        "theta_norm": records[-1].get("theta_norm"),
        "meta_loss_windows": windowed_meta_loss(records, window),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--optimizer", type=Path, default=None)
    parser.add_argument("--window", type=int, default=500)
    args = parser.parse_args(argv)
    optimizer = args.optimizer or args.run / "optimizer.safetensors"
    export.load(optimizer, num_steps=1)  # refuses a bad file before copying
    args.dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(optimizer, args.dest / "optimizer.safetensors")
    shutil.copyfile(args.run / "config.yaml", args.dest / "config.yaml")
    text = json.dumps(summary(args.run, args.window), indent=1) + "\n"
    (args.dest / "summary.json").write_text(text)
    print(f"archived {args.run} in {args.dest}")


if __name__ == "__main__":
    main()
