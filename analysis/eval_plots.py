"""Plots of a suite evaluation (`es_l2o.evaluate.evaluate_suite`): PNG via Agg.

- `loss_curves.png`: per task, the seed-mean training-loss curve of the learned
  optimizer and of every baseline at its train-best learning rate (Adam's run on to
  the speedup cap), log scale where the losses are positive;
- `speedup_hist.png`: the speedups over tasks, in / out of distribution, with the
  "never reached" (capped) tasks marked.

Example:
    >>> import json
    >>> result = json.load(open("runs/eval/suite.json"))  # doctest: +SKIP
    >>> plot_suite(result, "runs/eval")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def plot_suite(result: dict[str, Any], out_dir) -> dict[str, str]:
    """Writes loss_curves.png and speedup_hist.png into `out_dir`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    paths = {"loss_curves": str(out / "loss_curves.png")}
    cols = min(4, max(1, len(rows)))
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        positive = True
        for name, curve in row["curves"].items():
            curve = np.asarray(curve, float)
            positive &= bool(np.all(curve[np.isfinite(curve)] > 0))
            style = dict(lw=2.0, color="k") if name == "learned" else dict(lw=1.0)
            ax.plot(np.arange(1, curve.size + 1), curve, label=name, **style)
        ax.axvline(row["horizon"], color="grey", ls=":", lw=0.8)
        if positive:
            ax.set_yscale("log")
        sp = row["speedup"]
        mark = "" if sp["reached"] else ", never reached"
        ax.set_title(
            f"{row['name']} ({row['split']}) speedup {sp['value']:.2f}{mark}",
            fontsize=8,
        )
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    if rows:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["loss_curves"], dpi=90)
    plt.close(fig)

    paths["speedup_hist"] = str(out / "speedup_hist.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    cap = result["settings"]["speedup_cap"]
    bins = np.linspace(0, cap, 11)
    for split in ("iid", "ood"):
        values = [r["speedup"]["value"] for r in rows if r["split"] == split]
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{split} ({len(values)})")
    never = sum(not r["speedup"]["reached"] for r in rows)
    ax.axvline(1.0, color="k", ls=":", lw=0.8)
    ax.set_xlabel(f"speedup (tuned Adam steps / horizon; {cap:g} = capped)")
    ax.set_ylabel("tasks")
    ax.set_title(f"never reached by Adam: {never} of {len(rows)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["speedup_hist"], dpi=90)
    plt.close(fig)
    return paths
