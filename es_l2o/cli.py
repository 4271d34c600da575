"""Command-line entry points: the train and eval tasks and their Hydra apps.

    es-l2o-train [--cfg job|hydra] [-m] [OVERRIDE ...]     meta-train, export, compare
    es-l2o-eval OPTIMIZER_FILE [--cfg job|hydra] [-m] [OVERRIDE ...]  compare a file

Both are Hydra applications: overrides use Hydra's syntax (`es.population_size=64`,
`lopt=mlp`), `-m` sweeps (`es.population_size=8,16`, with `hydra/launcher=joblib`
or `submitit_slurm` from the `cluster` extra), `--cfg job` prints the composed
config, `--help` the config groups, `--hydra-help` Hydra's own flags. A bad option or
value ends the program with one line naming it and exit code 2.

The CLI's other modules: usage.py (errors and exit codes), hydra_config.py
(composing configs), hydra_app.py (running a task as a Hydra app), run_folder.py
(claiming and writing a run's folder).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

# compose, config_dir, instantiate, UsageError: scripts and tests use them as cli.NAME
from es_l2o.hydra_app import run_app, stopping_lines
from es_l2o.hydra_config import compose, config_dir, instantiate
from es_l2o.run_folder import (
    RESUME_MAY_CHANGE,
    claim_run_dir,
    release,
    remove_empty,
    start_run_dir,
)
from es_l2o.usage import SIGNAL_EXIT_BASE, Stopped, UsageError, one_line


def _positive_int(cfg, key: str) -> int:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{key} must be a positive integer, got {value!r}")
    return value


def _horizon(value):
    from omegaconf import ListConfig

    return list(value) if isinstance(value, ListConfig | list | tuple) else value


def json_safe(value):
    """`value` with every non-finite float (a diverged loss) as null: strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, value) -> None:
    """`value` as strict JSON (non-finite numbers as null), written atomically."""
    from es_l2o import files

    text = json.dumps(json_safe(value), indent=2, allow_nan=False, default=float)
    files.write_atomic(path, text + "\n")


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
    write_json(out_dir / "summary.json", result)
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
        gradient_balance=getattr(mixture, "gradient_balance", "none"),
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
    write_json(out_dir / "summary.json", {"families": results})
    return results


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


def resumed_config(cfg, overrides: list[str]):
    """`cfg` itself for a new run; with `resume=RUN_DIR`, the run's own config.yaml
    with only the keys of `RESUME_MAY_CHANGE` taken from `overrides` (the command
    line's), anything else that differs refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

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
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UsageError(f"resume={cfg.resume}: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - any YAML or file error
        raise UsageError(f"resume: cannot read {saved_path}: {one_line(err)}") from None
    if not isinstance(saved, DictConfig):
        raise UsageError(f"resume: {saved_path} is not a mapping of settings")
    given = {o.key_or_group for o in parsed} - {"resume"}
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


def train_config(argv: list[str]):
    """The config `es-l2o-train argv` runs with (composed without Hydra's app
    machinery; for scripts and tests)."""
    return resumed_config(compose("config", argv), argv)


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
        try:
            theta = lopt.embed_theta(saved, theta)
        except ValueError:
            raise UsageError(
                f"init_theta={path} holds a {saved.name!r} optimizer with config "
                f"{saved.config()}, whose theta does not fit this run's "
                f"{lopt.name!r} with {lopt.config()}: give lopt settings of the "
                "same sizes"
            ) from None
        print(f"init_theta={path}: embedded in {lopt!r}", flush=True)
        return theta
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
    _positive_int(cfg, "es.population_size")
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


def _collaborators(
    cfg, settings: _TrainSettings, run_dir: Path, lopt, estimator, digest: str
):
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
        metadata={"seed": int(cfg.seed), "config_sha256": digest},
        on_checkpoint=on_checkpoint,
    )
    return log, checkpointer


def _meta_train(run_dir: Path, num_iterations: int, **loop):
    """`meta.train(**loop)`, its failures turned into a UsageError or `Stopped`."""
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
        raise Stopped(
            f"stopped by {signal.Signals(err.signum).name} after iteration "
            f"{err.iteration} of {num_iterations}; checkpoint: "
            f"{err.checkpoint or ckpt.latest(checkpoint_dir)}. Resume with: "
            f"es-l2o-train resume={run_dir}",
            SIGNAL_EXIT_BASE + err.signum,
        ) from None
    except KeyboardInterrupt:
        raise Stopped(
            "stopped at once by a second Ctrl-C, without a checkpoint; resume from "
            f"the last one with: es-l2o-train resume={run_dir}",
            SIGNAL_EXIT_BASE + 2,
        ) from None
    except NonFiniteThetaError as err:
        raise Stopped(str(err), 1) from None
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        _stop_after_lost_process(err, run_dir, checkpoint_dir)


def _learned_nothing(result, summary: dict) -> str | None:
    """Why the run learned nothing (None if it learned): every iteration had
    non-finite inner steps and the exported optimizer's loss is not finite."""
    history = result.history
    if not history or not all(r.get("nonfinite_steps", 0) > 0 for r in history):
        return None
    rows = summary.get("families", {"": summary})
    losses = [r["rows"]["learned"].get("train_loss") for r in rows.values()]
    if all(v is not None and math.isfinite(v) for v in losses):
        return None
    steps = sum(int(r["nonfinite_steps"]) for r in history)
    return (
        f"the run learned nothing: inner steps diverged (non-finite loss or "
        f"parameters) in every one of its {len(history)} iterations ({steps} steps "
        f"in all), and the exported optimizer's training loss on the evaluation "
        f"tasks is not finite; make its steps smaller (lopt.step_mult, lopt's "
        f"initialisation) or perturb less (es.std)"
    )


