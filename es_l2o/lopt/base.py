"""The learned-optimizer contract: meta-parameters in, an optax transform out."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

Theta = Any


def check_hidden_sizes(hidden_sizes) -> tuple[int, ...]:
    """`hidden_sizes` as a tuple of ints; ValueError unless one or more are >= 1.

    Example:
        >>> check_hidden_sizes([4, 4])
        (4, 4)
    """
    sizes = tuple(int(h) for h in hidden_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(
            f"hidden_sizes must be one or more positive integers, got {hidden_sizes!r}"
        )
    return sizes


def check_num_steps(num_steps) -> None:
    """Raises ValueError unless `num_steps` is a positive integer.

    Traced values (a per-particle horizon inside jit) pass unchecked.
    """
    if isinstance(num_steps, jax.core.Tracer):
        return
    value = np.asarray(num_steps)
    is_integer = value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
    if isinstance(num_steps, bool) or not is_integer or int(value) <= 0:
        raise ValueError(
            "num_steps must be a positive integer (the training horizon the optimizer "
            f"was asked to plan for), got {num_steps!r}"
        )


#: the leaf dtypes a learned optimizer updates
FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")


class LeafTypeError(TypeError):
    """A parameter or gradient leaf that a learned optimizer cannot update."""


def check_float_tree(tree, what: str = "params") -> None:
    """Raises `LeafTypeError` naming the first leaf that is not a floating array.

    Integer, boolean and complex leaves, and leaves that are not arrays (a Python
    number, a string), are refused; abstract leaves (`jax.ShapeDtypeStruct`) and
    tracers pass. Runs on shapes and dtypes only, at trace time.

    Example:
        >>> import jax.numpy as jnp
        >>> check_float_tree({"w": jnp.ones(2)})
        >>> check_float_tree({"step": jnp.zeros((), jnp.int32)})
        Traceback (most recent call last):
        ...
        es_l2o.lopt.base.LeafTypeError: params leaf ['step'] has dtype int32; ...
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path) or "(the root)"
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise LeafTypeError(
                f"{what} leaf {name} is a {type(leaf).__name__}, not an array; "
                "learned optimizers update floating arrays (wrap it in jnp.asarray, "
                "or keep it out of the optimized tree)"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise LeafTypeError(
                f"{what} leaf {name} has dtype {np.dtype(dtype).name}; learned "
                f"optimizers update {', '.join(FLOAT_KINDS)} leaves only (keep it "
                "out of the optimized tree, e.g. with optax.masked or "
                "optax.multi_transform)"
            )


def checked_transformation(init_fn, update_fn) -> optax.GradientTransformationExtraArgs:
    """`init_fn` / `update_fn` as an optax transform that first checks its trees.

    `init` checks the parameters, `update` the gradients and, when given, the
    parameters (`check_float_tree`), so that a bad leaf is one clear error naming
    its path rather than a failure deep inside the optimizer.
    """

    def init(params):
        check_float_tree(params, "params")
        return init_fn(params)

    def update(updates, state, params=None, **extra):
        check_float_tree(updates, "gradient")
        if params is not None:
            check_float_tree(params, "params")
        return update_fn(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(init, update)


class LearnedOptimizer(abc.ABC):
    """An optimizer architecture whose weights `theta` are meta-learned.

    Subclasses set `name`, implement `init`, `transform` and `config`; `config()`
    returns the JSON-serialisable constructor arguments, so that
    `type(lopt)(**lopt.config())` rebuilds the same architecture.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from es_l2o.lopt import MLPLOpt
        >>> lopt = MLPLOpt(hidden_sizes=(4,))
        >>> opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=100)
        >>> params = {"w": jnp.ones(3)}
        >>> update = jax.jit(opt.update)
        >>> updates, state = update({"w": jnp.ones(3)}, opt.init(params), params)
        >>> updates["w"].shape, type(lopt)(**lopt.config()).config() == lopt.config()
        ((3,), True)
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def init(self, key: jax.Array) -> Theta:
        """Initial meta-parameters (a pytree of float32 arrays)."""

    @abc.abstractmethod
    def transform(
        self, theta: Theta, num_steps: int | jax.Array
    ) -> optax.GradientTransformationExtraArgs:
        """The optimizer defined by `theta` for a run of `num_steps` steps."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON values."""

    def embed_theta(self, source: LearnedOptimizer, theta: Theta) -> Theta:
        """`theta` of the optimizer `source` as a theta of this one that steps
        exactly as `source` does, where this architecture only adds to `source`'s
        (a next meta-training stage that switches on a new input or output).

        Raises:
            ValueError: this optimizer does not extend `source`.
        """
        del theta
        raise ValueError(
            f"{self!r} cannot take the theta of {source!r}: give the same settings"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
