"""Every registered learned optimizer compiles its update, fast and in bounded memory,
on any parameter tree: every vector length, awkward matrices, rank 0 to 4, random
mixtures of up to 50 tensors, and under `lax.scan`, `optax.chain` and
`optax.MultiSteps`.

Each architecture's compile runs in a child process (`compile_child.py`) under an
address-space cap and a time limit, so that a compile that runs away fails the test
and names the trees instead of taking the machine down. The children run two at a
time (one under pytest-xdist), one per architecture setting (the sizes its config
ships and its constructor defaults), at the suite's XLA settings (`xla_flags.py`): a
compile that runs away does so in the program it builds, at any optimisation level.

Vector lengths: the grouped optimizers (`mlp`, `hierarchical`) compile a tensor
through the group it falls into (`features.ShapeGroups`: a zero-padded bucket, or
the tensor in place), so one tree holding a member of every group that a lone vector
of 1 to 70 entries can form covers all seventy; `test_the_trees_cover_every_vector`
checks that. The flat optimizers (`lstm`, `deep_momentum`) compile one program over
the total size, whatever the tree, so a few lengths (the shortest, odd ones, the
longest) stand for the rest.
"""

import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from es_l2o.lopt import LOPTS
from es_l2o.lopt import features as F

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lopt"
CHILD = Path(__file__).with_name("compile_child.py")
MEMORY_CAP = 4 << 30  # bytes of address space per child
TIME_LIMIT = 240  # seconds per child; a healthy one takes 10-40 s here
# two at a time, one at a time under pytest-xdist (another worker has the other core)
CHILDREN_AT_ONCE = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
GROUPED = ("mlp", "hierarchical")

#: one lone vector per group a vector of 1 to 70 entries falls into, in two copies
#: (groups of two members) and alone
CLASS_SIZES = (1, 2, 3, 5, 9, 17, 33, 70)
TREES = {
    "lone vectors": {f"v{n}": {"shape": [n]} for n in CLASS_SIZES},
    "vector pairs": {f"v{n}": [{"shape": [n]}, {"shape": [n]}] for n in CLASS_SIZES},
    "matrices": {
        "row3": {"shape": [1, 3]},
        "row70": {"shape": [1, 70]},
        "col3": {"shape": [3, 1]},
        "col70": {"shape": [70, 1]},
        "square3": {"shape": [3, 3]},
        "wine_out": {"shape": [13, 3]},
        "square70": {"shape": [70, 70]},
    },
    "ranks 0, 3 and 4": {
        "scalar": {"shape": []},
        "cube": {"shape": [2, 3, 4]},
        "ones": {"shape": [1, 1, 1]},
        "conv": {"shape": [3, 3, 2, 4]},
        "odd": {"shape": [5, 1, 7, 1]},
    },
    "wine classifier": {
        "hidden": {"w": {"shape": [13, 32]}, "b": {"shape": [32]}},
        "out": {"w": {"shape": [32, 3]}, "b": {"shape": [3]}},
    },
    "iris classifier": [
        {"w": {"shape": [4, 16]}, "b": {"shape": [16]}},
        {"w": {"shape": [16, 16]}, "b": {"shape": [16]}},
        {"w": {"shape": [16, 3]}, "b": {"shape": [3]}},
    ],
}
WRAPPED = ("matrices", "wine classifier")
FLAT_SIZES = (1, 2, 3, 5, 17, 70)


def settings_of(arch: str) -> dict[str, dict]:
    """The kwargs of every config of `arch` under configs/lopt, and its defaults;
    a config equal to the defaults is compiled once."""
    out, seen = {f"{arch} defaults": {}}, [LOPTS[arch]().config()]
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg["_target_"].rsplit(".", 1)[1] != LOPTS[arch].__name__:
            continue
        kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
        if LOPTS[arch](**kwargs).config() not in seen:
            seen.append(LOPTS[arch](**kwargs).config())
            out[f"{arch} {path.stem}.yaml"] = kwargs
    return out


