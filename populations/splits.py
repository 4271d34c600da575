"""Task splits: meta-training never sees an evaluation task, by construction.

Every task of a `SplitFamily` is named by a 32-bit *task id*. The two top bits of the
id are the split's index, so the splits own disjoint id ranges:

    meta_train  [0,      2^30)     tasks sampled by meta-training
    meta_valid  [2^30,   2^31)     tasks for validation during meta-training
    meta_test   [2^31,   3*2^30)   tasks for the final evaluation (suites)
    (the range [3*2^30, 2^32) is reserved)

A task's configuration and its initial parameters are drawn from keys whose raw
key data is `[0, id]` and `[1, id]` (threefry keys). The map from (tag, id) to key
data is the identity, hence injective: no configuration key or initialisation key
of one split is ever a key of another split. Identical tasks would need two
different keys to produce the same sampled arrays, which is as likely as two
independent draws from the family coinciding.

Minibatch order is not part of a task's identity: it comes from the step keys of
whoever trains the task. Data splits are separate too: tasks train on the training
split of their data; validation and test splits are never part of `Task.loss`.

Example:
    >>> from populations.quadratic import QuadraticFamily
    >>> train = SplitFamily(QuadraticFamily(), "meta_train")
    >>> test = SplitFamily(QuadraticFamily(), "meta_test")
    >>> cfg = train.sample(jax.random.key(0))
    >>> split_of(cfg.task_id)
    'meta_train'
    >>> [split_of(i) for i in test.enumerate(3).task_id]
    ['meta_test', 'meta_test', 'meta_test']
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from es_l2o.tasks import Task, TaskFamily

#: task splits, in the order of their id ranges
SPLITS = ("meta_train", "meta_valid", "meta_test")
_ID_BITS = 30  # ids per split: 2^30
_CONFIG_TAG, _INIT_TAG = 0, 1


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def id_range(split: str) -> tuple[int, int]:
    """The half-open range `[low, high)` of task ids that belong to `split`.

    Example:
        >>> id_range("meta_test")
        (2147483648, 3221225472)
    """
    low = _split_index(split) << _ID_BITS
    return low, low + (1 << _ID_BITS)


def split_of(task_id) -> str:
    """The split that owns `task_id` (a concrete integer)."""
    index = int(task_id) >> _ID_BITS
    if index >= len(SPLITS):
        raise ValueError(f"task id {int(task_id)} lies in the reserved range")
    return SPLITS[index]


def draw_task_id(key: jax.Array, split: str) -> jax.Array:
    """A uniformly random task id of `split` (uint32; jittable).

    Example:
        >>> low, high = id_range("meta_valid")
        >>> low <= int(draw_task_id(jax.random.key(0), "meta_valid")) < high
        True
    """
    index = _split_index(split)
    bits = jax.random.bits(key, (), jnp.uint32)
    return (bits >> (32 - _ID_BITS)) | jnp.uint32(index << _ID_BITS)


def _tagged_key(tag: int, task_id: jax.Array) -> jax.Array:
    data = jnp.stack([jnp.uint32(tag), jnp.asarray(task_id, jnp.uint32)])
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def config_key(task_id: jax.Array) -> jax.Array:
    """The key a task's configuration is sampled from; its data is `[0, task_id]`."""
    return _tagged_key(_CONFIG_TAG, task_id)


def init_key(task_id: jax.Array) -> jax.Array:
    """The key a task's initial parameters come from; its data is `[1, task_id]`."""
    return _tagged_key(_INIT_TAG, task_id)


class SplitConfig(NamedTuple):
    """A task of a split: its id and the wrapped family's configuration."""

    task_id: jax.Array
    cfg: Any


class SplitTask(Task):
    """A task whose initialisation is fixed by its task id (`init` ignores its key)."""

    def __init__(self, inner: Task, task_id: jax.Array):
        self.inner = inner
        self.task_id = task_id

    @property
    def has_validation(self):
        return self.inner.has_validation

    def init(self, key):
        del key  # the initialisation is part of the task's identity
        return self.inner.init(init_key(self.task_id))

    def loss(self, params, key):
        return self.inner.loss(params, key)

    def eval_loss(self, params, key):
        return self.inner.eval_loss(params, key)

    def metrics(self, params, key):
        return self.inner.metrics(params, key)


class SplitFamily(TaskFamily):
    """The tasks of `family` whose ids belong to `split`.

    Meta-training wraps its family as `SplitFamily(family, "meta_train")`; an
    evaluator wraps the same family as `SplitFamily(family, "meta_test")` and
    trains `enumerate(n)`, the first `n` test tasks (a fixed, reproducible list).

    Args:
        family: the family to draw tasks from.
        split: one of `SPLITS`.

    Example:
        >>> from populations.quadratic import QuadraticFamily
        >>> family = SplitFamily(QuadraticFamily(), "meta_test")
        >>> cfgs = family.enumerate(4)  # test tasks 0..3, stacked for vmap
        >>> cfgs.cfg.w.shape
        (4, 10, 10)
    """

    def __init__(self, family: TaskFamily, split: str = "meta_train"):
        _split_index(split)
        if isinstance(family, SplitFamily):
            raise ValueError(f"{family.name!r} already belongs to {family.split!r}")
        self.family = family
        self.split = split
        self.name = family.name
        self.has_validation = family.has_validation

    def config(self, task_id: jax.Array) -> SplitConfig:
        """The configuration of task `task_id` (jittable; ids of any split)."""
        task_id = jnp.asarray(task_id, jnp.uint32)
        return SplitConfig(task_id, self.family.sample(config_key(task_id)))

    def sample(self, key):
        return self.config(draw_task_id(key, self.split))

    def enumerate(self, num: int, start: int = 0) -> SplitConfig:
        """Tasks `start .. start+num-1` of this split, stacked along a leading axis."""
        low, high = id_range(self.split)
        if start < 0 or num < 1 or low + start + num > high:
            raise ValueError(
                f"tasks {start}..{start + num - 1} do not fit in split {self.split!r}"
                f" (it holds {high - low} tasks)"
            )
        ids = jnp.asarray(np.arange(low + start, low + start + num, dtype=np.uint32))
        return jax.vmap(self.config)(ids)

    def task(self, cfg):
        return SplitTask(self.family.task(cfg.cfg), cfg.task_id)
