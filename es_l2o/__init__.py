"""es_l2o: learned optimizers meta-trained with evolution strategies, for optax."""

__version__ = "0.1.0"
