"""Task augmentations: wrapper families that change what an optimizer sees.

- `ReparamFamily`: each parameter tensor is seen through a sampled scale, so the
  optimizer trains `p` while the task evaluates `p * scale` (learned_optimization
  calls this reparameterisation; Metz et al. 2022 use it to widen VeLO's
  distribution). The initial function is unchanged: `init` returns `p0 / scale`.
- `GradientNoiseFamily`: Gaussian noise of a sampled standard deviation is added to
  the gradient of the loss (not to its value), through a `jax.custom_vjp`.
- `rebatch`: the same family with another (static) batch size. A batch size is a
  shape, hence a different structure: mix batch sizes with
  `populations.mix.FamilyMixture`, not inside one vmap.

Wrappers compose (`ReparamFamily(GradientNoiseFamily(family))`); wrap the result in
`populations.splits.SplitFamily` last, so that the sampled scales and noise levels
are part of the task's identity.

Example:
    >>> from populations.quadratic import QuadraticFamily
    >>> family = GradientNoiseFamily(ReparamFamily(QuadraticFamily()), (0.1, 0.1))
    >>> family.name
    'quadratic+reparam+noise'
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import jax

from es_l2o.tasks import Task, TaskFamily
from populations.common import check_positive_int, check_range, log_uniform, normal

#: fold_in tag that separates the gradient-noise key from the minibatch key
_NOISE_TAG = 0x6E6F6973


class WrappedTask(Task):
    """A task that delegates to `inner` through `to_inner(params)`."""

    def __init__(self, inner: Task):
        self.inner = inner

    @property
    def has_validation(self):
        return self.inner.has_validation

    def to_inner(self, params):
        """The parameters the inner task sees."""
        return params

    def init(self, key):
        return self.inner.init(key)

    def loss(self, params, key):
        return self.inner.loss(self.to_inner(params), key)

    def eval_loss(self, params, key):
        return self.inner.eval_loss(self.to_inner(params), key)

    def metrics(self, params, key):
        return self.inner.metrics(self.to_inner(params), key)


class ReparamConfig(NamedTuple):
    """The wrapped family's configuration and one scale per parameter tensor."""

    cfg: Any
    scales: Any  # the params pytree structure with a scalar per leaf


class ReparamTask(WrappedTask):
    """The inner task evaluated at `params * scales` (per tensor)."""

    def __init__(self, inner: Task, scales):
        super().__init__(inner)
        self.scales = scales

    def to_inner(self, params):
        return jax.tree.map(lambda p, s: p * s, params, self.scales)

    def init(self, key):
        return jax.tree.map(lambda p, s: p / s, self.inner.init(key), self.scales)


class ReparamFamily(TaskFamily):
    """Tasks of `family` whose parameter tensors are rescaled by sampled factors.

    Args:
        family: the wrapped family.
        scale_range: each tensor's scale is log-uniform in this range.

    Example:
        >>> import jax.numpy as jnp
        >>> from populations.quadratic import QuadraticFamily
        >>> family = ReparamFamily(QuadraticFamily(), scale_range=(0.01, 100.0))
        >>> cfg = family.sample(jax.random.key(0))
        >>> task = family.task(cfg)
        >>> x = task.init(jax.random.key(1))["x"]
        >>> bool(jnp.allclose(x * cfg.scales["x"], family.family.task(cfg.cfg).init(
        ...     jax.random.key(1))["x"]))
        True
    """

    def __init__(
        self, family: TaskFamily, scale_range: tuple[float, float] = (0.1, 10.0)
    ):
        self.family = family
        self.scale_range = check_range(scale_range, "scale_range")
        self.name = f"{family.name}+reparam"
        self.has_validation = family.has_validation
        key = jax.random.key(0)
        self._params_shape = jax.eval_shape(
            lambda k: family.task(family.sample(k)).init(k), key
        )

    def sample(self, key):
        key_inner, key_scales = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(self._params_shape)
        scales = log_uniform(key_scales, self.scale_range, (len(leaves),))
        return ReparamConfig(
            cfg=self.family.sample(key_inner),
            scales=jax.tree.unflatten(treedef, list(scales)),
        )

    def task(self, cfg):
        return ReparamTask(self.family.task(cfg.cfg), cfg.scales)