def _export_and_compare(cfg, run_dir, lopt, family, systems, result, seconds):
    """Exports the best theta to optimizer.safetensors and compares it with Adam;
    a UsageError when the run learned nothing."""
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
        summary = {
            "families": _compare_families(
                family, optimizer, horizon, cfg.evaluation, run_dir
            )
        }
    else:
        summary = _compare(family, optimizer, horizon, cfg.evaluation, run_dir)
    reason = _learned_nothing(result, summary)
    if reason is not None:
        raise UsageError(reason)


def _run_dir(cfg, output_dir: Path | None) -> tuple[Path, bool]:
    """The run's folder and whether it may move to a free neighbour (only the
    default one, Hydra's output folder, when neither run_dir nor resume is given)."""
    if cfg.get("run_dir") not in (None, ""):
        return Path(str(cfg.run_dir)).expanduser().resolve(), False
    if output_dir is None:
        raise UsageError("run_dir is not set: give run_dir=FOLDER")
    return Path(output_dir).resolve(), cfg.get("resume") in (None, "")


def run_train(cfg, output_dir: Path | None = None) -> Path:
    """Meta-trains, exports and evaluates as `cfg` says; returns the run directory.

    The run directory is `cfg.run_dir`, else `output_dir` (Hydra's output folder).
    With `cfg.resume` set (see `resumed_config`) the run continues from the newest
    checkpoint in its `checkpoints/` folder, appending to its metrics.jsonl.
    """
    from es_l2o import sharding

    # the multi-host runtime must start before anything touches a JAX device
    _start_processes(cfg)
    settings = _train_settings(cfg)
    run_dir, may_move = _run_dir(cfg, output_dir)
    family, lopt = instantiate(cfg.population), instantiate(cfg.lopt)
    systems = _systems(cfg, family, lopt)
    estimator = _estimator(cfg, family, systems)
    # process 0 claims the folder for the run; the others share it
    claim = claim_run_dir(run_dir, may_move) if sharding.is_main_process() else None
    try:
        if claim is not None and claim.path != run_dir:
            print(f"{run_dir} is in use by another run; this one uses {claim.path}")
        run_dir = run_dir if claim is None else claim.path
        return _train_in(cfg, settings, run_dir, family, lopt, systems, estimator)
    finally:
        release(claim)


def _train_in(cfg, settings, run_dir, family, lopt, systems, estimator) -> Path:
    import jax

    from es_l2o import sharding

    newest = _newest_checkpoint(run_dir, settings)
    digest = start_run_dir(cfg, run_dir, newest)
    key_theta, key_meta = jax.random.split(jax.random.key(int(cfg.seed)))
    theta0 = _initial_theta(cfg, lopt, key_theta)
    log, checkpointer = _collaborators(cfg, settings, run_dir, lopt, estimator, digest)
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


