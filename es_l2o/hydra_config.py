"""The Hydra configs: where they live, the schemas and resolver they use, composing
one and instantiating its nodes (Hydra's errors as UsageErrors)."""

from __future__ import annotations

import os
from pathlib import Path

from es_l2o.usage import UsageError, one_line


def config_dir() -> Path:
    """The folder of Hydra configs: installed beside the package, or the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UsageError(f"cannot find the configs folder near {here}")


def _output_dir(resume, run_dir, default) -> str:
    """Hydra's output folder of a run: the resumed run's own (if it is a folder:
    else the run refuses it, and Hydra should make nothing), `run_dir`, or the
    default."""
    if resume not in (None, ""):
        return str(resume) if os.path.isdir(str(resume)) else "."
    return str(run_dir) if run_dir not in (None, "") else str(default)


def register() -> None:
    """Puts the typed schemas (es_l2o.config_schema) in Hydra's ConfigStore and
    registers the `es_l2o.output_dir` resolver the configs use; idempotent."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from es_l2o import config_schema as schema

    if not OmegaConf.has_resolver("es_l2o.output_dir"):
        OmegaConf.register_new_resolver("es_l2o.output_dir", _output_dir)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=schema.TrainConfig)
    store.store(name="eval_schema", node=schema.EvalConfig)
    store.store(name="full_es_schema", node=schema.FullESConfig)
    store.store(name="truncated_es_schema", node=schema.TruncatedESConfig)


def compose(config_name: str, overrides: list[str]):
    """The composed config, or a UsageError naming the bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_dir(
            str(config_dir()), version_base=None, job_name="es_l2o"
        ):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(
            f"bad configuration ({' '.join(overrides)}): {one_line(err)}"
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
