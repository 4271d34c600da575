"""Gradient-free meta-gradient estimators over any `UnrolledSystem`."""

from es_l2o.es.families import MultiFamilyES, MultiFamilyState, allocate_particles
from es_l2o.es.full_es import ESState, FullES
from es_l2o.es.pes import PES, NoiseReuseES, TruncatedES, TruncatedESState

ESTIMATORS = {
    "full_es": FullES,
    "pes": PES,
    "tes": TruncatedES,
    "nres": NoiseReuseES,
}

__all__ = [
    "ESTIMATORS",
    "ESState",
    "FullES",
    "MultiFamilyES",
    "MultiFamilyState",
    "NoiseReuseES",
    "PES",
    "TruncatedES",
    "TruncatedESState",
    "allocate_particles",
]
