"""The README's plain-JAX example runs as written against a saved optimizer."""

import re
from pathlib import Path

import jax
import numpy as np

from es_l2o import export
from es_l2o.lopt import MLPLOpt

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_trains_digits_with_a_loaded_optimizer(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "es_l2o.export import load" in b)
    lopt = MLPLOpt(hidden_sizes=(4,))
    theta = lopt.init(jax.random.key(0))
    # a hand-set theta that follows the normalised momentum (a plain descent rule),
    # so the example must actually lower the loss
    theta["skip"]["w"] = theta["skip"]["w"].at[9, 0].set(-3.0)  # m(0.9) / sqrt(v)
    theta["output"]["w"] = theta["output"]["w"] * 0
    path = tmp_path / "optimizer.safetensors"
    export.save(path, lopt, theta)
    namespace = {}
    exec(
        compile(
            example.replace("runs/RUN/optimizer.safetensors", str(path)),
            "README",
            "exec",
        ),
        namespace,
    )
    x, y, params = namespace["x"], namespace["y"], namespace["params"]
    final = float(namespace["loss_fn"](params, x, y))
    assert np.isfinite(final) and final < 0.5 * np.log(10.0)
