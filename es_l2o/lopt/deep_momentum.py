"""Deep momentum gradient descent (Behrouz et al. 2025, "Nested Learning", NeurIPS).

Momentum is an associative memory that compresses past gradients by gradient descent
on its own inner objective. Here every parameter coordinate has its own memory, a
small MLP `M_phi(k)` from key features `k` of the current gradient to a value; at
every step the memory takes one gradient step on its inner objective

    dot:   l(phi) = -M_phi(k) * u            (Hebbian; recovers momentum)
    delta: l(phi) = 0.5 * (M_phi(k) - u)^2   (L2 regression, the delta rule)

where `u` is the gradient: `phi <- alpha * phi - eta * grad l(phi)`, and the update
is `-lr * M_phi(k)` with the new memory. The initial memory (shared by all
coordinates), the decays `alpha` and inner step sizes `eta` (one per memory layer)
and `lr` are meta-learned.

With a linear keyless memory (`hidden_sizes=()`, `key_features="none"`, so
`M_phi = b`) and the dot objective, `b <- alpha b + eta g` and the update is
`-lr b`: SGD with heavy-ball momentum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_l2o.lopt import features as F
from es_l2o.lopt.base import (
    LearnedOptimizer,
    check_num_steps,
    checked_transformation,
)
from es_l2o.lowrank import materialize

OBJECTIVES = ("dot", "delta")
#: key features -> number of inputs of the memory
KEY_FEATURES = {"none": 0, "gradient": 2}


class DeepMomentumState(NamedTuple):
    """Optimizer state: a step counter and each coordinate's memory weights.

    memory: one dict per part of the parameters' `features.TensorLayout` (the small
    tensors as one flat vector, then each large tensor), of arrays
    `(*part_shape, *weight_shape)`: one memory MLP per coordinate.
    """

    count: jax.Array
    memory: dict


def zip_parts(by_name: dict[str, list]) -> list[dict]:
    """`{name: [part, ...]}` as `[{name: part}, ...]`.

    Example:
        >>> zip_parts({"w": [1, 2], "b": [3, 4]})
        [{'w': 1, 'b': 3}, {'w': 2, 'b': 4}]
    """
    names = list(by_name)
    return [
        dict(zip(names, parts, strict=True))
        for parts in zip(*by_name.values(), strict=True)
    ]


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


class DeepMomentumLOpt(LearnedOptimizer):
    """Per-coordinate MLP momentum memories trained online (deep momentum GD).

    Args:
        hidden_sizes: hidden widths of the memory MLP; `()` is a linear memory.
        objective: the memory's inner objective, "dot" or "delta".
        key_features: what the memory reads: "gradient" (the log / sign gradient
            preprocessing of Andrychowicz et al.) or "none" (a keyless memory).
        init_learning_rate: initial outer step size `lr`.
        init_decay: initial memory decay `alpha` (every layer).
        init_inner_lr: initial inner step size `eta` (every layer).
        init_scale: scale of the random initial memory weights (biases start at 0).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lopt = DeepMomentumLOpt(hidden_sizes=(), key_features="none",
        ...                         init_learning_rate=0.1, init_decay=0.5)
        >>> opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
        >>> params = {"w": jnp.zeros(2)}
        >>> state = opt.init(params)
        >>> u, state = opt.update({"w": jnp.ones(2)}, state, params)
        >>> u, state = opt.update({"w": jnp.ones(2)}, state, params)
        >>> [round(float(x), 4) for x in u["w"]]  # -0.1 * (0.5 * 1 + 1)
        [-0.15, -0.15]
    """

    name = "deep_momentum"

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (4,),
        objective: str = "dot",
        key_features: str = "gradient",
        init_learning_rate: float = 0.01,
        init_decay: float = 0.9,
        init_inner_lr: float = 1.0,
        init_scale: float = 0.1,
    ):
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in self.hidden_sizes):
            raise ValueError(
                "hidden_sizes must be positive integers (or empty), got "
                f"{hidden_sizes!r}"
            )
        if objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {OBJECTIVES}, got {objective!r}"
            )
        if key_features not in KEY_FEATURES:
            raise ValueError(
                f"key_features must be one of {sorted(KEY_FEATURES)}, "
                f"got {key_features!r}"
            )
        if init_learning_rate <= 0 or init_inner_lr <= 0:
            raise ValueError(
                "init_learning_rate and init_inner_lr must be > 0, got "
                f"{init_learning_rate!r} and {init_inner_lr!r}"
            )
        if not 0.0 < init_decay < 1.0:
            raise ValueError(f"init_decay must lie in (0, 1), got {init_decay!r}")
        self.objective = objective
        self.key_features = key_features
        self.init_learning_rate = float(init_learning_rate)
        self.init_decay = float(init_decay)
        self.init_inner_lr = float(init_inner_lr)
        self.init_scale = float(init_scale)

    def config(self):
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "objective": self.objective,
            "key_features": self.key_features,
            "init_learning_rate": self.init_learning_rate,
            "init_decay": self.init_decay,
            "init_inner_lr": self.init_inner_lr,
            "init_scale": self.init_scale,
        }

    @property
    def _sizes(self) -> tuple[int, ...]:
        return (KEY_FEATURES[self.key_features], *self.hidden_sizes, 1)

    @property
    def num_layers(self) -> int:
        return len(self._sizes) - 1

    def init(self, key):
        # one compiled program instead of dozens of eagerly dispatched small ops
        return jax.jit(self._init)(key)

    def _init(self, key):
        sizes = self._sizes
        keys = jax.random.split(key, self.num_layers)
        memory = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            w = (
                jax.random.normal(keys[i], (a, b))
                * self.init_scale
                / np.sqrt(max(a, 1))
            )
            memory[f"w{i}"], memory[f"b{i}"] = w, jnp.zeros((b,))
        layers = self.num_layers
        return {
            "memory_init": memory,
            "log_lr": jnp.asarray(np.log(self.init_learning_rate), jnp.float32),
            "logit_decay": jnp.full((layers,), _logit(self.init_decay), jnp.float32),
            "log_inner_lr": jnp.full(
                (layers,), np.log(self.init_inner_lr), jnp.float32
            ),
        }

    def memory_apply(self, memory, key):
        """The memory of one coordinate at key features `key` (k,) -> scalar."""
        x = key
        for i in range(self.num_layers):
            x = x @ memory[f"w{i}"] + memory[f"b{i}"]
            if i < self.num_layers - 1:
                x = jnp.tanh(x)
        return x[0]

    def inner_loss(self, memory, key, target):
        """The memory's own objective on one coordinate."""
        out = self.memory_apply(memory, key)
        if self.objective == "dot":
            return -out * target
        return 0.5 * (out - target) ** 2

    def _keys(self, grad):
        if self.key_features == "none":
            return jnp.zeros((*grad.shape, 0), jnp.float32)
        return F.lstm_preprocess(grad)

    def _coordinates(self, grad, memory, decay, inner_lr, lr, flag):
        """One part's update and new memories: grad `(*shape)`, memory arrays
        `(*shape, *weight_shape)`."""
        grad = F.clip_gradient(grad)
        keys = self._keys(grad)
        inner = F.vmap_leading(jax.grad(self.inner_loss), grad.ndim)
        inner_grads = inner(memory, keys, grad)
        memory = {
            name: decay[int(name[1:])] * value
            - inner_lr[int(name[1:])] * inner_grads[name]
            for name, value in memory.items()
        }
        apply = F.vmap_leading(self.memory_apply, grad.ndim)
        # one pass over the parameters, not one compiled copy per tensor slice
        step = F.compute_once(
            lambda memory, keys, lr: -lr * apply(memory, keys), flag, memory, keys, lr
        )
        return step, memory

    def transform(self, theta, num_steps):
        check_num_steps(num_steps)
        # reads its (small) matrices entry by entry: low-rank perturbed ones whole
        theta = materialize(theta)
        decay = jax.nn.sigmoid(theta["logit_decay"])
        inner_lr = jnp.exp(theta["log_inner_lr"])
        lr = jnp.exp(theta["log_lr"])

        def init_fn(params):
            layout = F.TensorLayout.of(params)
            init = theta["memory_init"]
            memory = tuple(
                {k: z + init[k] for k, z in by_name.items()}
                for by_name in zip_parts(
                    {k: layout.zeros(params, v.shape) for k, v in init.items()}
                )
            )
            return DeepMomentumState(jnp.zeros((), jnp.int32), memory)

        def update_fn(updates, state, params=None, *, value=None, **extra):
            del params, value, extra  # reads neither parameters nor the loss
            layout = F.TensorLayout.of(updates)
            count = optax.safe_increment(state.count)
            if layout.total_size == 0:
                return updates, state._replace(count=count)
            steps, memory = [], []
            for grad, part_memory in zip(
                layout.split(updates), state.memory, strict=True
            ):
                step, part_memory = self._coordinates(
                    grad, part_memory, decay, inner_lr, lr, state.count >= 0
                )
                steps.append(step)
                memory.append(part_memory)
            dtypes = [g.dtype for g in jax.tree_util.tree_leaves(updates)]
            new_state = DeepMomentumState(count, tuple(memory))
            return layout.merge(steps, dtypes), new_state

        return checked_transformation(init_fn, update_fn)
