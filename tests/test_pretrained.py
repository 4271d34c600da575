"""The shipped generalist: loadable offline by name, with its provenance, and the
README's two examples (a flax nnx model, a plain JAX model) train as written."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from es_l2o import pretrained

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block(*markers: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if all(m in b for m in markers))


def test_generalist_ships_with_its_provenance():
    assert "generalist" in pretrained.available()
    info = pretrained.info("generalist")
    for key in ("recipe", "stages", "cpu_hours", "commit", "evaluation"):
        assert key in info, key
    assert info["stages"] and all("config" in stage for stage in info["stages"])


def test_unknown_name_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="generalist"):
        pretrained.load("no_such_optimizer", num_steps=10)


@pytest.mark.parametrize(
    "markers", [("pretrained", "from flax import nnx"), ("pretrained", "lax.scan")]
)
def test_readme_example_trains(markers):
    namespace = {}
    exec(compile(_readme_block(*markers), "README", "exec"), namespace)
    first, last = namespace["losses"][0], namespace["losses"][-1]
    assert np.isfinite(last) and last < 0.5 * first, (first, last)
    accuracy = namespace.get("accuracy")
    if accuracy is not None:
        assert float(accuracy) > 0.8
    jax.clear_caches()
