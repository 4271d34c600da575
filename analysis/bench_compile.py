"""Compile time and peak compile memory of each learned optimizer's update, against
`optax.adam`, on models a user brings.

Models: a 10-tensor MLP (784-128-64-32-16-10), a 100-tensor MLP of 50 layers whose
100 tensors all have distinct shapes, and two small classifiers on scikit-learn's
bundled data (wine: 13-32-3 tanh; iris: 4-16-16-3), which also train for a few
hundred steps in a plain `jax.lax.scan` loop with the optimizer, so that the final
training loss can be compared with the initial one.

Optimizers: every config in `configs/lopt/`, the files given with `--export` (e.g.
the Quickstart's `runs/RUN/optimizer.eslo`), and Adam (1e-3) as the baseline.

Each measurement compiles in a fresh child process (the peak resident memory of a
process only grows), the children of one model run interleaved, optimizer and Adam
in turn, `--repeats` times, and the table gives medians and the ratio to Adam's
median. Writes `bench_compile.csv` and `bench_compile.md` to `--out`.

Example:
    python analysis/bench_compile.py --models wine,iris --repeats 1 --out /tmp/bc
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "lopt"
MODELS = {
    "10 tensors": (784, 128, 64, 32, 16, 10),
    "100 tensors": tuple(16 + i for i in range(51)),
    "wine": (13, 32, 3),
    "iris": (4, 16, 16, 3),
}
TRAIN_STEPS = 300


def mlp_params(sizes, key):
    """He-initialised dense layers `{"layer_i": {"w", "b"}}` for widths `sizes`."""
    import jax
    import jax.numpy as jnp

    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (a, b)) * jnp.sqrt(2.0 / a)
        params[f"layer_{i}"] = {"w": w, "b": jnp.zeros((b,))}
    return params


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not carried
    over from the parent that forked it)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def classifier_data(name):
    """Standardised features and integer labels of a scikit-learn dataset."""
    import numpy as np
    from sklearn import datasets

    data = {"wine": datasets.load_wine, "iris": datasets.load_iris}[name]()
    x = data.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, data.target.astype(np.int32)


def make_optimizer(spec: str):
    """`adam`, a config name of configs/lopt, or a path to an exported file."""
    import jax
    import optax

    if spec == "adam":
        return optax.adam(1e-3)
    if Path(spec).is_file():
        from es_l2o import export

        return export.load(spec, num_steps=TRAIN_STEPS)
    import importlib

    import yaml

    cfg = yaml.safe_load((CONFIG_DIR / f"{spec}.yaml").read_text())
    module, _, cls = cfg.pop("_target_").rpartition(".")
    lopt = getattr(importlib.import_module(module), cls)(**cfg)
    return lopt.transform(lopt.init(jax.random.key(0)), num_steps=TRAIN_STEPS)


def child(spec: str, model: str) -> dict:
    """One measurement: compile (and, for the classifiers, train) in this process."""
    import jax
    import jax.numpy as jnp
    import optax

    opt = make_optimizer(spec)
    params = mlp_params(MODELS[model], jax.random.key(0))
    if model in ("wine", "iris"):
        x, y = classifier_data(model)

        def loss(p):
            h = x
            for i in range(len(p)):
                h = h @ p[f"layer_{i}"]["w"] + p[f"layer_{i}"]["b"]
                h = jnp.tanh(h) if i < len(p) - 1 else h
            return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()
    else:

        def loss(p):
            return sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(p))

    def train(p):
        def step(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = opt.update(grads, s, p, value=value)
            return (optax.apply_updates(p, updates), s), value

        (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), length=TRAIN_STEPS)
        return losses

    before = peak_rss_mb()
    start = time.perf_counter()
    compiled = jax.jit(train).lower(params).compile()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    losses = compiled(params)
    return {
        "compile_s": seconds,
        "peak_mb": peak,
        "compile_mb": peak - before,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    }


def measure(spec: str, model: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, model]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no compile within {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(spec, model, runs, adam):
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"optimizer": spec, "model": model, "error": runs[0]["error"]}
    row = {"optimizer": spec, "model": model}
    for key in ("compile_s", "peak_mb", "compile_mb", "first_loss", "last_loss"):
        row[key] = statistics.median(r[key] for r in ok)
    if adam:
        row["compile_x_adam"] = row["compile_s"] / adam["compile_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--lopts", default=",".join(p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")))
    )
    parser.add_argument("--export", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=ROOT / "analysis" / "results")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    specs = [*args.lopts.split(","), *args.export]
    rows = []
    for model in args.models.split(","):
        runs = {spec: [] for spec in ["adam", *specs]}
        for _ in range(args.repeats):
            for spec in specs:  # interleaved with Adam, so load hits both alike
                runs["adam"].append(measure("adam", model, args.timeout))
                runs[spec].append(measure(spec, model, args.timeout))
        adam = summarise("adam", model, runs["adam"], None)
        rows.append(adam)
        rows.extend(summarise(s, model, runs[s], adam) for s in specs)
        print(*(json.dumps(r) for r in rows[-len(runs) :]), sep="\n", flush=True)
    write(rows, args.out, args.repeats)


def write(rows, out: Path, repeats: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = [
        "optimizer",
        "model",
        "compile_s",
        "compile_x_adam",
        "peak_mb",
        "compile_mb",
        "first_loss",
        "last_loss",
        "error",
    ]
    with open(out / "bench_compile.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Compile of one jitted {TRAIN_STEPS}-step `lax.scan` training loop, medians "
        f"of {repeats} fresh processes ({platform.processor() or platform.machine()},"
        f" {platform.python_version()}).",
        "",
        "| model | optimizer | compile (s) | x Adam | process peak (MB) | "
        "compile growth (MB) | loss first -> last |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['optimizer']} | {r['error']} |||||")
            continue
        ratio = f"{r['compile_x_adam']:.2f}" if "compile_x_adam" in r else "1"
        lines.append(
            f"| {r['model']} | {Path(r['optimizer']).name} | {r['compile_s']:.2f} | "
            f"{ratio} | {r['peak_mb']:.0f} | {r['compile_mb']:.0f} | "
            f"{r['first_loss']:.3g} -> {r['last_loss']:.3g} |"
        )
    (out / "bench_compile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
