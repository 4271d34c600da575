"""Test ordering for pytest-xdist (see `addopts` in pyproject.toml): each module
runs on one worker, and the modules that take longest start first, so that the
workers finish at about the same time; every test process compiles at XLA's lowest
backend optimisation level (`xla_flags.FAST_COMPILE`)."""

import os

from xla_flags import FAST_COMPILE

_flags = os.environ.get("XLA_FLAGS", "")
if FAST_COMPILE not in _flags:  # before JAX starts its backend
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {_flags}".strip()

#: modules by their time on a 2-core CPU, longest first, the rest following in
#: order. xdist hands each worker two modules to start with (the first and third,
#: the second and fourth), so one worker runs the multi-process runs (up to five
#: processes) and then `test_any_tree`'s compiles: the two never overlap
LONGEST_FIRST = (
    "test_multiprocess.py",
    "test_families.py",
    "test_any_tree.py",
    "test_sharding.py",
    "test_lopt_zoo.py",
    "test_checkpoint.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a rank, the collection order