def _file_metadata(path: str) -> dict:
    """The metadata an optimizer file records (horizon, population, ...)."""
    from es_l2o import export

    if not os.path.isfile(path):
        raise UsageError(f"no optimizer file at {path!r}")
    try:
        return export.load_theta(path)[2]
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None


def _eval_horizon(cfg, path: str) -> int:
    """`horizon` if given, else the horizon the optimizer file records."""
    if cfg.get("horizon") is not None:
        return _positive_int(cfg, "horizon")
    recorded = _file_metadata(path).get("horizon")
    if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1:
        raise UsageError(
            f"{path} records no horizon ({recorded!r}); give horizon=STEPS"
        )
    print(f"horizon={recorded} (recorded in {path})", flush=True)
    return recorded


def run_eval(path: str, cfg) -> dict:
    """Compares the optimizer saved at `path` with Adam as `cfg` says (the horizon
    the file records unless `cfg.horizon` is given)."""
    from omegaconf import OmegaConf

    from es_l2o import export

    suite = OmegaConf.select(cfg, "suite", default=None)
    if suite is not None:
        return _run_suite(path, cfg, str(suite))
    horizon = _eval_horizon(cfg, path)
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


def _train_task(cfg) -> None:
    """The Hydra task of es-l2o-train: one run in Hydra's output folder (or
    run_dir, or the resumed run's own)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run_train(resumed_config(cfg, list(hydra_cfg.overrides.task)), output_dir)
    except UsageError:
        if all(cfg.get(k) in (None, "") for k in ("run_dir", "resume")):
            remove_empty(output_dir)  # Hydra's own folder, made for this run
        raise
    except OSError as err:
        if err.filename is not None:
            raise
        folder = cfg.get("resume") or cfg.get("run_dir") or output_dir
        raise UsageError(
            f"cannot write the run's files in {folder}: {err.strerror or err}"
        ) from None


def train_main(argv: list[str] | None = None) -> int:
    """`es-l2o-train [HYDRA FLAGS] [OVERRIDE ...]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return stopping_lines(
        "es-l2o-train", lambda: run_app("es-l2o-train", "config", _train_task, argv)
    )


def _eval_task(cfg) -> None:
    """The Hydra task of es-l2o-eval."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("optimizer_file") in (None, ""):
        raise UsageError(
            "missing OPTIMIZER_FILE: es-l2o-eval OPTIMIZER_FILE [OVERRIDE ...]"
        )
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.get("output_dir") is None:
        cfg.output_dir = hydra_cfg.runtime.output_dir  # one folder per job
    run_eval(str(cfg.optimizer_file), cfg)


def _quoted(value: str) -> str:
    """`value` as a quoted string of Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _eval_argv(argv: list[str]) -> list[str]:
    """es-l2o-eval's arguments as Hydra's: OPTIMIZER_FILE becomes
    `optimizer_file=...`, and the population the file records becomes
    `population=NAME` where a config of that name exists and none is given."""
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        return argv
    path, rest = argv[0], argv[1:]
    given = any(a.lstrip("+~").startswith("population=") for a in rest)
    if not given and os.path.isfile(path):
        try:
            name = _file_metadata(path).get("population")
        except UsageError:
            name = None  # the run names the damage
        if (
            isinstance(name, str)
            and (config_dir() / "population" / f"{name}.yaml").is_file()
        ):
            print(f"population={name} (recorded in {path})", flush=True)
            rest = [*rest, f"population={name}"]
    # after the given ones: Hydra's flags (-m, --cfg job) may come first there
    return [*rest, f"optimizer_file={_quoted(path)}"]


def eval_main(argv: list[str] | None = None) -> int:
    """`es-l2o-eval OPTIMIZER_FILE [HYDRA FLAGS] [OVERRIDE ...]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return stopping_lines(
        "es-l2o-eval",
        lambda: run_app("es-l2o-eval", "eval", _eval_task, _eval_argv(argv)),
    )


if __name__ == "__main__":
    sys.exit(train_main())
