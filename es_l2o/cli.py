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

USAGE_ERROR = 2
#: folded into meta-validation keys; meta-training and evaluation never fold it in
META_VALIDATION_STREAM = 0x3E7A_0A11


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


def _compare(family, optimizer, num_steps: int, evaluation, out_dir: Path) -> dict:
    from es_l2o import evaluate

    result = evaluate.compare_with_adam(
        family,
        optimizer,
        num_steps,
        num_tasks=int(evaluation.num_tasks),
        seed=int(evaluation.seed),
        learning_rates=list(evaluation.learning_rates),
        reference_learning_rate=float(evaluation.reference_learning_rate),
    )
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    print(evaluate.format_table(result))
    return result


def _meta_validation(system, estimator, settings):
    """theta -> mean meta-loss over fixed meta-validation tasks (one compile)."""
    import jax
    import jax.numpy as jnp

    from es_l2o.es.full_es import META_LOSSES, full_unroll

    meta_loss = str(settings.meta_loss)
    if meta_loss not in META_LOSSES:
        raise UsageError(
            f"meta_validation.meta_loss must be one of {META_LOSSES}, got {meta_loss!r}"
        )
    if meta_loss == "auto":
        meta_loss = "validation" if system.has_validation else "train_mean"
    keys = jax.random.split(
        jax.random.fold_in(jax.random.key(int(settings.seed)), META_VALIDATION_STREAM),
        _positive_int(settings, "num_tasks"),
    )
    num_steps = system.max_horizon

    @jax.jit
    def validate(theta):
        losses, _ = jax.vmap(
            lambda k: full_unroll(system, theta, k, num_steps, meta_loss)
        )(keys)
        return jnp.mean(losses)

    return validate


def run_train(cfg) -> Path:
    """Meta-trains, exports and evaluates as `cfg` says; returns the run directory."""
    import jax
    from omegaconf import OmegaConf

    from es_l2o import export
    from es_l2o.meta import meta_train
    from es_l2o.unroll import LOptTraining

    num_iterations = _positive_int(cfg, "num_iterations")
    family = instantiate(cfg.population)
    lopt = instantiate(cfg.lopt)
    system_kwargs = OmegaConf.to_container(cfg.system, resolve=True)
    system_kwargs["horizon"] = _horizon(system_kwargs.get("horizon"))
    try:
        system = LOptTraining(family, lopt, **system_kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"bad system settings {system_kwargs}: {err}") from None
    make_estimator = instantiate(cfg.es)
    try:
        estimator = make_estimator(system=system)
    except (TypeError, ValueError) as err:
        raise UsageError(
            f"cannot build the estimator {cfg.es._target_}: {err}"
        ) from None

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"run directory: {run_dir}", flush=True)

    key = jax.random.key(int(cfg.seed))
    key_theta, key_meta = jax.random.split(key)
    theta0 = lopt.init(key_theta)
    checkpoint_path = run_dir / "theta.eslo"

    def on_checkpoint(iteration, state):
        export.save(checkpoint_path, lopt, estimator.theta(state), iteration=iteration)

    validate = None
    every = int(cfg.meta_validation.every)
    if every > 0:
        validate = _meta_validation(system, estimator, cfg.meta_validation)
    start = time.perf_counter()
    result = meta_train(
        estimator,
        theta0,
        key=key_meta,
        num_iterations=num_iterations,
        metrics_path=run_dir / "metrics.jsonl",
        progress=bool(cfg.progress),
        on_checkpoint=on_checkpoint,
        checkpoint_every=int(cfg.checkpoint_every),
        validate=validate,
        validate_every=every,
    )
    train_seconds = time.perf_counter() - start
    horizon = system.max_horizon
    optimizer_path = run_dir / "optimizer.eslo"
    export.save(
        optimizer_path,
        lopt,
        result.best_theta,
        population=family.name,
        horizon=horizon,
        num_iterations=num_iterations,
        iteration=result.best_iteration,
        meta_validation_loss=result.best_validation_loss,
        seed=int(cfg.seed),
    )
    print(
        f"meta-trained {num_iterations} iterations in {train_seconds:.1f} s; exported "
        f"the theta of iteration {result.best_iteration} (meta-validation loss "
        f"{result.best_validation_loss:.4g}) to {optimizer_path}",
        flush=True,
    )
    optimizer = export.load(optimizer_path, num_steps=horizon)
    _compare(family, optimizer, horizon, cfg.evaluation, run_dir)
    print(f"run directory: {run_dir}")
    return run_dir


def run_eval(path: str, cfg) -> dict:
    """Compares the optimizer saved at `path` with Adam as `cfg` says."""
    from es_l2o import export

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


def _main(program: str, body) -> int:
    try:
        body()
    except UsageError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """`es-l2o-train [OVERRIDE ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return _main("es-l2o-train", lambda: run_train(compose("config", argv)))


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
