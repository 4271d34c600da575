"""Gradient-free meta-gradient estimators over any `UnrolledSystem`."""

from es_l2o.es.full_es import ESState, FullES

ESTIMATORS = {"full_es": FullES}

__all__ = ["ESTIMATORS", "ESState", "FullES"]
