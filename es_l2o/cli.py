"""Command-line entry points; the only module that touches Hydra.

    es-l2o-train [OVERRIDE ...]              meta-train, export, compare with Adam
    es-l2o-eval OPTIMIZER_FILE [OVERRIDE ...]  compare a saved optimizer with Adam

Overrides use Hydra's syntax (`es.population_size=64`, `lopt=mlp`). A bad option or
value ends the program with one line naming it and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

USAGE_ERROR = 2


class UsageError(Exception):
    """A user-facing mistake: printed as one line, exit code 2."""


def config_dir() -> Path:
    """The folder of Hydra configs: installed beside the package, or the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UsageError(f"cannot find the configs folder near {here}")


def compose(config_name: str, overrides: list[str]):
    """The composed config, or a UsageError naming the bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(
            str(config_dir()), version_base=None, job_name="es_l2o"
        ):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        message = str(err).strip().splitlines()[0]
        raise UsageError(
            f"bad configuration ({' '.join(overrides)}): {message}"
        ) from None


def instantiate(node, **kwargs):
    """Hydra's instantiate, with constructor errors turned into UsageErrors."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        message = (
            str(cause).strip().splitlines()[-1] if str(cause).strip() else repr(cause)
        )
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise UsageError(f"cannot build {target}: {message}") from None


def _positive_int(cfg, key: str) -> int:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{key} must be a positive integer, got {value!r}")
    return value


def _horizon(value):
    from omegaconf import ListConfig

    return list(value) if isinstance(value, ListConfig | list | tuple) else value


def _compare_with_adam(family, optimizer, num_steps: int, evaluation) -> dict:
    from es_l2o import evaluate

    return evaluate.compare_with_adam(
        family,
        optimizer,
        num_steps,
        num_tasks=int(evaluation.num_tasks),
        seed=int(evaluation.seed),
        learning_rates=list(evaluation.learning_rates),
        reference_learning_rate=float(evaluation.reference_learning_rate),
    )


def _compare(family, optimizer, num_steps: int, evaluation, out_dir: Path) -> dict:
    from es_l2o import evaluate

    result = _compare_with_adam(family, optimizer, num_steps, evaluation)
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    print(evaluate.format_table(result))
    return result


def _is_mixture(population) -> bool:
    """A population of several families with weights (populations.mix)."""
    return hasattr(population, "families") and hasattr(population, "weights")


def _population_name(population) -> str:
    if _is_mixture(population):
        return "mix(" + ",".join(f.name for f in population.families) + ")"
    return population.name


def _mixture_estimator(cfg, make_estimator, systems, mixture):
    """`MultiFamilyES` over the mixture's families: `es.population_size` split by
    the weights, every family's losses shaped within the family (truncated
    estimators: `loss_normalization=none` becomes "initial", since loss scales
    differ by orders of magnitude across families)."""

    from es_l2o.es import MultiFamilyES

    kwargs = _mesh_kwargs(cfg, make_estimator)
    keywords = getattr(make_estimator, "keywords", {})
    if keywords.get("loss_normalization") == "none":
        kwargs["loss_normalization"] = "initial"
        print(
            "population=mix: es.loss_normalization=initial (each task's losses "
            "divided by its first loss; loss scales differ across families)",
            flush=True,
        )
    if keywords.get("meta_loss") == "validation":
        make_estimator = _validation_where_possible(make_estimator)
    estimator = MultiFamilyES.build(
        make_estimator,
        systems,
        mixture.weights,
        population_size=_positive_int(cfg, "es.population_size"),
        names=[f.name for f in mixture.families],
        **kwargs,
    )
    sizes = dict(zip(estimator.names, estimator.population_sizes, strict=True))
    print(f"population=mix: particles per family {sizes}", flush=True)
    return estimator


def _validation_where_possible(make_estimator):
    """`make_estimator` with meta_loss="heldout" for families without a validation
    split (the loss after each update on a fresh batch), "validation" elsewhere."""

    def make(system, **kwargs):
        if not system.has_validation:
            kwargs["meta_loss"] = "heldout"
        return make_estimator(system=system, **kwargs)

    return make


