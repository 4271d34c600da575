"""Tuned Adam's learning rate against model size on a population's training tasks.

The evidence behind `lopt.floor_params`: on the generalist's meta-training families
(their training split, never the evaluation suite's held-out tasks), Adam's best
rate at a fixed horizon falls as the model grows, while the hierarchical
optimizer's steps, sized by each tensor's initial RMS, do not.

    python -m analysis.adam_rate_vs_size --population generalist --out FILE.md

Prints (and writes) one Markdown row per family: parameter count, the best of the
7-point sweep on the mean of the metric (validation loss where the family has it),
and the mean metric at every rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from es_l2o.evaluate import ADAM_LEARNING_RATES, evaluate_adam_sweep
from populations.splits import SplitFamily

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "population"


def parameter_count(family, key) -> int:
    """Parameters of one task of `family` (drawn from `key`)."""
    params = family.task(family.sample(key)).init(key)
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def family_row(family, num_steps: int, keys) -> dict:
    """Adam's sweep on `keys`' meta-training tasks: the parameter count, best
    rate, mean metric."""
    name = getattr(family, "name", type(family).__name__)
    family = SplitFamily(family, "meta_train")
    metrics = evaluate_adam_sweep(family, num_steps, keys)
    metric = "val_loss" if "val_loss" in metrics else "train_loss"
    values = np.where(np.isfinite(metrics[metric]), metrics[metric], np.nan)
    means = np.nanmean(values, axis=1)
    return {
        "family": name,
        "params": parameter_count(family, keys[0]),
        "metric": metric,
        "best_lr": float(ADAM_LEARNING_RATES[int(np.nanargmin(means))]),
        "means": [float(m) for m in means],
    }


def markdown(rows: list[dict], num_steps: int, num_tasks: int) -> str:
    """The rows as a Markdown table."""
    rates = " | ".join(f"{lr:.3g}" for lr in ADAM_LEARNING_RATES)
    lines = [
        f"Adam on {num_tasks} training tasks per family, {num_steps} steps; "
        "mean final metric per learning rate.",
        "",
        f"| family | parameters | metric | best rate | {rates} |",
        "|---|---:|---|---:|" + "---:|" * len(ADAM_LEARNING_RATES),
    ]
    for r in rows:
        means = " | ".join(f"{m:.3g}" for m in r["means"])
        lines.append(
            f"| {r['family']} | {r['params']} | {r['metric']} | "
            f"{r['best_lr']:.3g} | {means} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", default="generalist")
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config = CONFIGS / f"{args.population}.yaml"
    if not config.exists():
        valid = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        parser.error(f"--population {args.population!r}: not one of {valid}")
    mixture = instantiate(OmegaConf.load(config))
    families = getattr(mixture, "families", [mixture])
    keys = jax.random.split(jax.random.key(args.seed), args.num_tasks)
    rows = [family_row(f, args.num_steps, keys) for f in families]
    text = markdown(rows, args.num_steps, args.num_tasks)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