SETTINGS = {k: (a, kw) for a in sorted(LOPTS) for k, kw in settings_of(a).items()}


def shapes_tree(draw_shape):
    """Hypothesis strategy: nested dicts / lists of up to 50 leaves."""
    leaf = draw_shape.map(lambda s: {"shape": list(s)})
    return st.recursive(
        leaf,
        lambda inner: (
            st.lists(inner, min_size=1, max_size=5)
            | st.dictionaries(
                st.sampled_from("abcdefgh"), inner, min_size=1, max_size=5
            )
        ),
        max_leaves=50,
    )


SHAPE = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 70)),
    st.tuples(st.integers(1, 70), st.integers(1, 70)),
    st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 9)),
    st.tuples(*(st.integers(1, 4) for _ in range(4))),
)


def cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def compile_in_child(arch: str, kwargs: dict, trees: dict, wrapped=()) -> dict:
    """Compiles `trees` in a capped child; {"ok", "compile_s", "peak_mb", "error"}."""
    spec = {"arch": arch, "kwargs": kwargs, "trees": trees, "wrapped": list(wrapped)}
    try:
        done = subprocess.run(
            [sys.executable, str(CHILD)],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT,
            preexec_fn=cap_memory,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no compile within {TIME_LIMIT} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": f"exit {done.returncode}: " + " | ".join(tail)}
    return {"ok": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def failing_trees(arch: str, kwargs: dict, trees: dict) -> list[str]:
    """The labels of the trees that fail on their own (a failure, bisected)."""
    return [
        label
        for label, tree in trees.items()
        if not compile_in_child(arch, kwargs, {label: tree})["ok"]
    ]


def trees_for(arch: str, random_trees: list) -> dict:
    trees = dict(TREES)
    trees.update({f"random tree {i}": t for i, t in enumerate(random_trees)})
    if arch not in GROUPED:
        trees.update({f"vector of {n}": {"v": {"shape": [n]}} for n in FLAT_SIZES})
    return trees


@settings(
    max_examples=1,
    deadline=None,
    derandomize=True,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(random_trees=st.lists(shapes_tree(SHAPE), min_size=2, max_size=2))
def test_every_architecture_compiles_on_any_tree(random_trees):
    def run(name):
        arch, kwargs = SETTINGS[name]
        return name, compile_in_child(arch, kwargs, trees_for(arch, random_trees))

    longest_first = sorted(SETTINGS, key=lambda name: name.split()[0] not in GROUPED)
    with ThreadPoolExecutor(max_workers=CHILDREN_AT_ONCE) as pool:
        results = dict(pool.map(run, longest_first))
    failures = []
    for name, result in results.items():
        if not result["ok"]:
            arch, kwargs = SETTINGS[name]
            bad = failing_trees(arch, kwargs, trees_for(arch, random_trees))
            trees = {label: trees_for(arch, random_trees)[label] for label in bad}
            failures.append(f"{name}: {result['error']}; failing trees: {trees}")
    assert not failures, "\n".join(failures)


def _signature(group):
    return len(group.leaves), group.view


@pytest.mark.parametrize("view_fn", [None, lambda s: (int(np.prod(s)),)])
def test_the_trees_cover_every_vector(view_fn):
    """Each lone vector of 1 to 70 entries, and each pair, forms a group whose
    signature (members, padded view) the compiled trees hold."""

    def signatures(tree):
        leaves = jax.tree.map(
            lambda d: jax.ShapeDtypeStruct(tuple(d["shape"]), jnp.float32),
            tree,
            is_leaf=lambda d: isinstance(d, dict) and "shape" in d,
        )
        return {_signature(g) for g in F.ShapeGroups.of(leaves, view_fn)}

    compiled = signatures(TREES["lone vectors"]) | signatures(TREES["vector pairs"])
    for n in range(1, 71):
        lone = signatures({"v": {"shape": [n]}})
        pair = signatures([{"shape": [n]}, {"shape": [n]}])
        assert lone | pair <= compiled, f"a vector of {n} entries is not covered"