def _compare_families(mixture, optimizer, num_steps, evaluation, out_dir) -> dict:
    """The comparison with Adam on every family; summary.json maps family names to
    their results."""
    from es_l2o import evaluate

    results = {}
    for index, family in enumerate(mixture.families):
        result = _compare_with_adam(family, optimizer, num_steps, evaluation)
        name = family.name if family.name not in results else f"{family.name}#{index}"
        results[name] = result
        print(f"family {name}:")
        print(evaluate.format_table(result))
    (out_dir / "summary.json").write_text(json.dumps({"families": results}, indent=2))
    return results


#: config keys a resumed run may change; everything else must match its config.yaml
RESUME_MAY_CHANGE = (
    "num_iterations",
    "progress",
    "checkpoint_every",
    "checkpoint_keep",
    "tensorboard",
    "sharding",
)
#: exit status of a run stopped by a signal after writing its checkpoint: 128 + signum
SIGNAL_EXIT_BASE = 128


class _Stopped(Exception):
    """Meta-training ended early: a message for stderr and the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _count(cfg, key: str, low: int) -> int:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def _flag(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise UsageError(f"{key} must be true or false, got {value!r}")
    return value


def _plain(value):
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        return OmegaConf.to_container(value, resolve=True)
    return value


def train_config(argv: list[str]):
    """The config of `es-l2o-train argv`; with `resume=RUN_DIR`, the run's own
    config.yaml with only the keys of `RESUME_MAY_CHANGE` taken from `argv`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

    cfg = compose("config", argv)
    if cfg.get("resume") in (None, ""):
        return cfg
    run_dir = Path(str(cfg.resume)).expanduser().resolve()
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise UsageError(
            f"resume={cfg.resume}: no config.yaml there; give the run directory "
            "that es-l2o-train printed when it started"
        )
    try:
        saved = OmegaConf.load(saved_path)  # YAML data only: no code runs
        overrides = OverridesParser.create().parse_overrides(argv)
    except HydraException as err:
        raise UsageError(f"resume={cfg.resume}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any YAML or file error
        raise UsageError(f"resume: cannot read {saved_path}: {err}") from None
    if not isinstance(saved, DictConfig):
        raise UsageError(f"resume: {saved_path} is not a mapping of settings")
    given = {o.key_or_group for o in overrides} - {"resume"}
    allowed = {k for k in given if k.split(".")[0] in RESUME_MAY_CHANGE}
    changed = []
    for key in sorted(given - allowed):
        new, old = (
            _plain(OmegaConf.select(cfg, key)),
            _plain(OmegaConf.select(saved, key)),
        )
        if key == "run_dir" and Path(str(new)).expanduser().resolve() == run_dir:
            continue
        if new != old:
            changed.append(f"{key} (the run has {old!r}, given {new!r})")
    if changed:
        raise UsageError(
            f"resume={run_dir} cannot change {'; '.join(changed)}: a resumed run "
            f"keeps its config.yaml; only {', '.join(RESUME_MAY_CHANGE)} may be given"
        )
    for key in sorted(allowed) + [k for k in RESUME_MAY_CHANGE if k not in saved]:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    saved.run_dir = str(run_dir)
    saved.resume = str(run_dir)
    # how this launch spreads over processes and devices, not the run's config.yaml
    saved.sharding = cfg.sharding
    return saved


def _initial_theta(cfg, lopt, key):
    """`lopt.init(key)`, or the theta of the optimizer file `init_theta` (the
    previous stage of a staged meta-training), which must hold the same optimizer."""
    from es_l2o import export

    path = cfg.get("init_theta")
    if path in (None, ""):
        return lopt.init(key)
    try:
        saved, theta, _ = export.load_theta(Path(str(path)).expanduser())
    except (OSError, export.OptimizerFileError) as err:
        raise UsageError(f"init_theta={path}: {err}") from None
    if saved.name != lopt.name or not _same_shapes(saved, lopt):
        raise UsageError(
            f"init_theta={path} holds a {saved.name!r} optimizer with config "
            f"{saved.config()}, whose theta does not fit this run's {lopt.name!r} "
            f"with {lopt.config()}: give lopt settings of the same sizes"
        )
    wanted = lopt.config()
    changed = {
        k: (v, wanted.get(k)) for k, v in saved.config().items() if wanted.get(k) != v
    }
    if changed:
        print(
            f"init_theta={path}: same theta shapes, lopt settings changed "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
            flush=True,
        )
    return theta


def _same_shapes(a, b) -> bool:
    """Whether two learned optimizers' thetas have one structure and shapes."""
    import jax

    shapes = [jax.eval_shape(lopt.init, jax.random.key(0)) for lopt in (a, b)]
    return jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1]) and all(
        x.shape == y.shape for x, y in zip(*map(jax.tree.leaves, shapes), strict=True)
    )


