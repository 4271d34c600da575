"""Gradient-free meta-gradient estimators over any `UnrolledSystem`.

`FullES` scores full unrolls; the truncated family (`PES`, `TruncatedES`,
`NoiseReuseES`, all one `TruncatedEstimator` with another `es_l2o.es.weighting`
rule) scores truncations of long ones, with its noise kept as stored rows or
regenerated from keys (`es_l2o.es.noise`). All offer the `Estimator` protocol;
`MultiFamilyES` combines one per task family over a shared theta.
"""

from es_l2o.es.estimator import Estimator
from es_l2o.es.families import (
    MultiFamilyES,
    MultiFamilyState,
    allocate_particles,
    family_state,
)
from es_l2o.es.full_es import ESState, FullES
from es_l2o.es.truncated import (
    PES,
    NoiseReuseES,
    TruncatedES,
    TruncatedESState,
    TruncatedEstimator,
)

ESTIMATORS = {
    "full_es": FullES,
    "pes": PES,
    "tes": TruncatedES,
    "nres": NoiseReuseES,
}

__all__ = [
    "ESTIMATORS",
    "ESState",
    "Estimator",
    "FullES",
    "MultiFamilyES",
    "MultiFamilyState",
    "NoiseReuseES",
    "PES",
    "TruncatedES",
    "TruncatedESState",
    "TruncatedEstimator",
    "allocate_particles",
    "family_state",
]
