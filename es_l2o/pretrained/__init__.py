"""Learned optimizers that ship with the package, loadable offline in one call.

Each optimizer is a safetensors file `NAME.safetensors` (written by
`es_l2o.export.save`) beside `NAME.json`, its provenance: the recipe (the config
of every meta-training stage), the CPU-hours, the commit it was trained at and its
evaluation figures.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from es_l2o import pretrained
    >>> "generalist" in pretrained.available()
    True
    >>> opt = pretrained.load("generalist", num_steps=100)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> state = opt.init(params)
    >>> loss, grads = jax.value_and_grad(loss_fn)(params)
    >>> updates, state = opt.update(grads, state, params, value=loss)
    >>> float(loss_fn(optax.apply_updates(params, updates))) < float(loss)
    True
"""

from __future__ import annotations

import json
from importlib import resources

import optax

from es_l2o import export

__all__ = ["available", "info", "load", "path"]


def _folder():
    return resources.files(__name__)


def available() -> list[str]:
    """Names of the shipped optimizers."""
    return sorted(
        entry.name.removesuffix(".safetensors")
        for entry in _folder().iterdir()
        if entry.name.endswith(".safetensors")
    )


def path(name: str):
    """The file of the shipped optimizer `name` (a `pathlib`-like resource)."""
    if name not in available():
        raise ValueError(f"no pretrained optimizer {name!r}; available: {available()}")
    return _folder() / f"{name}.safetensors"


def info(name: str) -> dict:
    """Provenance of `name`: recipe, stages, CPU-hours, commit, evaluation."""
    path(name)  # refuses unknown names
    entry = _folder() / f"{name}.json"
    return json.loads(entry.read_text()) if entry.is_file() else {}


def load(name: str, num_steps: int) -> optax.GradientTransformationExtraArgs:
    """The shipped optimizer `name` as an optax transform planning `num_steps`.

    Its `update(grads, state, params, *, value=loss)` takes the parameters and,
    where the architecture reads it, the current loss.
    """
    with resources.as_file(path(name)) as file:
        return export.load(file, num_steps=num_steps)