def _mesh_kwargs(cfg, make_estimator) -> dict:
    """`mesh=` over the configured devices, for estimators that take one."""
    import inspect

    from omegaconf import OmegaConf

    from es_l2o import sharding

    target = getattr(make_estimator, "func", make_estimator)
    if "mesh" not in inspect.signature(target).parameters:
        return {}
    settings = OmegaConf.select(cfg, "sharding") or {}
    try:
        return {"mesh": sharding.population_mesh(settings.get("num_devices"))}
    except ValueError as err:
        raise UsageError(f"sharding.num_devices: {err}") from None


def _start_processes(cfg) -> None:
    """Starts JAX's multi-controller runtime as `cfg.sharding` says (one process of
    a run over several processes or hosts); nothing for a one-process run."""
    from omegaconf import OmegaConf

    from es_l2o import sharding

    settings = OmegaConf.select(cfg, "sharding") or {}
    try:
        sharding.start_processes(OmegaConf.to_container(settings, resolve=True))
    except ValueError as err:
        raise UsageError(str(err)) from None


#: exit status of a process whose run lost another process
LOST_PROCESS_EXIT = 3


def _stop_after_lost_process(err, run_dir: Path, checkpoint_dir: Path) -> None:
    """Ends this process of a multi-process run whose collectives failed (another
    process died): one message, then `os._exit`, since JAX's shutdown barrier at
    exit would wait for the lost process and abort with its own fatal error."""
    import jax

    from es_l2o import checkpoint as ckpt

    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    print(
        f"es-l2o-train: error: process {jax.process_index()} of "
        f"{jax.process_count()} stops: the run lost another process (a collective "
        f"with the others failed: {first}). "
        f"Last checkpoint: {ckpt.latest(checkpoint_dir)}. Start every process "
        f"again with resume={run_dir}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(LOST_PROCESS_EXIT)


class _TrainSettings(NamedTuple):
    """The loop's settings of a train config, checked."""

    num_iterations: int
    checkpoint_every: int
    checkpoint_keep: int
    validate_every: int
    tensorboard: bool
    progress: bool
    resuming: bool


def _train_settings(cfg) -> _TrainSettings:
    return _TrainSettings(
        num_iterations=_positive_int(cfg, "num_iterations"),
        checkpoint_every=_count(cfg, "checkpoint_every", 0),
        checkpoint_keep=_count(cfg, "checkpoint_keep", 1),
        validate_every=_count(cfg, "meta_validation.every", 0),
        tensorboard=_flag(cfg, "tensorboard"),
        progress=_flag(cfg, "progress"),
        resuming=cfg.get("resume") not in (None, ""),
    )


def _newest_checkpoint(run_dir: Path, settings: _TrainSettings) -> Path | None:
    """The checkpoint a resumed run continues from (None for a new run); a
    UsageError where the run directory does not fit the request."""
    from es_l2o import checkpoint as ckpt

    checkpoint_dir = run_dir / "checkpoints"
    newest = ckpt.latest(checkpoint_dir)
    if not settings.resuming:
        if newest is not None:
            raise UsageError(
                f"run_dir={run_dir} already holds the checkpoints of a run: continue "
                f"it with resume={run_dir}, or choose another run_dir"
            )
        return None
    if newest is None:
        raise UsageError(
            f"resume={run_dir}: no checkpoint in {checkpoint_dir} (the run stopped "
            "before its first one); start it again"
        )
    if ckpt.iteration_of(newest) > settings.num_iterations:
        raise UsageError(
            f"resume={run_dir}: its checkpoint is at iteration "
            f"{ckpt.iteration_of(newest)}, beyond num_iterations="
            f"{settings.num_iterations}; give num_iterations >= "
            f"{ckpt.iteration_of(newest)}"
        )
    return newest


def _systems(cfg, family, lopt) -> list:
    """One `LOptTraining` per family of the population (one unless a mixture)."""
    from omegaconf import OmegaConf

    from es_l2o.unroll import LOptTraining

    system_kwargs = OmegaConf.to_container(cfg.system, resolve=True)
    system_kwargs["horizon"] = _horizon(system_kwargs.get("horizon"))
    families = family.families if _is_mixture(family) else (family,)
    try:
        return [LOptTraining(f, lopt, **system_kwargs) for f in families]
    except (TypeError, ValueError) as err:
        raise UsageError(f"bad system settings {system_kwargs}: {err}") from None


def _estimator(cfg, family, systems):
    """The estimator `cfg.es` builds over `systems`."""
    make_estimator = instantiate(cfg.es)
    try:
        if _is_mixture(family):
            return _mixture_estimator(cfg, make_estimator, systems, family)
        return make_estimator(system=systems[0], **_mesh_kwargs(cfg, make_estimator))
    except (TypeError, ValueError) as err:
        raise UsageError(
            f"cannot build the estimator {cfg.es._target_}: {err}"
        ) from None


def _validator(cfg, family, systems, theta0, every: int):
    """The run's `Validator` (None when `meta_validation.every` is 0)."""
    from es_l2o import validation

    if every == 0:
        return None
    settings = cfg.meta_validation
    kwargs = dict(
        num_tasks=_positive_int(cfg, "meta_validation.num_tasks"),
        seed=int(settings.seed),
        meta_loss=str(settings.meta_loss),
    )
    try:
        if _is_mixture(family):
            loss = validation.mixture_validation_loss(
                systems, family.weights, theta0, **kwargs
            )
        else:
            loss = validation.meta_validation_loss(systems[0], **kwargs)
    except ValueError as err:
        raise UsageError(f"meta_validation: {err}") from None
    return validation.Validator(loss, every)


def _start_run_dir(cfg, run_dir: Path, newest: Path | None) -> None:
    """Creates the run directory (or cleans a resumed one) and writes config.yaml."""
    from omegaconf import OmegaConf

    from es_l2o import files, sharding

    run_dir.mkdir(parents=True, exist_ok=True)
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["resume"] = None
    if sharding.is_main_process():  # process 0 alone writes the run's files
        for folder in (run_dir, run_dir / "checkpoints"):  # what killed writes left
            files.remove_temp_files(folder)
        files.write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(saved))
    print(f"run directory: {run_dir}", flush=True)
    if newest is not None:
        print(f"resuming from {newest}", flush=True)


