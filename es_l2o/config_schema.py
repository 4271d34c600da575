"""Typed schemas of the Hydra configs: plain dataclasses that `es_l2o.hydra_config`
puts in Hydra's ConfigStore, so that a value of the wrong type or an unknown key is
refused naming the key (`es.population_size=eight`, `system.horizn=5`). Ranges that
a type cannot express (a positive population, an even one) are checked where the
config is used.

`TrainConfig` is the root of `es-l2o-train` (configs/config.yaml), `EvalConfig` of
`es-l2o-eval` (configs/eval.yaml); `FullESConfig` and `TruncatedESConfig` are the
bases of the `es/` options (the truncated estimators PES, TES and NRES share one).

Example:
    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.structured(SystemConfig)
    >>> cfg.stagger = "maybe"
    Traceback (most recent call last):
    ...
    omegaconf.errors.ValidationError: Value 'maybe' is not a valid bool (type str)
        full_key: stagger
        object_type=SystemConfig
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Adam's learning rates swept by the comparisons
LEARNING_RATES = [1.0e-4, 3.1623e-4, 1.0e-3, 3.1623e-3, 1.0e-2, 3.1623e-2, 1.0e-1]


def _adam(learning_rate: Any) -> Any:
    return field(
        default_factory=lambda: {
            "_target_": "optax.adam",
            "learning_rate": learning_rate,
        }
    )


@dataclass
class SystemConfig:
    """The unrolled system: `LOptTraining(population, lopt, **system)`."""

    horizon: Any = 50  # an int, or [low, high] drawn per episode as horizon_draw says
    # "episodes": log-uniform per episode; "steps": log-uniform per inner step
    horizon_draw: str = "episodes"
    stagger: bool = False
    # the loss a non-finite step scores; the estimators read it from here too
    nonfinite_penalty: float = 1000.0
    # a step whose loss exceeds this multiple of its episode's first fails too
    divergence_factor: float | None = None


@dataclass
class MetaValidationConfig:
    every: int = 10
    num_tasks: int = 16
    seed: int = 2
    meta_loss: str = "auto"


@dataclass
class EvaluationConfig:
    num_tasks: int = 8
    seed: int = 1
    learning_rates: list[float] = field(default_factory=lambda: list(LEARNING_RATES))
    reference_learning_rate: float = 1.0e-3


@dataclass
class ShardingConfig:
    num_devices: int | None = None
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_seconds: int | None = None


@dataclass
class TrainConfig:
    """The root of `es-l2o-train`; `lopt`, `es` and `population` come from their
    groups (the `es/` options have their own schemas below)."""

    lopt: Any = None
    es: Any = None
    population: Any = None
    seed: int = 0
    num_iterations: int = 300
    run_dir: str | None = None
    checkpoint_every: int = 25
    checkpoint_keep: int = 3
    resume: str | None = None
    init_theta: str | None = None
    # true or false, checked where used (OmegaConf's bool would take 3 as true)
    progress: Any = True
    tensorboard: Any = False
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    meta_validation: MetaValidationConfig = field(default_factory=MetaValidationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    # free-form settings an experiment carries for its analysis scripts
    scaling: Any = None


@dataclass
class EvalConfig:
    """The root of `es-l2o-eval`."""

    optimizer_file: str | None = None
    population: Any = None
    horizon: int | None = None
    output_dir: str | None = None
    suite: str | None = None
    suites: Any = None
    plots: Any = None
    num_seeds: int = 3
    speedup_cap: float = 2.0
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


@dataclass
class FullESConfig:
    """`es_l2o.es.FullES` (es=open_es)."""

    _target_: str = "es_l2o.es.FullES"
    _partial_: bool = True
    population_size: int = 32
    std: float = 0.01
    algorithm: str = "Open_ES"
    meta_loss: str = "auto"
    fitness_shaping: str = "centered_rank"
    nonfinite_penalty: float = "${system.nonfinite_penalty}"  # type: ignore[assignment]
    particle_chunk: int | None = None
    rank: int | None = None  # low-rank (EGGROLL) perturbations of theta matrices
    optimizer: Any = _adam(0.03)


@dataclass
class TruncatedESConfig:
    """The settings PES, TES and NRES share (es=pes|tes|nres)."""

    _target_: str = "es_l2o.es.PES"
    _partial_: bool = True
    population_size: int = 16  # 8 antithetic pairs
    std: float = 0.01
    truncation_length: int = 20  # inner steps per particle per meta-iteration
    meta_loss: str = "train_mean"
    loss_normalization: str = "none"
    nonfinite_penalty: float = "${system.nonfinite_penalty}"  # type: ignore[assignment]
    max_grad_norm: float | None = 10.0
    noise: str = "stored"
    pair_chunk: int | None = None
    rank: int | None = None  # low-rank perturbations of theta matrices (noise: stored)
    optimizer: Any = _adam(3.0e-4)
