"""XLA settings of the test processes and of the children they start.

The tests compile hundreds of small programs, each run a few times: XLA's lowest
backend optimisation level (`FAST_COMPILE`) takes about 30% off the suite's CPU time
(`pytest -n0 tests/test_lopt_zoo.py`: 181 s of user time against 254 s). Every
comparison a test makes is between programs compiled alike. `conftest.py` sets it for
every test process; children inherit it.

Example:
    >>> "--xla_force_host_platform_device_count=8" in with_devices(8)["XLA_FLAGS"]
    True
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def with_devices(count: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with `count` forced host CPU
    devices added to its XLA flags."""
    env = dict(os.environ if env is None else env)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return env