def _collaborators(cfg, settings: _TrainSettings, run_dir: Path, lopt, estimator):
    """The loop's `RunLog` and `Checkpointer` (which also exports the current theta
    to theta.safetensors whenever it checkpoints)."""
    from es_l2o import export, sharding
    from es_l2o.meta import Checkpointer, RunLog

    main = sharding.is_main_process()  # every process checkpoints its shards

    def on_checkpoint(iteration, state):
        theta = estimator.theta(state)
        if main:
            export.save(run_dir / "theta.safetensors", lopt, theta, iteration=iteration)

    log = RunLog(
        run_dir / "metrics.jsonl" if main else None,
        tensorboard_dir=run_dir / "tensorboard"
        if settings.tensorboard and main
        else None,
        progress=settings.progress and main,
    )
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        every=settings.checkpoint_every,
        keep=settings.checkpoint_keep,
        metadata={"seed": int(cfg.seed)},
        on_checkpoint=on_checkpoint,
    )
    return log, checkpointer


def _meta_train(run_dir: Path, num_iterations: int, **loop):
    """`meta.train(**loop)`, its failures turned into a UsageError or `_Stopped`."""
    import signal

    import jax

    from es_l2o import checkpoint as ckpt
    from es_l2o.meta import Interrupted, NonFiniteThetaError, ResumeError, train

    checkpoint_dir = run_dir / "checkpoints"
    try:
        return train(num_iterations=num_iterations, **loop)
    except ckpt.CheckpointError as err:
        older = ckpt.checkpoints(checkpoint_dir)[:-1]
        hint = (
            f"; to resume from the previous checkpoint {older[-1].name}, delete "
            f"{ckpt.latest(checkpoint_dir)}"
            if older
            else ""
        )
        raise UsageError(f"resume={run_dir}: {err}{hint}") from None
    except ResumeError as err:
        raise UsageError(f"resume={run_dir}: {err}") from None
    except Interrupted as err:
        raise _Stopped(
            f"stopped by {signal.Signals(err.signum).name} after iteration "
            f"{err.iteration} of {num_iterations}; checkpoint: "
            f"{err.checkpoint or ckpt.latest(checkpoint_dir)}. Resume with: "
            f"es-l2o-train resume={run_dir}",
            SIGNAL_EXIT_BASE + err.signum,
        ) from None
    except KeyboardInterrupt:
        raise _Stopped(
            "stopped at once by a second Ctrl-C, without a checkpoint; resume from "
            f"the last one with: es-l2o-train resume={run_dir}",
            SIGNAL_EXIT_BASE + 2,
        ) from None
    except NonFiniteThetaError as err:
        raise _Stopped(str(err), 1) from None
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        _stop_after_lost_process(err, run_dir, checkpoint_dir)


