"""Optimizee task populations: task families that meta-training samples.

Sampling has two levels. The *structure* (architecture, sizes, batch size,
activation, data) is fixed in Python when a family is constructed; a family's
`sample(key)` draws only the *per-task variation* as arrays of static shape
(initial scales, optima, condition numbers, noise levels, ...), so many tasks of
one structure train side by side under `jax.vmap`. Several structures are mixed
per meta-iteration by `mix.FamilyMixture`; `splits.SplitFamily` keeps the tasks of
meta-training, meta-validation and evaluation apart; `suites` lists evaluation
tasks as plain data.

`FAMILIES` maps each family's registry name to its class and `WRAPPERS` each
augmentation's name to its wrapper class; suites use these names.
"""

from populations.augment import GradientNoiseFamily, ReparamFamily
from populations.digits import (
    DigitsAutoencoderFamily,
    DigitsCNNFamily,
    DigitsMLPFamily,
    SoftmaxRegressionFamily,
)
from populations.functions import TestFunctionFamily
from populations.mix import FamilyMixture
from populations.quadratic import IllConditionedQuadraticFamily, QuadraticFamily
from populations.splits import SplitFamily
from populations.text import CharRNNFamily, CharTransformerFamily

FAMILIES = {
    "quadratic": QuadraticFamily,
    "quadratic_ill": IllConditionedQuadraticFamily,
    "test_function": TestFunctionFamily,
    "digits_softmax": SoftmaxRegressionFamily,
    "digits_mlp": DigitsMLPFamily,
    "digits_cnn": DigitsCNNFamily,
    "digits_autoencoder": DigitsAutoencoderFamily,
    "char_rnn": CharRNNFamily,
    "char_transformer": CharTransformerFamily,
}

WRAPPERS = {
    "reparam": ReparamFamily,
    "gradient_noise": GradientNoiseFamily,
}

__all__ = [
    "FAMILIES",
    "WRAPPERS",
    "CharRNNFamily",
    "CharTransformerFamily",
    "DigitsAutoencoderFamily",
    "DigitsCNNFamily",
    "DigitsMLPFamily",
    "FamilyMixture",
    "GradientNoiseFamily",
    "IllConditionedQuadraticFamily",
    "QuadraticFamily",
    "ReparamFamily",
    "SoftmaxRegressionFamily",
    "SplitFamily",
    "TestFunctionFamily",
]
