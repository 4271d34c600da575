"""MLP classifiers on scikit-learn's bundled 8x8 digits (1,797 images, no download).

The images are split once, with a fixed seed, into train / validation / test
(1,077 / 360 / 360). The arrays live on the device; every minibatch is drawn inside
jit from the step's key, so no Python data loop runs during training.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from es_l2o.tasks import Task, TaskFamily

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}
NUM_CLASSES = 10


class Split(NamedTuple):
    x: jax.Array
    y: jax.Array


class DigitsData(NamedTuple):
    train: Split
    val: Split
    test: Split


@functools.cache
def digits_splits(num_val: int = 360, num_test: int = 360, seed: int = 0) -> DigitsData:
    """The fixed train / validation / test split of the bundled digits, on device.

    Pixels are scaled to [0, 1] and centred with the training mean.

    Example:
        >>> data = digits_splits()
        >>> data.train.x.shape, data.val.x.shape, data.test.x.shape
        ((1077, 64), (360, 64), (360, 64))
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, np.float32) / 16.0
    y = np.asarray(bunch.target, np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    num_train = len(x) - num_val - num_test
    if num_train <= 0:
        raise ValueError(
            f"num_val + num_test = {num_val + num_test} leaves no training images "
            f"out of {len(x)}"
        )
    x = x - x[:num_train].mean(axis=0)
    bounds = [
        (0, num_train),
        (num_train, num_train + num_val),
        (len(x) - num_test, len(x)),
    ]
    splits = [Split(jnp.asarray(x[a:b]), jnp.asarray(y[a:b])) for a, b in bounds]
    return DigitsData(*splits)


class DigitsConfig(NamedTuple):
    """What varies between digits tasks: the initialisation scale (log-uniform)."""

    init_scale: jax.Array


def _cross_entropy(logits, labels):
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


class DigitsMLPTask(Task):
    """One MLP classifier on digits; see `DigitsMLPFamily`."""

    def __init__(self, family: DigitsMLPFamily, cfg: DigitsConfig):
        self.family = family
        self.cfg = cfg

    @property
    def has_validation(self):
        return True

    def init(self, key):
        sizes = (64, *self.family.hidden_sizes, NUM_CLASSES)
        params = {}
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            key, sub = jax.random.split(key)
            std = self.cfg.init_scale / jnp.sqrt(fan_in)
            params[f"layer_{i}"] = {
                "w": std * jax.random.normal(sub, (fan_in, fan_out)),
                "b": jnp.zeros((fan_out,)),
            }
        return params

    def apply(self, params, x):
        """Logits of the MLP on inputs `x` of shape (batch, 64)."""
        act = ACTIVATIONS[self.family.activation]
        num_layers = len(params)
        for i in range(num_layers):
            layer = params[f"layer_{i}"]
            x = x @ layer["w"] + layer["b"]
            if i < num_layers - 1:
                x = act(x)
        return x

    def loss(self, params, key):
        train = self.family.data.train
        idx = jax.random.randint(key, (self.family.batch_size,), 0, train.x.shape[0])
        return _cross_entropy(self.apply(params, train.x[idx]), train.y[idx])

    def split_loss(self, params, split: Split) -> jax.Array:
        """Mean cross-entropy over a whole split."""
        return _cross_entropy(self.apply(params, split.x), split.y)

    def eval_loss(self, params, key):
        del key
        return self.split_loss(params, self.family.data.val)

    def metrics(self, params, key):
        del key
        out = {}
        for name, split in self.family.data._asdict().items():
            logits = self.apply(params, split.x)
            out[f"{name}_loss"] = _cross_entropy(logits, split.y)
            out[f"{name}_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == split.y)
        return out


class DigitsMLPFamily(TaskFamily):
    """MLP classifiers of one architecture on the bundled digits.

    Tasks differ in their initialisation (key and a log-uniform scale in
    `init_scale_range`) and in the order of their minibatches (the step keys).

    Example:
        >>> family = DigitsMLPFamily(hidden_sizes=(32,), batch_size=64)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> params = task.init(jax.random.key(1))
        >>> bool(task.loss(params, jax.random.key(2)) > 0)
        True
    """

    name = "digits_mlp"
    has_validation = True

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32,),
        activation: str = "relu",
        batch_size: int = 128,
        init_scale_range: Sequence[float] = (0.5, 2.0),
    ):
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(
                f"hidden_sizes must be positive integers, got {hidden_sizes}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        if batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive integer, got {batch_size!r}"
            )
        low, high = (float(v) for v in init_scale_range)
        if not 0 < low <= high:
            raise ValueError(
                f"init_scale_range must satisfy 0 < low <= high, got {(low, high)}"
            )
        self.hidden_sizes = hidden_sizes
        self.activation = activation
        self.batch_size = int(batch_size)
        self.init_scale_range = (low, high)
        self.data = digits_splits()

    def sample(self, key):
        low, high = self.init_scale_range
        log_scale = jax.random.uniform(
            key, (), minval=jnp.log(low), maxval=jnp.log(high)
        )
        return DigitsConfig(init_scale=jnp.exp(log_scale))

    def task(self, cfg):
        return DigitsMLPTask(self, cfg)
