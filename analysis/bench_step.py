"""Cost of each learned optimizer against `optax.adam`, measured in one process.

For MLP classifiers of about 10k, 100k and 1M parameters (batch 128), a 6-block
transformer of 4.8M parameters whose blocks repeat its tensor shapes, and every
optimizer config in `configs/lopt/` (or exported files given with `--export`) it
measures the median time of one update, of one whole train step (forward, backward,
update, apply), the optimizer-state bytes per parameter, and the same for Adam,
interleaving optimizer and Adam runs so that load on the machine hits both alike.
It also times the compilation of one update on pytrees of about 100k parameters: 10
and 100 tensors of one shape, and 100 tensors of 100 distinct shapes.

Writes `bench_step.csv` and `bench_step.md` (plus `bench_compile.csv`) to the output
folder (default `analysis/results/`).

Example:
    python analysis/bench_step.py --sizes 10k,100k --repeats 10 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import importlib
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "lopt"
DEFAULT_LOPTS = ("mlp", "hierarchical", "hierarchical_velo", "lstm", "deep_momentum")
#: hidden widths of the benchmark MLPs (784 inputs, 10 classes)
SIZES = {"10k": (12,), "100k": (128,), "1M": (1024, 256), "100M": (8192, 8192, 4096)}
BATCH = 128
#: a decoder-only transformer with repeated blocks (4.8M parameters); its batch is
#: BATCH tokens (4 sequences of 32), so that its train step stays cheap on a CPU
TRANSFORMER = {"layers": 6, "width": 256, "vocab": 96, "heads": 4, "seq": 32}
MODELS = (*SIZES, "transformer")


def build_lopt(name: str):
    """The learned optimizer of `configs/lopt/<name>.yaml` (no Hydra needed)."""
    cfg = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    module, _, cls = cfg.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), cls)(**cfg)


def mlp_params(key, hidden):
    sizes = (784, *hidden, 10)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, sub = jax.random.split(key)
        params[f"layer_{i}"] = {
            "w": jax.random.normal(sub, (a, b)) / np.sqrt(a),
            "b": jnp.zeros((b,)),
        }
    return params


def mlp_loss(params, batch):
    x, y = batch
    for i in range(len(params)):
        layer = params[f"layer_{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def transformer_params(key, layers, width, vocab, seq):
    """Embeddings, `layers` pre-norm blocks (attention, 4x MLP) and an output head."""
    keys = iter(jax.random.split(key, 4 * layers + 3))
    dense = lambda a, b: {
        "w": jax.random.normal(next(keys), (a, b)) / np.sqrt(a),
        "b": jnp.zeros((b,)),
    }
    norm = lambda: {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}
    params = {
        "embed": 0.02 * jax.random.normal(next(keys), (vocab, width)),
        "position": 0.02 * jax.random.normal(next(keys), (seq, width)),
        "head": jax.random.normal(next(keys), (width, vocab)) / np.sqrt(width),
    }
    for i in range(layers):
        params[f"block_{i}"] = {
            "norm_1": norm(),
            "qkv": dense(width, 3 * width),
            "out": dense(width, width),
            "norm_2": norm(),
            "up": dense(width, 4 * width),
            "down": dense(4 * width, width),
        }
    return params


def transformer_loss(params, batch, heads=TRANSFORMER["heads"]):
    """Next-token cross-entropy of a causal transformer on `(tokens, targets)`."""
    tokens, targets = batch
    seq = tokens.shape[1]

    def layer_norm(x, p):
        x = x - x.mean(-1, keepdims=True)
        return (
            x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * p["scale"]
            + p["bias"]
        )

    x = params["embed"][tokens] + params["position"][:seq]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    for i in range(sum(k.startswith("block_") for k in params)):
        block = params[f"block_{i}"]
        h = layer_norm(x, block["norm_1"])
        qkv = h @ block["qkv"]["w"] + block["qkv"]["b"]
        q, k, v = jnp.split(qkv.reshape(*qkv.shape[:2], 3 * heads, -1), 3, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        attention = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(x.shape)
        x = x + mixed @ block["out"]["w"] + block["out"]["b"]
        h = layer_norm(x, block["norm_2"])
        h = jax.nn.gelu(h @ block["up"]["w"] + block["up"]["b"])
        x = x + h @ block["down"]["w"] + block["down"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(
        x @ params["head"], targets
    ).mean()


def build_model(size: str):
    """(params, loss_fn, batch) of a benchmark model: an MLP of `SIZES` or the
    `TRANSFORMER`."""
    kx, ky = jax.random.split(jax.random.key(1))
    if size == "transformer":
        cfg = {k: v for k, v in TRANSFORMER.items() if k != "heads"}
        shape = (BATCH // cfg["seq"], cfg["seq"] + 1)
        tokens = jax.random.randint(kx, shape, 0, cfg["vocab"])
        batch = (tokens[:, :-1], tokens[:, 1:])
        return transformer_params(jax.random.key(0), **cfg), transformer_loss, batch
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose from {list(MODELS)}")
    batch = (
        jax.random.normal(kx, (BATCH, 784)),
        jax.random.randint(ky, (BATCH,), 0, 10),
    )
    return mlp_params(jax.random.key(0), SIZES[size]), mlp_loss, batch


def make_fns(opt, loss_fn):
    @jax.jit
    def update(grads, state, params, loss):
        return opt.update(grads, state, params, value=loss)

    @jax.jit
    def train_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    return update, train_step


def round_robin(fns: dict, repeats: int, budget_s: float = float("inf")) -> dict:
    """Seconds of each call of `fns` (`{name: (fn, args)}`), one call of each per
    round after one warm-up call each, so that load on the machine hits all alike.

    Stops after `repeats` rounds, or after `budget_s` seconds once 3 rounds are done.
    """
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(repeats):
        for name, (fn, args) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def state_bytes(state) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def bench_size(size, opts, repeats, budget_s):
    params, loss_fn, batch = build_model(size)
    n = sum(x.size for x in jax.tree.leaves(params))
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    adam = optax.adam(1e-3)
    adam_state = adam.init(params)
    adam_update, adam_step = make_fns(adam, loss_fn)
    rows = []
    for name, opt in opts.items():
        state = opt.init(params)
        update, step = make_fns(opt, loss_fn)
        updates = round_robin(
            {
                "opt": (update, (grads, state, params, loss)),
                "adam": (adam_update, (grads, adam_state, params, loss)),
            },
            repeats,
            budget_s,
        )
        steps = round_robin(
            {
                "opt": (step, (params, state, batch)),
                "adam": (adam_step, (params, adam_state, batch)),
            },
            repeats,
            budget_s,
        )
        t_up, t_adam_up = (float(np.median(updates[k])) for k in ("opt", "adam"))
        t_step, t_adam_step = (float(np.median(steps[k])) for k in ("opt", "adam"))
        reps = len(updates["opt"])
        rows.append(
            {
                "size": size,
                "num_params": n,
                "optimizer": name,
                "update_ms": 1e3 * t_up,
                "adam_update_ms": 1e3 * t_adam_up,
                "update_ratio": t_up / t_adam_up,
                "step_ms": 1e3 * t_step,
                "adam_step_ms": 1e3 * t_adam_step,
                "step_ratio": t_step / t_adam_step,
                "state_bytes_per_param": state_bytes(state) / n,
                "adam_state_bytes_per_param": state_bytes(adam_state) / n,
                "repeats": reps,
            }
        )
        print(
            f"{size:>5} {name:>18}: update {1e3 * t_up:9.3f} ms "
            f"({t_up / t_adam_up:6.2f}x adam), step {1e3 * t_step:9.3f} ms "
            f"({t_step / t_adam_step:5.2f}x adam), "
            f"{state_bytes(state) / n:6.1f} B/param",
            flush=True,
        )
    return rows


#: (label, number of tensors, number of distinct shapes) of the compile-time pytrees
COMPILE_TREES = (("10", 10, 1), ("100", 100, 1), ("100 distinct", 100, 100))


def compile_tree(total: int, count: int, distinct: int):
    """`count` near-square matrices, about `total` entries, `distinct` shapes."""
    side = int(round(np.sqrt(total / count)))
    return {f"t{i:03d}": jnp.ones((side, side + i % distinct)) for i in range(count)}


def compile_times(opts, total=100_000, trees=COMPILE_TREES):
    """Seconds to compile one update on each pytree of `trees` (~`total` entries)."""
    rows = []
    for name, opt in {"adam": optax.adam(1e-3), **opts}.items():
        row = {"optimizer": name}
        for label, count, distinct in trees:
            params = compile_tree(total, count, distinct)
            state = opt.init(params)
            fn = jax.jit(lambda g, s, p, opt=opt: opt.update(g, s, p, value=1.0))
            start = time.perf_counter()
            fn.lower(params, state, params).compile()
            row[f"compile_s_{label}"] = time.perf_counter() - start
        rows.append(row)
        print(
            f"compile {name:>18}: "
            + ", ".join(
                f"{label} tensors {row[f'compile_s_{label}']:.2f} s"
                for label, _, _ in trees
            ),
            flush=True,
        )
    return rows


def markdown(rows, compile_rows, machine) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "| model | params | optimizer | update ms | x Adam | train step ms | x Adam "
        "| state B/param (Adam) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        model = "MLP" if r["size"] in SIZES else r["size"]
        lines.append(
            f"| {model} | {r['num_params']:,} | {r['optimizer']} "
            f"| {r['update_ms']:.3f} "
            f"| {r['update_ratio']:.2f} | {r['step_ms']:.3f} | {r['step_ratio']:.2f} "
            f"| {r['state_bytes_per_param']:.1f} "
            f"({r['adam_state_bytes_per_param']:.1f}) |"
        )
    if compile_rows:
        counts = [k for k in compile_rows[0] if k.startswith("compile_s_")]
        lines += [
            "",
            "| optimizer | "
            + " | ".join(
                f"compile, {k.removeprefix('compile_s_')} tensors (s)" for k in counts
            )
            + " |",
            "| --- | " + " | ".join("---:" for _ in counts) + " |",
        ]
        for r in compile_rows:
            lines.append(
                f"| {r['optimizer']} | "
                + " | ".join(f"{r[k]:.2f}" for k in counts)
                + " |"
            )
    return "\n".join(lines) + "\n"


def write_csv(path, rows):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def grid_main(bench, markdown, stem, doc, sizes, lopts, argv=None):
    """Command line of the per-(model, optimizer) benchmarks: runs `bench(size, name,
    repeats, budget_s, num_steps)` for each pair and writes `<stem>.csv` and
    `<stem>.md` (`markdown(rows)`) to `--out`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "analysis" / "results"))
    parser.add_argument(
        "--sizes", default=sizes, help=f"comma list from {list(MODELS)}"
    )
    parser.add_argument("--lopts", default=lopts, help="comma list of configs/lopt")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--budget",
        type=float,
        default=5.0,
        help="seconds per timed comparison, at most",
    )
    parser.add_argument("--num-steps", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = [
        bench(size, name, args.repeats, args.budget, args.num_steps)
        for size in args.sizes.split(",")
        for name in args.lopts.split(",")
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{stem}.csv", rows)
    table = markdown(rows)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "analysis" / "results"))
    parser.add_argument(
        "--sizes",
        default="10k,100k,1M,transformer",
        help=f"comma list from {list(MODELS)}",
    )
    parser.add_argument(
        "--lopts",
        default=",".join(DEFAULT_LOPTS),
        help="comma list of configs/lopt names",
    )
    parser.add_argument(
        "--export", action="append", default=[], help="exported optimizer file(s)"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--budget", type=float, default=3.0, help="seconds per measurement, at most"
    )
    parser.add_argument("--num-steps", type=int, default=1000)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    opts = {}
    for name in filter(None, args.lopts.split(",")):
        lopt = build_lopt(name)
        opts[name] = lopt.transform(lopt.init(jax.random.key(0)), args.num_steps)
    for path in args.export:
        from es_l2o import export

        opts[Path(path).stem] = export.load(path, num_steps=args.num_steps)

    device = jax.devices()[0]
    machine = (
        f"{platform.processor() or platform.machine()}, "
        f"{_cpu_model()}, jax {jax.__version__} on {device.platform} "
        f"({device.device_kind})"
    )
    print(machine, flush=True)
    rows = []
    for size in args.sizes.split(","):
        rows += bench_size(size, opts, args.repeats, args.budget)
    compile_rows = [] if args.no_compile else compile_times(opts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "bench_step.csv", rows)
    write_csv(out / "bench_compile.csv", compile_rows)
    table = markdown(rows, compile_rows, machine)
    (out / "bench_step.md").write_text(table)
    print(table)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cores = Path("/proc/cpuinfo").read_text().count("processor\t:")
                return f"{line.split(':', 1)[1].strip()} x{cores}"
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
