"""The population axis spread over every device (and host) JAX sees.

Estimators put their per-particle arrays (perturbed meta-parameters, keys, inner
states) on a one-axis `Mesh` named "population"; XLA partitions the vmapped unroll
so each device trains its own slice of the population, while the ES state and the
mean meta-parameters stay replicated. Fitness reductions in `tell` become
all-reduces. The same code runs on one CPU, a GPU, or a TPU pod.

Over several processes (`start_processes`: JAX's multi-controller runtime) the mesh
spans every process's devices; arrays are placed with `put` (each process provides
only its own devices' shards), read back with `fetch`, and process 0 alone writes
files (`is_main_process`).

Example:
    >>> mesh = population_mesh()            # every device
    >>> check_population(16, mesh)          # raises unless 16 splits evenly
    >>> import jax.numpy as jnp
    >>> x = shard_population(jnp.zeros((16, 3)), mesh)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

POPULATION_AXIS = "population"


#: the `sharding` config keys passed on to `jax.distributed.initialize`
PROCESS_KEYS = (
    "coordinator_address",
    "num_processes",
    "process_id",
    "heartbeat_timeout_seconds",
)


def initialize_distributed(enabled: bool, **kwargs) -> None:
    """Starts JAX's multi-controller runtime (`jax.distributed.initialize`) when
    enabled; keyword arguments that are None are left to JAX to detect.

    Call it before anything else touches JAX devices. On a cluster (SLURM, TPU pods,
    Open MPI, Kubernetes) the coordinator, process count and process id are detected;
    elsewhere pass `coordinator_address` ("HOST:PORT" of process 0), `num_processes`
    and `process_id`. CPU devices of different processes talk through gloo (TCP).
    """
    if not enabled or jax.distributed.is_initialized():
        return
    # cross-process collectives on CPU; GPUs and TPUs use their own (NCCL, ICI)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        **{k: v for k, v in kwargs.items() if v is not None and v != ""}
    )


def start_processes(settings) -> bool:
    """Starts the multi-controller runtime as a run's `sharding` settings say.

    It starts when `distributed` is true or any of `coordinator_address`,
    `num_processes`, `process_id` is given; returns whether it did.

    Example:
        >>> start_processes({"num_devices": None, "distributed": False})
        False
    """
    settings = dict(settings or {})
    given = {k: settings.get(k) for k in PROCESS_KEYS}
    given = {k: v for k, v in given.items() if v is not None and v != ""}
    for name in ("num_processes", "process_id", "heartbeat_timeout_seconds"):
        value = given.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise ValueError(f"sharding.{name} must be an integer, got {value!r}")
    enabled = bool(settings.get("distributed")) or bool(
        set(given) - {"heartbeat_timeout_seconds"}
    )
    initialize_distributed(enabled, **given)
    return enabled


def is_main_process() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def sync(name: str, timeout_s: float = 600.0) -> None:
    """Waits until every process has reached `sync(name)` (nothing to do alone).

    A barrier of JAX's coordination service, not a collective on the devices: no
    program to compile, and a timeout of its own (gloo gives processes only 30 s to
    meet at a first collective).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    name = f"{name} #{next(_BARRIERS)}"  # a barrier's name serves once
    if client is None:  # a runtime started some other way
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


_BARRIERS = itertools.count()


def put_global(x, target: jax.sharding.Sharding) -> jax.Array:
    """Places a host value (the same in every process) with `target`'s sharding;
    each process provides only the shards of its own devices."""
    x = np.asarray(jax.device_get(x)) if not isinstance(x, np.ndarray) else x
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def abstract(tree):
    """`jax.ShapeDtypeStruct`s of `tree`'s arrays, each with the array's sharding."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )


def replicated_everywhere(devices: Sequence | None = None) -> NamedSharding:
    """Whole arrays on every device of every process."""
    devices = list(jax.devices() if devices is None else devices)
    return NamedSharding(Mesh(np.asarray(devices), (POPULATION_AXIS,)), PartitionSpec())


def fetch(x) -> np.ndarray:
    """A host copy of `x`: its own value where this process holds all of it (a
    fully replicated or local array), else gathered from every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def population_mesh(
    num_devices: int | None = None, devices: Sequence | None = None
) -> Mesh:
    """A one-axis mesh over `devices` (default: all of `jax.devices()`, every host).

    Args:
        num_devices: use only the first `num_devices` devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"num_devices must lie in [1, {len(devices)}] (the devices JAX sees), "
                f"got {num_devices}"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (POPULATION_AXIS,))


def check_population(population_size: int, mesh: Mesh | None) -> None:
    """Raises ValueError unless the population splits evenly over the mesh."""
    if mesh is None:
        return
    count = mesh.devices.size
    if population_size % count:
        fits = (population_size // count + 1) * count
        raise ValueError(
            f"population_size={population_size} does not split evenly over {count} "
            f"devices; use a multiple of {count}, such as {fits}"
        )


def shard_population(tree, mesh: Mesh | None):
    """Splits the leading (population) axis of every leaf over the mesh (in jit)."""
    return constrain(tree, _spec(mesh, PartitionSpec(POPULATION_AXIS)))


def population_devices(mesh: Mesh | None) -> int:
    """Devices the population axis is split over (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[POPULATION_AXIS])


