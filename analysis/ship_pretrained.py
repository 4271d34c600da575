"""Copies a staged run's optimizer into `es_l2o/pretrained/` with its provenance.

    python -m analysis.ship_pretrained generalist RUN_1 [RUN_2 ...] \\
        --optimizer RUN_N/theta.safetensors --evaluation analysis/results/generalist

Each RUN is one meta-training stage (its `config.yaml` and `metrics.jsonl`, in
order); `--after es_l2o/pretrained/NAME.json` puts the stages of a shipped file's
provenance before them (where those run folders are gone). The optimizer file is the
last stage's export (or its latest `theta.safetensors` where the stage was stopped
early). Writes `NAME.safetensors` and `NAME.json` (recipe, stages with their configs,
iterations and hours, CPU-hours in all, the commit, the evaluation summaries of
`analysis/eval_generalist.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import yaml

from es_l2o import export

PRETRAINED = Path(__file__).resolve().parents[1] / "es_l2o" / "pretrained"


def stage_record(run: Path) -> dict:
    """A stage's config, iterations run and wall-clock hours (from its metrics)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    seconds = sum(float(r.get("wall_time_s", 0.0)) for r in records)
    last = records[-1] if records else {}
    return {
        "run": run.name,
        "config": config,
        "iterations": int(last.get("iteration", -1)) + 1,
        "hours": seconds / 3600.0,
        "final_meta_loss": last.get("meta_loss"),
    }


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--optimizer", type=Path, required=True)
    parser.add_argument("--evaluation", type=Path, default=None)
    parser.add_argument("--recipe", default="es-l2o-train experiment=generalist")
    parser.add_argument("--after", type=Path, default=None, help="earlier stages")
    args = parser.parse_args(argv)
    export.load(args.optimizer, num_steps=1)  # refuses a bad file before copying
    earlier = []
    if args.after is not None:
        earlier = json.loads(args.after.read_text())["stages"]
    stages = earlier + [stage_record(run) for run in args.runs]
    cores = os.cpu_count() or 1
    evaluation = {}
    if args.evaluation is not None:
        for path in sorted(args.evaluation.glob("*.json")):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "generalist_summary" in data:
                evaluation[path.stem] = data["generalist_summary"]
            elif path.stem == "divergence":
                evaluation["divergence"] = data
    info = {
        "name": args.name,
        "recipe": args.recipe,
        "stages": stages,
        "cpu_hours": sum(s["hours"] for s in stages) * cores,
        "machine": f"{platform.machine()}, {cores} cores",
        "commit": _commit(),
        "evaluation": evaluation,
    }
    shutil.copyfile(args.optimizer, PRETRAINED / f"{args.name}.safetensors")
    (PRETRAINED / f"{args.name}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {PRETRAINED / args.name}.safetensors and .json")


if __name__ == "__main__":
    main()
