"""Child process of `tests/test_any_tree.py`: compiles one learned optimizer's update
for many parameter trees in one XLA program, under the memory and time limits that
the parent sets, and prints a JSON line with the compile time and peak memory.

Reads a JSON spec on stdin: `{"arch", "kwargs", "trees": {label: tree},
"wrapped": [label, ...]}`, where a tree is nested lists / dicts whose leaves are
`{"shape": [...]}`. Every tree gets its own plain `update`; the `wrapped` trees also
train two steps inside `jax.lax.scan` through
`optax.MultiSteps(optax.chain(clip_by_global_norm, the optimizer,
add_decayed_weights))`, with the loss passed as `value`.
"""

import json
import re
import sys
import time
from pathlib import Path


def build(node, jnp, jax):
    if isinstance(node, dict) and set(node) == {"shape"}:
        return jax.ShapeDtypeStruct(tuple(node["shape"]), jnp.float32)
    if isinstance(node, dict):
        return {k: build(v, jnp, jax) for k, v in node.items()}
    return [build(v, jnp, jax) for v in node]


def wrapped_training(tx, optax, jax, jnp):
    """Two scanned training steps of a quadratic loss through the usual wrappers."""
    opt = optax.MultiSteps(
        optax.chain(
            optax.clip_by_global_norm(1.0), tx, optax.add_decayed_weights(1e-4)
        ),
        every_k_schedule=2,
    )

    def loss(params):
        return sum(jnp.sum(jnp.square(p - 0.5)) for p in jax.tree.leaves(params))

    def train(params):
        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grads, state, params, value=value)
            return (optax.apply_updates(params, updates), state), value

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), length=2)
        return params, losses

    return train


def main() -> None:
    spec = json.loads(sys.stdin.read())
    import jax
    import jax.numpy as jnp
    import optax

    from es_l2o.lopt import LOPTS

    lopt = LOPTS[spec["arch"]](**spec["kwargs"])
    tx = lopt.transform(lopt.init(jax.random.key(0)), num_steps=100)
    trees = {label: build(tree, jnp, jax) for label, tree in spec["trees"].items()}
    states = {label: jax.eval_shape(tx.init, tree) for label, tree in trees.items()}
    train = wrapped_training(tx, optax, jax, jnp)

    def program(trees, states, wrapped):
        plain = {
            label: tx.update(tree, states[label], tree, value=jnp.float32(1.0))
            for label, tree in trees.items()
        }
        return plain, {label: train(tree) for label, tree in wrapped.items()}

    wrapped = {label: trees[label] for label in spec.get("wrapped", [])}
    start = time.perf_counter()
    lowered = jax.jit(program).lower(trees, states, wrapped)
    lowered.compile()
    status = Path("/proc/self/status").read_text()  # VmHWM: this process's own peak
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    print(json.dumps({"compile_s": time.perf_counter() - start, "peak_mb": peak}))


if __name__ == "__main__":
    main()