def check_particle_chunk(chunk, population_size: int, mesh: Mesh | None):
    """`chunk` as an int, or None (all of a device's particles at once).

    Raises:
        ValueError: naming the chunk and the chunk sizes that would divide each
            device's particles.
    """
    if chunk is None:
        return None
    per_device = population_size // population_devices(mesh)
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"particle_chunk must be a positive integer, got {chunk!r}")
    chunk = int(chunk)
    if per_device % min(chunk, per_device):
        fits = [d for d in range(1, per_device + 1) if per_device % d == 0]
        raise ValueError(
            f"particle_chunk {chunk} does not divide the {per_device} particles per "
            f"device; use one of {fits} or null"
        )
    return None if chunk >= per_device else chunk


def map_population(fn, args, mesh: Mesh | None = None, chunk: int | None = None):
    """`jax.vmap(fn)(*args)` over the population axis, `chunk` particles at a time.

    Each device runs its own particles `chunk` at a time (a `lax.map` over chunks
    inside every shard), so the working set, and the throughput, of a population
    larger than the device saturates at stays that of `chunk` particles. Without a
    chunk (or a chunk of at least a device's share) it is one vmap.

    Example:
        >>> map_population(lambda x: x * 2, (jnp.arange(8.0),), chunk=2).tolist()
        [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
    """
    args = shard_population(args, mesh)
    size = jax.tree_util.tree_leaves(args)[0].shape[0]
    chunk = check_particle_chunk(chunk, size, mesh)
    if chunk is None:
        return shard_population(jax.vmap(fn)(*args), mesh)
    devices = population_devices(mesh)
    steps = size // devices // chunk

    def split(x):  # (P, ...) -> (steps, devices, chunk, ...): a device's own rows
        x = x.reshape((devices, steps, chunk) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    def join(x):
        return jnp.swapaxes(x, 0, 1).reshape((size,) + x.shape[3:])

    split_args = constrain(
        jax.tree.map(split, args), _spec(mesh, PartitionSpec(None, POPULATION_AXIS))
    )
    out = jax.lax.map(lambda a: jax.vmap(jax.vmap(fn))(*a), split_args)
    return shard_population(jax.tree.map(join, out), mesh)


def sum_population(fn, args, mesh: Mesh | None = None, chunk: int | None = None):
    """`jnp.sum(jax.vmap(fn)(*args), axis=0)` without the stacked (N, ...) values.

    Each device sums `fn` over its own slice of the leading axis, `chunk` rows at a
    time (a `lax.scan` over chunks; None: its whole slice at once), into a partial
    sum of one output's shape; the devices' partial sums are then added (an
    all-reduce). So at most `chunk` outputs of `fn` are live on a device.

    Example:
        >>> sum_population(lambda i: i * jnp.ones(3), (jnp.arange(8.0),), chunk=2)
        Array([28., 28., 28.], dtype=float32)
    """
    args = shard_population(args, mesh)
    size = jax.tree_util.tree_leaves(args)[0].shape[0]
    devices = population_devices(mesh)
    check_population(size, mesh)
    per_device = size // devices
    chunk = check_particle_chunk(chunk, size, mesh) or per_device
    steps = per_device // chunk
    per_device_rows = _spec(mesh, PartitionSpec(None, POPULATION_AXIS))
    per_device_sums = _spec(mesh, PartitionSpec(POPULATION_AXIS))

    def split(x):  # (N, ...) -> (steps, devices, chunk, ...): a device's own rows
        x = x.reshape((devices, steps, chunk) + x.shape[1:])
        return constrain(jnp.swapaxes(x, 0, 1), per_device_rows)

    def partial_sums(a):  # (devices, ...): each device's sum over one chunk
        out = jax.vmap(jax.vmap(fn))(*a)
        return constrain(
            jax.tree.map(lambda x: jnp.sum(x, axis=1), out), per_device_sums
        )

    split_args = jax.tree.map(split, args)
    if steps == 1:
        sums = partial_sums(jax.tree.map(lambda x: x[0], split_args))
    else:

        def body(acc, a):
            return jax.tree.map(jnp.add, acc, partial_sums(a)), None

        first = jax.tree.map(lambda x: x[0], split_args)
        shapes = jax.eval_shape(partial_sums, first)
        zeros = constrain(
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
            per_device_sums,
        )
        sums, _ = jax.lax.scan(body, zeros, split_args)
    return replicate(jax.tree.map(lambda x: jnp.sum(x, axis=0), sums), mesh)


def pair_sharding(mesh: Mesh | None, num_pairs: int):
    """Where per-pair rows `(P/2, ...)` live so that each device holds its own
    particles' pairs, or None (one device, or pairs that do not split).

    Particles are split over the mesh in order, so device d holds particles
    [d P/n, (d+1) P/n): the positive partners of a block of pairs for d < n/2 and the
    negative partners of the same block for d >= n/2. Viewing the devices as
    (2, n/2), pair blocks are split over the second axis and repeated over the
    first; a device holds (P/2) / (n/2) = P/n pair rows, never all P/2.

    Example:
        >>> pair_sharding(None, 8) is None
        True
    """
    count = population_devices(mesh)
    if count < 2 or count % 2 or num_pairs % (count // 2):
        return None
    grid = Mesh(mesh.devices.reshape(2, count // 2), ("sign", "pairs"))
    return NamedSharding(grid, PartitionSpec("pairs"))


def constrain(tree, spec: NamedSharding | None):
    """`with_sharding_constraint` on every leaf, where `spec` is given (in jit)."""
    if spec is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)


def _spec(mesh: Mesh | None, partition: PartitionSpec) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, partition)


def replicate(tree, mesh: Mesh | None):
    """Places every leaf whole on every device of the mesh (in jit)."""
    return constrain(tree, _spec(mesh, PartitionSpec()))


def put_replicated(tree, mesh: Mesh | None):
    """Places concrete arrays whole on every device of the mesh (outside jit), so
    that a state from `init` has the sharding a jitted step returns (no recompile)."""
    if mesh is None:
        return tree
    return put(tree, NamedSharding(mesh, PartitionSpec()))


def put(tree, target: jax.sharding.Sharding):
    """`jax.device_put(tree, target)` that also works where `target` spans several
    processes: each process then provides only its own devices' shards (leaves that
    are the same in every process, as an estimator's `init` makes them)."""
    if target.is_fully_addressable:
        return jax.device_put(tree, target)

    def place(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key
        ):
            data = jax.random.key_data(x)
            data = put_global(data, _trailing_whole(target, data.ndim))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return put_global(x, target)

    return jax.tree.map(place, tree)


def _trailing_whole(target: NamedSharding, ndim: int) -> NamedSharding:
    """`target` for an array of `ndim` axes (a key's data: trailing axes whole)."""
    spec = tuple(target.spec) + (None,) * (ndim - len(target.spec))
    return NamedSharding(target.mesh, PartitionSpec(*spec))


def device_memory_bytes(device=None) -> int | None:
    """Memory one device can use: the allocator's limit, or host RAM for a CPU."""
    device = jax.local_devices()[0] if device is None else device
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def tree_bytes(tree) -> int:
    """Bytes of every array in `tree` (works on `jax.ShapeDtypeStruct`s)."""
    return sum(
        int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def check_memory(
    *,
    population_size: int,
    bytes_per_particle: int,
    replicated_bytes: int,
    mesh: Mesh | None,
    device_bytes: int | None = None,
    headroom: float = 0.5,
) -> None:
    """Refuses, before compiling, a configuration that cannot fit in device memory.

    The estimate per device is `replicated_bytes + bytes_per_particle *
    population_size / num_devices`; at most `headroom` of the device's memory may be
    planned (XLA needs the rest for temporaries).

    Raises:
        MemoryError: naming a population and a device count that would fit.
    """
    count = 1 if mesh is None else mesh.devices.size
    device_bytes = device_memory_bytes() if device_bytes is None else device_bytes
    if not device_bytes:
        return
    budget = headroom * device_bytes - replicated_bytes
    per_device = bytes_per_particle * population_size / count
    if per_device <= budget:
        return
    fits = max(int(budget // max(bytes_per_particle, 1)) * count, 0)
    fits -= fits % (2 * count) if fits >= 2 * count else 0
    needed = int(np.ceil(bytes_per_particle * population_size / max(budget, 1)))
    raise MemoryError(
        f"population_size={population_size} needs about {per_device / 2**30:.2f} GiB "
        f"per device on {count} device(s), more than the {budget / 2**30:.2f} GiB "
        f"available; use population_size <= {fits} or at least {needed} devices"
    )
