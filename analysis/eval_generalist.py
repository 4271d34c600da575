"""Evaluates a generalist optimizer file as issue-level targets ask, in one process.

For each suite (`default` at its horizons, `long` at 1,000 steps): the learned
optimizer against every baseline of `es_l2o.evaluate` (Adam's learning rate chosen
per task and per metric from a 7-point sweep), against untuned Adam (lr 1e-3, read
from the same sweep), optionally against a reference optimizer file (the
Quickstart's `mlp`), with parameter norms. Splits are set for the optimizer's own
meta-training population (`populations.suites.relabel`): "iid" only where a suite
task has the structure of a meta-training family at a horizon it was trained for.
Then a divergence check: every suite task trained for 5x the longest
meta-training horizon must stay finite and end below its initial loss.

    python -m analysis.eval_generalist es_l2o/pretrained/generalist.safetensors \\
        --population generalist --max-horizon 2000 --out analysis/results/generalist

Writes `SUITE.json`, `report.md` and `divergence.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import yaml

from es_l2o import evaluate, export
from populations import suites

UNTUNED_LR = 1e-3


def training_families(population: str) -> list[dict]:
    """The family configs of `configs/population/POPULATION.yaml`."""
    path = Path(__file__).resolve().parents[1] / "configs" / "population"
    node = yaml.safe_load((path / f"{population}.yaml").read_text())
    return node.get("families", [node])


def _untuned(row: dict, metric: str):
    adam = row["adam"]
    values = adam["per_lr"].get(metric)
    if values is None:
        return None
    rates = np.asarray(adam["learning_rates"])
    return float(values[int(np.argmin(np.abs(np.log(rates / UNTUNED_LR))))])


def _reference_rows(path: str, entries, num_seeds: int, seed: int) -> dict:
    result = evaluate.evaluate_suite(
        lambda n: export.load(path, num_steps=n),
        entries,
        num_seeds=num_seeds,
        learning_rates=[UNTUNED_LR],
        baselines=("adam",),
        seed=seed,
    )
    return {r["name"]: r["learned"] for r in result["rows"]}


def summarize(rows: list[dict]) -> dict:
    """Per split: val / train wins against tuned Adam, train no worse where val
    wins, median speedup, wins against untuned Adam, weight inflation."""
    out = {}
    for split in ("iid", "ood", "all"):
        chosen = [r for r in rows if split == "all" or r["split"] == split]
        if not chosen:
            continue
        metric = lambda r: (
            "val_loss" if r["learned"]["val_loss"] is not None else ("train_loss")
        )
        val_wins = [r["learned"][metric(r)] < r["adam"][metric(r)] for r in chosen]
        train_ok = [
            r["learned"]["train_loss"] <= r["adam"]["train_loss"]
            for r, won in zip(chosen, val_wins, strict=True)
            if won
        ]
        untuned = [
            r["learned"][metric(r)] < r["adam_untuned"][metric(r)] for r in chosen
        ]
        out[split] = {
            "tasks": len(chosen),
            "won_val_vs_tuned_adam": float(np.mean(val_wins)),
            "train_no_worse_where_won": float(np.mean(train_ok)) if train_ok else None,
            "won_vs_untuned_adam": float(np.mean(untuned)),
            "median_speedup": float(np.median([r["speedup"]["value"] for r in chosen])),
            "weight_inflation": int(sum(r["weight_inflation"] for r in chosen)),
        }
    return out


def _entries(suite: str, only=None):
    entries = suites.get_suite(suite)
    return [e for e in entries if not only or e.name in only]


def evaluate_suite(
    path,
    suite,
    families,
    max_horizon,
    num_seeds,
    seed,
    reference,
    only=None,
    baselines=("adam",),
    out_dir=None,
):
    entries = suites.relabel(_entries(suite, only), families, max_horizon)
    result = evaluate.evaluate_suite(
        lambda n: export.load(path, num_steps=n),
        entries,
        num_seeds=num_seeds,
        baselines=baselines,
        seed=seed,
        log=lambda line: print(f"[{suite}] {line}", flush=True),
    )
    refs = _reference_rows(reference, entries, num_seeds, seed) if reference else {}
    if out_dir is not None:
        from analysis.eval_plots import plot_suite

        plot_suite(result, Path(out_dir) / suite)
    for row in result["rows"]:
        row.pop("curves", None)
        row["adam_untuned"] = {
            m: _untuned(row, m) for m in ("train_loss", "val_loss", "param_norm")
        }
        if row["name"] in refs:
            row["reference"] = refs[row["name"]]
    result["generalist_summary"] = summarize(result["rows"])
    return result


def plot_ratios(results: dict, out_dir) -> Path:
    """`ratios.png`: per task, the learned optimizer's final loss (validation where
    the task has it) and parameter norm over tuned Adam's, by suite and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.28 * _num_rows(results) + 1.5))
    labels, loss_ratio, norm_ratio, colors = [], [], [], []
    for suite, result in results.items():
        for row in result["rows"]:
            metric = (
                "val_loss" if row["learned"]["val_loss"] is not None else "train_loss"
            )
            labels.append(f"{suite}: {row['name']}")
            loss_ratio.append(row["learned"][metric] / row["adam"][metric])
            norm_ratio.append(
                row["learned"]["param_norm"] / row["adam"]["param_norm_val"]
            )
            colors.append("tab:blue" if row["split"] == "iid" else "tab:orange")
    ys = np.arange(len(labels))
    for ax, values, title in (
        (axes[0], loss_ratio, "final loss / tuned Adam's (val where it exists)"),
        (axes[1], norm_ratio, "parameter norm / tuned Adam's"),
    ):
        ax.barh(ys, values, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(ys, labels if ax is axes[0] else [""] * len(ys), fontsize=7)
        ax.invert_yaxis()
    fig.suptitle("blue: in distribution, orange: out of distribution", fontsize=8)
    fig.subplots_adjust(left=0.2, right=0.98, wspace=0.08)
    path = Path(out_dir) / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num_rows(results: dict) -> int:
    return sum(len(r["rows"]) for r in results.values())


def divergence_check(path, suite_names, num_steps: int, seed: int, only=None):
    """Every entry of the suites trained `num_steps` steps on one held-out task."""
    out, seen = [], set()
    opt = export.load(path, num_steps=num_steps)
    for suite in suite_names:
        for entry in _entries(suite, only):
            key = suites.entry_structure(entry)
            if key in seen:
                continue
            seen.add(key)
            family = suites.build_eval(entry)
            metrics = evaluate.evaluate_optimizer(
                family, opt, num_steps, evaluate.heldout_keys(seed, 1)
            )
            curve = metrics["loss_curve"][0]
            window = max(1, num_steps // 100)
            first, last = (
                float(np.mean(curve[:window])),
                float(np.mean(curve[-window:])),
            )
            out.append(
                {
                    "name": entry.name,
                    "steps": num_steps,
                    "finite": bool(np.all(np.isfinite(curve))),
                    "initial_loss": first,
                    "final_loss": last,
                    "descended": bool(last < first),
                }
            )
            print(f"[divergence] {out[-1]}", flush=True)
            jax.clear_caches()
    return out


def _row_line(row: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.4g}"
    learned, adam, untuned = row["learned"], row["adam"], row["adam_untuned"]
    ref = row.get("reference", {})
    return (
        f"| {row['name']} | {row['split']} | {row['horizon']} | "
        f"{f(learned['train_loss'])} / {f(learned['val_loss'])} | "
        f"{f(adam['train_loss'])} / {f(adam['val_loss'])} | "
        f"{f(untuned['train_loss'])} / {f(untuned['val_loss'])} | "
        f"{f(ref.get('train_loss'))} / {f(ref.get('val_loss'))} | "
        f"{f(learned['param_norm'])} / {f(adam['param_norm_val'])} | "
        f"{row['speedup']['value']:.2f} |"
    )


def report(results: dict, divergence: list[dict]) -> str:
    lines = []
    for suite, result in results.items():
        lines += [
            f"### Suite `{suite}`",
            "",
            "| task | split | steps | learned train / val | tuned Adam train / val "
            "| Adam 1e-3 train / val | reference train / val "
            "| param norm learned / Adam | speedup |",
            "|---|---|---|---|---|---|---|---|---|",
            *(_row_line(r) for r in result["rows"]),
            "",
            "| split | tasks | val wins vs tuned Adam | train no worse there "
            "| wins vs Adam 1e-3 | median speedup | weight inflation |",
            "|---|---|---|---|---|---|---|",
        ]
        for split, s in result["generalist_summary"].items():
            no_worse = s["train_no_worse_where_won"]
            lines.append(
                f"| {split} | {s['tasks']} | {s['won_val_vs_tuned_adam']:.0%} | "
                f"{'-' if no_worse is None else f'{no_worse:.0%}'} | "
                f"{s['won_vs_untuned_adam']:.0%} | {s['median_speedup']:.2f} | "
                f"{s['weight_inflation']} |"
            )
        lines.append("")
    if not divergence:
        return "\n".join([*lines, "Divergence check: skipped."]) + "\n"
    ok = sum(d["finite"] and d["descended"] for d in divergence)
    lines.append(
        f"Divergence check: {ok} of {len(divergence)} tasks finite and below their "
        f"initial loss after {divergence[0]['steps']} steps."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("optimizer")
    parser.add_argument("--population", default="generalist")
    parser.add_argument("--max-horizon", type=int, default=2000)
    parser.add_argument("--suites", nargs="+", default=["default", "long"])
    parser.add_argument("--num-seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reference", default=None, help="a second optimizer file")
    parser.add_argument(
        "--divergence-steps",
        type=int,
        default=None,
        help="steps of the divergence check (default 5 x --max-horizon; 0: skip it)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="suite entry names")
    parser.add_argument(
        "--baselines", nargs="+", default=["adam"], help="hand-designed optimizers"
    )
    parser.add_argument("--out", default="analysis/results/generalist")
    args = parser.parse_args(argv)
    if args.divergence_steps is not None and args.divergence_steps < 0:
        parser.error(f"--divergence-steps {args.divergence_steps}: 0 (skip) or more")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = training_families(args.population)
    start = time.perf_counter()
    results = {}
    for suite in args.suites:
        results[suite] = evaluate_suite(
            args.optimizer,
            suite,
            families,
            args.max_horizon,
            args.num_seeds,
            args.seed,
            args.reference,
            args.only,
            tuple(args.baselines),
            out,
        )
        (out / f"{suite}.json").write_text(json.dumps(results[suite], indent=1))
    steps = args.divergence_steps
    steps = 5 * args.max_horizon if steps is None else steps
    divergence = []
    if steps:
        divergence = divergence_check(
            args.optimizer, args.suites, steps, args.seed, args.only
        )
        (out / "divergence.json").write_text(json.dumps(divergence, indent=1))
    plot_ratios(results, out)
    text = report(results, divergence)
    text += f"\n({time.perf_counter() - start:.0f} s in all)\n"
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
