"""Learned optimizers: architectures whose weights are meta-learned.

`LOPTS` maps each architecture's name to its class; export files and configs refer
to architectures by these names.
"""

from es_l2o.lopt.base import LearnedOptimizer, check_num_steps
from es_l2o.lopt.deep_momentum import DeepMomentumLOpt
from es_l2o.lopt.hierarchical import HierarchicalLOpt
from es_l2o.lopt.lstm import LSTMLOpt
from es_l2o.lopt.mlp import MLPLOpt

LOPTS: dict[str, type[LearnedOptimizer]] = {
    MLPLOpt.name: MLPLOpt,
    HierarchicalLOpt.name: HierarchicalLOpt,
    LSTMLOpt.name: LSTMLOpt,
    DeepMomentumLOpt.name: DeepMomentumLOpt,
}


def get_lopt_class(name: str) -> type[LearnedOptimizer]:
    """The architecture registered as `name`; a clear error names the valid ones."""
    try:
        return LOPTS[name]
    except KeyError:
        raise ValueError(
            f"unknown learned-optimizer architecture {name!r}; valid: {sorted(LOPTS)}"
        ) from None


__all__ = [
    "LOPTS",
    "DeepMomentumLOpt",
    "HierarchicalLOpt",
    "LSTMLOpt",
    "LearnedOptimizer",
    "MLPLOpt",
    "check_num_steps",
    "get_lopt_class",
]