def _export_and_compare(cfg, run_dir, lopt, family, systems, result, seconds):
    """Exports the best theta to optimizer.safetensors and compares it with Adam."""
    from es_l2o import export

    horizon = systems[0].max_horizon
    optimizer_path = run_dir / "optimizer.safetensors"
    export.save(
        optimizer_path,
        lopt,
        result.best_theta,
        population=_population_name(family),
        horizon=horizon,
        num_iterations=int(cfg.num_iterations),
        iteration=result.best_iteration,
        meta_validation_loss=result.best_validation_loss,
        seed=int(cfg.seed),
    )
    print(
        f"meta-trained {len(result.history)} iterations ({cfg.num_iterations} in "
        f"all) in {seconds:.1f} s; exported the theta of iteration "
        f"{result.best_iteration} (meta-validation loss "
        f"{result.best_validation_loss:.4g}) to {optimizer_path}",
        flush=True,
    )
    optimizer = export.load(optimizer_path, num_steps=horizon)
    if _is_mixture(family):
        _compare_families(family, optimizer, horizon, cfg.evaluation, run_dir)
    else:
        _compare(family, optimizer, horizon, cfg.evaluation, run_dir)


def run_train(cfg) -> Path:
    """Meta-trains, exports and evaluates as `cfg` says; returns the run directory.

    With `cfg.resume` set (see `train_config`) the run continues from the newest
    checkpoint in its `checkpoints/` folder, appending to its metrics.jsonl.
    """
    import jax

    from es_l2o import sharding

    # the multi-host runtime must start before anything touches a JAX device
    _start_processes(cfg)
    settings = _train_settings(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    newest = _newest_checkpoint(run_dir, settings)
    family, lopt = instantiate(cfg.population), instantiate(cfg.lopt)
    systems = _systems(cfg, family, lopt)
    estimator = _estimator(cfg, family, systems)
    _start_run_dir(cfg, run_dir, newest)
    key_theta, key_meta = jax.random.split(jax.random.key(int(cfg.seed)))
    theta0 = _initial_theta(cfg, lopt, key_theta)
    log, checkpointer = _collaborators(cfg, settings, run_dir, lopt, estimator)
    start = time.perf_counter()
    result = _meta_train(
        run_dir,
        settings.num_iterations,
        estimator=estimator,
        theta=theta0,
        key=key_meta,
        log=log,
        checkpointer=checkpointer,
        validator=_validator(cfg, family, systems, theta0, settings.validate_every),
        resume=run_dir / "checkpoints" if settings.resuming else None,
    )
    seconds = time.perf_counter() - start
    if not sharding.is_main_process():  # process 0 exports and evaluates
        return run_dir
    _export_and_compare(cfg, run_dir, lopt, family, systems, result, seconds)
    print(f"run directory: {run_dir}")
    return run_dir


def run_eval(path: str, cfg) -> dict:
    """Compares the optimizer saved at `path` with Adam as `cfg` says."""
    from omegaconf import OmegaConf

    from es_l2o import export

    suite = OmegaConf.select(cfg, "suite", default=None)
    if suite is not None:
        return _run_suite(path, cfg, str(suite))
    horizon = _positive_int(cfg, "horizon")
    if not os.path.isfile(path):
        raise UsageError(f"no optimizer file at {path!r}")
    try:
        optimizer = export.load(path, num_steps=horizon)
    except ValueError as err:
        raise UsageError(str(err)) from None
    family = instantiate(cfg.population)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(path).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return _compare(family, optimizer, horizon, cfg.evaluation, out_dir)


def _suite_entries(cfg, suite: str) -> list:
    """The entries of suite `suite`, through `cfg.suites` (a `_target_` outside the
    library: `populations.suites.get_suite`)."""
    get_suite = instantiate(cfg.suites)
    try:
        return list(get_suite(suite))
    except (KeyError, ValueError) as err:
        raise UsageError(str(err).strip("'\"")) from None


def _run_suite(path: str, cfg, suite: str) -> dict:
    """`es-l2o-eval OPTIMIZER_FILE suite=NAME`: the learned optimizer vs every
    baseline on a suite; suite.{md,csv,json} and plots (`cfg.plots`, a `_target_`
    outside the library) in the output folder."""

    from es_l2o import evaluate, export

    entries = _suite_entries(cfg, suite)
    if not os.path.isfile(path):
        raise UsageError(f"no optimizer file at {path!r}")
    num_seeds = _positive_int(cfg, "num_seeds")
    cap = float(cfg.speedup_cap)
    if not cap >= 1:
        raise UsageError(f"speedup_cap must be >= 1, got {cap}")
    try:
        export.load(path, num_steps=1)
    except ValueError as err:
        raise UsageError(str(err)) from None
    default_dir = Path(path).resolve().parent / f"eval_{suite}"
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_dir
    start = time.perf_counter()
    result = evaluate.evaluate_suite(
        lambda n: export.load(path, num_steps=n),
        entries,
        num_seeds=num_seeds,
        learning_rates=list(cfg.evaluation.learning_rates),
        speedup_cap=cap,
        seed=int(cfg.evaluation.seed),
        log=lambda line: print(line, flush=True),
    )
    result["settings"].update(suite=suite, optimizer_file=str(path))
    result["settings"]["seconds"] = time.perf_counter() - start
    paths = evaluate.write_suite_report(result, out_dir)
    if cfg.get("plots") is not None:
        paths.update(instantiate(cfg.plots)(result, out_dir))
    print(evaluate.suite_markdown(result))
    print(f"wrote {', '.join(sorted(paths.values()))}")
    return result


def _main(program: str, body) -> int:
    try:
        body()
    except (UsageError, MemoryError) as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """`es-l2o-train [OVERRIDE ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        return _main("es-l2o-train", lambda: run_train(train_config(argv)))
    except _Stopped as stopped:
        print(f"es-l2o-train: {stopped}", file=sys.stderr, flush=True)
        return stopped.code
    except KeyboardInterrupt:
        print(
            "es-l2o-train: interrupted; a run that wrote a checkpoint continues with "
            "es-l2o-train resume=RUN_DIR",
            file=sys.stderr,
            flush=True,
        )
        return SIGNAL_EXIT_BASE + 2


def eval_main(argv: list[str] | None = None) -> int:
    """`es-l2o-eval OPTIMIZER_FILE [OVERRIDE ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("es-l2o-eval: error: missing OPTIMIZER_FILE\n" + __doc__, file=sys.stderr)
        return USAGE_ERROR
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    path, overrides = argv[0], argv[1:]
    return _main("es-l2o-eval", lambda: run_eval(path, compose("eval", overrides)))


if __name__ == "__main__":
    sys.exit(train_main())