@jax.custom_vjp
def noisy_gradient(params, key: jax.Array, std: jax.Array):
    """The identity on `params`; its backward pass adds N(0, std^2) to the cotangent.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jax.grad(lambda p: noisy_gradient(p, jax.random.key(0), 0.0).sum())
        >>> g(jnp.ones(3)).tolist()
        [1.0, 1.0, 1.0]
    """
    del key, std
    return params


def _noisy_forward(params, key, std):
    return params, (key, std)


def _noisy_backward(residuals, cotangent):
    key, std = residuals
    leaves, treedef = jax.tree.flatten(cotangent)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        g + normal(k, g.shape, std).astype(g.dtype)
        for g, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy), None, None


noisy_gradient.defvjp(_noisy_forward, _noisy_backward)


class NoiseConfig(NamedTuple):
    """The wrapped family's configuration and the gradient noise level."""

    cfg: Any
    noise_std: jax.Array


class GradientNoiseTask(WrappedTask):
    """Loss values as the inner task's; gradients with added N(0, noise_std^2) noise.

    The minibatch is the inner task's for the same key, so the noise is exactly
    the difference between this task's gradient and the inner task's.
    """

    def __init__(self, inner: Task, noise_std: jax.Array):
        super().__init__(inner)
        self.noise_std = noise_std

    def loss(self, params, key):
        noise_key = jax.random.fold_in(key, _NOISE_TAG)
        return self.inner.loss(noisy_gradient(params, noise_key, self.noise_std), key)


class GradientNoiseFamily(TaskFamily):
    """Tasks of `family` with Gaussian noise added to every gradient.

    Args:
        family: the wrapped family.
        noise_std_range: the noise's standard deviation, log-uniform per task
            (absolute units of the gradient; `(0, 0)` turns the noise off).

    Example:
        >>> from populations.quadratic import QuadraticFamily
        >>> family = GradientNoiseFamily(QuadraticFamily(), noise_std_range=(1.0, 1.0))
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> float(task.loss(task.init(jax.random.key(1)), jax.random.key(2))) > 0
        True
    """

    def __init__(
        self, family: TaskFamily, noise_std_range: tuple[float, float] = (0.01, 1.0)
    ):
        low, high = check_range(noise_std_range, "noise_std_range", allow_zero=True)
        if low == 0 < high:
            raise ValueError(
                "noise_std_range is log-uniform: use (0, 0) for no noise or a "
                f"positive low end, got {(low, high)}"
            )
        self.family = family
        self.noise_std_range = (low, high)
        self.name = f"{family.name}+noise"
        self.has_validation = family.has_validation

    def sample(self, key):
        key_inner, key_noise = jax.random.split(key)
        return NoiseConfig(
            cfg=self.family.sample(key_inner),
            noise_std=log_uniform(key_noise, self.noise_std_range),
        )

    def task(self, cfg):
        return GradientNoiseTask(self.family.task(cfg.cfg), cfg.noise_std)


def rebatch(family: TaskFamily, batch_size: int) -> TaskFamily:
    """A copy of `family` (through any wrappers) that draws `batch_size` examples.

    Example:
        >>> from populations.digits import DigitsMLPFamily
        >>> small = rebatch(ReparamFamily(DigitsMLPFamily(batch_size=128)), 16)
        >>> small.family.batch_size, small.name
        (16, 'digits_mlp+reparam')
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    clone = copy.copy(family)
    if hasattr(family, "batch_size"):
        clone.batch_size = batch_size
    elif hasattr(family, "family"):
        clone.family = rebatch(family.family, batch_size)
    else:
        raise ValueError(
            f"family {family.name!r} ({type(family).__name__}) has no batch size"
        )
    return clone
