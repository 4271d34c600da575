"""Tasks on scikit-learn's bundled 8x8 digits (1,797 images, no download).

Families: softmax regression, MLP and small CNN classifiers, and a dense
auto-encoder. All of them share one data split and one per-task variation (the
initialisation scale), so every family vmaps over its configurations.

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
from populations.common import normal

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


def _batch(split: Split, key: jax.Array, batch_size: int) -> Split:
    """A minibatch of `split` drawn with replacement from `key`."""
    idx = jax.random.randint(key, (batch_size,), 0, split.x.shape[0])
    return Split(split.x[idx], split.y[idx])


def _dense(key, fan_in, fan_out, init_scale):
    std = init_scale / jnp.sqrt(fan_in)
    return {
        "w": normal(key, (fan_in, fan_out), std),
        "b": jnp.zeros((fan_out,)),
    }


def mlp_apply(params, x, activation: str):
    """Dense layers `layer_0 ... layer_n` with `activation` between them."""
    act = ACTIVATIONS[activation]
    num_layers = len(params)
    for i in range(num_layers):
        layer = params[f"layer_{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < num_layers - 1:
            x = act(x)
    return x


class DigitsClassifierTask(Task):
    """A classifier on digits: subclasses give `init` and `apply` (logits)."""

    def __init__(self, family: TaskFamily, cfg: DigitsConfig):
        self.family = family
        self.cfg = cfg

    @property
    def has_validation(self):
        return True

    def apply(self, params, x):
        """Logits of the classifier on inputs `x` of shape (batch, 64)."""
        raise NotImplementedError

    def loss(self, params, key):
        batch = _batch(self.family.data.train, key, self.family.batch_size)
        return _cross_entropy(self.apply(params, batch.x), batch.y)

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


class DigitsMLPTask(DigitsClassifierTask):
    """One MLP classifier on digits; see `DigitsMLPFamily`."""

    def init(self, key):
        sizes = (64, *self.family.hidden_sizes, NUM_CLASSES)
        params = {}
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            key, sub = jax.random.split(key)
            params[f"layer_{i}"] = _dense(sub, fan_in, fan_out, self.cfg.init_scale)
        return params

    def apply(self, params, x):
        """Logits of the MLP on inputs `x` of shape (batch, 64)."""
        return mlp_apply(params, x, self.family.activation)


class DigitsFamily(TaskFamily):
    """Shared parts of the digits families: data, batch size, activation, sampling.

    Tasks differ in their initialisation (key and a log-uniform scale in
    `init_scale_range`) and in the order of their minibatches (the step keys).
    """

    has_validation = True

    def __init__(
        self,
        activation: str = "relu",
        batch_size: int = 128,
        init_scale_range: Sequence[float] = (0.5, 2.0),
    ):
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


def _check_sizes(sizes, what: str) -> tuple[int, ...]:
    sizes = tuple(int(h) for h in sizes)
    if any(h < 1 for h in sizes):
        raise ValueError(f"{what} must be positive integers, got {sizes}")
    return sizes


class DigitsMLPFamily(DigitsFamily):
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

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32,),
        activation: str = "relu",
        batch_size: int = 128,
        init_scale_range: Sequence[float] = (0.5, 2.0),
    ):
        self.hidden_sizes = _check_sizes(hidden_sizes, "hidden_sizes")
        super().__init__(activation, batch_size, init_scale_range)

    def task(self, cfg):
        return DigitsMLPTask(self, cfg)


class SoftmaxRegressionTask(DigitsClassifierTask):
    """Multinomial logistic regression on digits; see `SoftmaxRegressionFamily`."""

    def init(self, key):
        return _dense(key, 64, NUM_CLASSES, self.cfg.init_scale)

    def apply(self, params, x):
        return x @ params["w"] + params["b"]


class SoftmaxRegressionFamily(DigitsFamily):
    """Softmax (multinomial logistic) regression on the bundled digits: 650 weights.

    A convex task: a learned optimizer should at least match Adam here.

    Example:
        >>> family = SoftmaxRegressionFamily(batch_size=64)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> task.init(jax.random.key(1))["w"].shape
        (64, 10)
    """

    name = "digits_softmax"

    def __init__(
        self,
        batch_size: int = 128,
        init_scale_range: Sequence[float] = (0.5, 2.0),
    ):
        super().__init__("relu", batch_size, init_scale_range)

    def task(self, cfg):
        return SoftmaxRegressionTask(self, cfg)


def conv2d_same(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """2-D convolution, NHWC input, HWIO kernel, "SAME" padding, square stride.

    Computes what `jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"))` computes, as shifted slices and
    one matrix product: under `vmap` over per-task kernels this stays a batched
    matmul, 2-3x faster on CPU than the grouped convolution vmap makes of
    `conv_general_dilated`.

    Example:
        >>> x = jnp.ones((1, 8, 8, 1))
        >>> conv2d_same(x, jnp.ones((3, 3, 1, 2)), stride=2).shape
        (1, 4, 4, 2)
    """
    k_h, k_w = w.shape[:2]
    height, width = x.shape[1:3]
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + k_h - height, 0)
    pad_w = max((out_w - 1) * stride + k_w - width, 0)
    x = jnp.pad(
        x,
        (
            (0, 0),
            (pad_h // 2, pad_h - pad_h // 2),
            (pad_w // 2, pad_w - pad_w // 2),
            (0, 0),
        ),
    )
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    patches = jnp.concatenate(
        [
            x[:, i : i + span_h : stride, j : j + span_w : stride, :]
            for i in range(k_h)
            for j in range(k_w)
        ],
        axis=-1,
    )
    return patches @ w.reshape(-1, w.shape[-1])


class DigitsCNNTask(DigitsClassifierTask):
    """A small convolutional classifier on 8x8 digits; see `DigitsCNNFamily`."""

    def init(self, key):
        family = self.family
        k = family.kernel_size
        keys = jax.random.split(key, len(family.channels) + 1)
        params = {}
        fan_in_channels = 1
        for i, channels in enumerate(family.channels):
            std = self.cfg.init_scale / jnp.sqrt(k * k * fan_in_channels)
            shape = (k, k, fan_in_channels, channels)
            params[f"conv_{i}"] = {
                "w": normal(keys[i], shape, std),
                "b": jnp.zeros((channels,)),
            }
            fan_in_channels = channels
        side = 8
        for _ in family.channels[1:]:
            side = -(-side // 2)
        features = side * side * fan_in_channels
        params["head"] = _dense(keys[-1], features, NUM_CLASSES, 1.0)
        return params

    def apply(self, params, x):
        act = ACTIVATIONS[self.family.activation]
        x = x.reshape(x.shape[0], 8, 8, 1)
        for i in range(len(self.family.channels)):
            layer = params[f"conv_{i}"]
            stride = 1 if i == 0 else 2  # 8x8 -> 8x8 -> 4x4 -> 2x2 -> ...
            x = conv2d_same(x, layer["w"], stride)
            x = act(x + layer["b"])
        x = x.reshape(x.shape[0], -1)
        return x @ params["head"]["w"] + params["head"]["b"]


class DigitsCNNFamily(DigitsFamily):
    """Small CNNs on 8x8 digits: 3x3 convolutions and a linear head.

    The first convolution keeps the 8x8 resolution; every further one has stride 2
    (8x8 -> 4x4 -> 2x2 -> 1x1); the head reads the flattened last feature map.

    Args:
        channels: output channels of each convolution (its length is the depth).
        kernel_size: square kernel size of every convolution.
        activation, batch_size, init_scale_range: as in `DigitsMLPFamily` (the
            initial scale multiplies the convolutions; the head uses 1/sqrt(fan_in)).

    Example:
        >>> family = DigitsCNNFamily(channels=(4, 8), batch_size=16)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> params = task.init(jax.random.key(1))
        >>> task.apply(params, family.data.val.x[:3]).shape
        (3, 10)
    """

    name = "digits_cnn"

    def __init__(
        self,
        channels: Sequence[int] = (8, 16),
        kernel_size: int = 3,
        activation: str = "relu",
        batch_size: int = 128,
        init_scale_range: Sequence[float] = (0.5, 2.0),
    ):
        self.channels = _check_sizes(channels, "channels")
        if not self.channels:
            raise ValueError("channels must name at least one convolution, got ()")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size!r}")
        self.kernel_size = int(kernel_size)
        super().__init__(activation, batch_size, init_scale_range)

    def task(self, cfg):
        return DigitsCNNTask(self, cfg)


class DigitsAutoencoderTask(Task):
    """A dense auto-encoder on digits; see `DigitsAutoencoderFamily`."""

    def __init__(self, family: DigitsAutoencoderFamily, cfg: DigitsConfig):
        self.family = family
        self.cfg = cfg

    @property
    def has_validation(self):
        return True

    def init(self, key):
        sizes = self.family.layer_sizes
        keys = jax.random.split(key, len(sizes) - 1)
        return {
            f"layer_{i}": _dense(keys[i], fan_in, fan_out, self.cfg.init_scale)
            for i, (fan_in, fan_out) in enumerate(
                zip(sizes[:-1], sizes[1:], strict=True)
            )
        }

    def apply(self, params, x):
        """Reconstructions of inputs `x` of shape (batch, 64)."""
        return mlp_apply(params, x, self.family.activation)

    def split_loss(self, params, split: Split) -> jax.Array:
        """Mean squared reconstruction error per pixel over `split`."""
        return jnp.mean((self.apply(params, split.x) - split.x) ** 2)

    def loss(self, params, key):
        batch = _batch(self.family.data.train, key, self.family.batch_size)
        return self.split_loss(params, batch)

    def eval_loss(self, params, key):
        del key
        return self.split_loss(params, self.family.data.val)

    def metrics(self, params, key):
        del key
        return {
            f"{name}_loss": self.split_loss(params, split)
            for name, split in self.family.data._asdict().items()
        }


class DigitsAutoencoderFamily(DigitsFamily):
    """Dense auto-encoders 64 -> hidden -> bottleneck -> reversed hidden -> 64.

    The loss is the mean squared reconstruction error per pixel (the pixels are
    in [0, 1], centred); the output layer is linear, every other one activated.

    Example:
        >>> family = DigitsAutoencoderFamily(hidden_sizes=(16,), bottleneck=4)
        >>> family.layer_sizes
        (64, 16, 4, 16, 64)
    """

    name = "digits_autoencoder"

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32,),
        bottleneck: int = 8,
        activation: str = "relu",
        batch_size: int = 128,
        init_scale_range: Sequence[float] = (0.5, 2.0),
    ):
        hidden = _check_sizes(hidden_sizes, "hidden_sizes")
        (bottleneck,) = _check_sizes((bottleneck,), "bottleneck")
        self.hidden_sizes = hidden
        self.bottleneck = bottleneck
        self.layer_sizes = (64, *hidden, bottleneck, *reversed(hidden), 64)
        super().__init__(activation, batch_size, init_scale_range)

    def task(self, cfg):
        return DigitsAutoencoderTask(self, cfg)
