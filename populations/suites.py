"""Evaluation suites as plain data: which tasks, how long, in or out of distribution.

A suite is a list of `SuiteEntry`: a family (a key of `populations.FAMILIES`) with
constructor kwargs, optional augmentation wrappers (keys of
`populations.WRAPPERS`, innermost first), a horizon, and a split tag:

- "iid": the same structure (family, kwargs and wrappers) as one of the families
  of the meta-training mixture `configs/population/mix.yaml`, at a horizon no
  longer than the meta-training horizon `META_TRAIN_HORIZON`;
- "ood": anything else: families left out of meta-training, wider or deeper
  networks, other sizes, or horizons 5x longer (`5 * META_TRAIN_HORIZON`).

Tests check these tags against `mix.yaml`. Either way the evaluated tasks are the
"meta_test" tasks of `populations.splits` (`build_eval(entry).enumerate(n)`), whose
ids meta-training never draws.

Example:
    >>> entries = get_suite("default")
    >>> len(entries) >= 12, len({e.family for e in entries}) >= 5
    (True, True)
    >>> family = build_eval(entries[0])
    >>> family.split, family.name
    ('meta_test', 'quadratic')
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from es_l2o.tasks import TaskFamily

#: horizon of the default meta-training configuration (`system.horizon`)
META_TRAIN_HORIZON = 100
#: out-of-distribution horizons are this many times longer
OOD_HORIZON_FACTOR = 5
SPLIT_TAGS = ("iid", "ood")


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
    """One evaluation task: a family, its settings, a horizon and a split tag."""

    name: str
    family: str
    kwargs: Mapping[str, Any]
    horizon: int
    split: str
    augment: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    def __post_init__(self):
        if self.split not in SPLIT_TAGS:
            raise ValueError(
                f"entry {self.name!r}: split must be one of {SPLIT_TAGS}, "
                f"got {self.split!r}"
            )
        if self.horizon < 1:
            raise ValueError(
                f"entry {self.name!r}: horizon must be >= 1, got {self.horizon}"
            )

    def eval_family(self):
        """This entry's family restricted to its held-out tasks (`build_eval`):
        what `es_l2o.evaluate.evaluate_entry` trains."""
        return build_eval(self)


def _entry(name, family, horizon, split, augment=(), **kwargs) -> SuiteEntry:
    return SuiteEntry(name, family, kwargs, horizon, split, tuple(augment))


H = META_TRAIN_HORIZON
H_LONG = OOD_HORIZON_FACTOR * META_TRAIN_HORIZON
_NOISE = (("gradient_noise", {"noise_std_range": (0.01, 0.1)}),)
_REPARAM = (("reparam", {"scale_range": (0.1, 10.0)}),)

#: meta-training structures (mirrors configs/population/mix.yaml), small for CPU
_QUAD = {"dim": 10}
_QUAD_ILL = {"dim": 10}
_ROSENBROCK = {"function": "rosenbrock", "dim": 2}
_SOFTMAX = {"batch_size": 32}
_MLP = {"hidden_sizes": (32,), "activation": "relu", "batch_size": 32}
_RNN = {"hidden_size": 32, "seq_len": 16, "batch_size": 16}

DEFAULT = [
    # in distribution: meta-training structures on held-out (meta_test) tasks
    _entry("quadratic_10d", "quadratic", H, "iid", **_QUAD),
    _entry("quadratic_ill_10d", "quadratic_ill", H, "iid", **_QUAD_ILL),
    _entry("rosenbrock_2d", "test_function", H, "iid", **_ROSENBROCK),
    _entry("digits_softmax", "digits_softmax", H, "iid", **_SOFTMAX),
    _entry("digits_mlp_32", "digits_mlp", H, "iid", **_MLP),
    _entry("digits_mlp_32_noisy", "digits_mlp", H, "iid", _NOISE, **_MLP),
    _entry("char_rnn_32", "char_rnn", H, "iid", **_RNN),
    # out of distribution: 5x longer horizons
    _entry("quadratic_10d_long", "quadratic", H_LONG, "ood", **_QUAD),
    _entry("digits_mlp_32_long", "digits_mlp", H_LONG, "ood", **_MLP),
    # out of distribution: wider / deeper / larger versions of trained families
    _entry(
        "quadratic_ill_1000d",
        "quadratic_ill",
        H,
        "ood",
        dim=1000,
        rotate=False,
        log10_condition_range=(1.0, 3.0),
    ),
    _entry(
        "digits_mlp_wide_deep",
        "digits_mlp",
        H,
        "ood",
        hidden_sizes=(128, 128),
        activation="relu",
        batch_size=32,
    ),
    # out of distribution: families and augmentations left out of meta-training
    _entry("rastrigin_10d", "test_function", H, "ood", function="rastrigin", dim=10),
    _entry("ackley_10d", "test_function", H, "ood", function="ackley", dim=10),
    _entry("digits_mlp_32_reparam", "digits_mlp", H, "ood", _REPARAM, **_MLP),
    _entry("digits_cnn", "digits_cnn", H, "ood", channels=(4, 8), batch_size=16),
    _entry(
        "digits_autoencoder",
        "digits_autoencoder",
        H,
        "ood",
        hidden_sizes=(32,),
        bottleneck=8,
        batch_size=32,
    ),
    _entry(
        "char_transformer",
        "char_transformer",
        H,
        "ood",
        d_model=32,
        num_layers=1,
        num_heads=2,
        seq_len=16,
        batch_size=16,
    ),
]

_GPU_LONG = 2000
LARGE = [
    # in distribution at the meta-training horizon
    *(e for e in DEFAULT if e.split == "iid"),
    # longer horizons
    _entry("quadratic_10d_long", "quadratic", H_LONG, "ood", **_QUAD),
    _entry("digits_mlp_32_long", "digits_mlp", H_LONG, "ood", **_MLP),
    _entry("char_rnn_32_long", "char_rnn", H_LONG, "ood", **_RNN),
    _entry("char_rnn_32_2000", "char_rnn", _GPU_LONG, "ood", **_RNN),
    # larger problems
    _entry("quadratic_100d", "quadratic", H_LONG, "ood", dim=100),
    _entry(
        "quadratic_ill_100d_1e6",
        "quadratic_ill",
        H_LONG,
        "ood",
        dim=100,
        log10_condition_range=(3.0, 6.0),
    ),
    _entry(
        "quadratic_ill_100000d",
        "quadratic_ill",
        H_LONG,
        "ood",
        dim=100_000,
        rotate=False,
    ),
    _entry(
        "rosenbrock_10d",
        "test_function",
        _GPU_LONG,
        "ood",
        function="rosenbrock",
        dim=10,
    ),
    _entry(
        "rastrigin_30d", "test_function", H_LONG, "ood", function="rastrigin", dim=30
    ),
    _entry("ackley_30d", "test_function", H_LONG, "ood", function="ackley", dim=30),
    _entry(
        "styblinski_tang_30d",
        "test_function",
        H_LONG,
        "ood",
        function="styblinski_tang",
        dim=30,
    ),
    _entry("digits_softmax_b256", "digits_softmax", _GPU_LONG, "ood", batch_size=256),
    _entry(
        "digits_mlp_256x3_gelu",
        "digits_mlp",
        _GPU_LONG,
        "ood",
        hidden_sizes=(256, 256, 256),
        activation="gelu",
        batch_size=128,
    ),
    _entry(
        "digits_mlp_128x2_tanh",
        "digits_mlp",
        _GPU_LONG,
        "ood",
        hidden_sizes=(128, 128),
        activation="tanh",
        batch_size=128,
    ),
    _entry(
        "digits_mlp_128_reparam_noisy",
        "digits_mlp",
        _GPU_LONG,
        "ood",
        (*_REPARAM, *_NOISE),
        hidden_sizes=(128,),
        batch_size=128,
    ),
    _entry(
        "digits_cnn_16_32_64",
        "digits_cnn",
        _GPU_LONG,
        "ood",
        channels=(16, 32, 64),
        batch_size=128,
    ),
    _entry(
        "digits_autoencoder_128_64",
        "digits_autoencoder",
        _GPU_LONG,
        "ood",
        hidden_sizes=(128, 64),
        bottleneck=16,
        batch_size=128,
    ),
    _entry(
        "char_gru_128",
        "char_rnn",
        _GPU_LONG,
        "ood",
        hidden_size=128,
        embed_size=32,
        cell="gru",
        seq_len=64,
        batch_size=64,
    ),
    _entry(
        "char_transformer_2x128",
        "char_transformer",
        _GPU_LONG,
        "ood",
        d_model=128,
        num_layers=2,
        num_heads=4,
        seq_len=64,
        batch_size=64,
    ),
]

_H_1000 = 1000
LONG = [
    # structures of both meta-training mixtures, 1,000 steps
    _entry("quadratic_ill_10d_1000", "quadratic_ill", _H_1000, "ood", **_QUAD_ILL),
    _entry("rosenbrock_2d_1000", "test_function", _H_1000, "ood", **_ROSENBROCK),
    _entry("digits_softmax_1000", "digits_softmax", _H_1000, "ood", **_SOFTMAX),
    _entry("digits_mlp_32_1000", "digits_mlp", _H_1000, "ood", **_MLP),
    _entry("char_rnn_32_1000", "char_rnn", _H_1000, "ood", **_RNN),
    # structures of neither
    _entry(
        "digits_mlp_wide_deep_1000",
        "digits_mlp",
        _H_1000,
        "ood",
        hidden_sizes=(128, 128),
        activation="relu",
        batch_size=32,
    ),
    _entry(
        "digits_autoencoder_1000",
        "digits_autoencoder",
        _H_1000,
        "ood",
        hidden_sizes=(32,),
        bottleneck=8,
        batch_size=32,
    ),
    _entry(
        "ackley_10d_1000", "test_function", _H_1000, "ood", function="ackley", dim=10
    ),
]

#: suite name -> entries
SUITES: dict[str, list[SuiteEntry]] = {"default": DEFAULT, "large": LARGE, "long": LONG}


def relabel(
    entries: Sequence[SuiteEntry],
    families: Sequence[Mapping[str, Any]],
    max_horizon: int,
) -> list[SuiteEntry]:
    """The entries with their split set for an optimizer meta-trained on
    `families` (Hydra-style family configs, as in a population config's
    `families`) at horizons up to `max_horizon`: "iid" where the structure is one of
    them and the horizon is no longer, "ood" elsewhere.

    Example:
        >>> node = {"_target_": "populations.quadratic.QuadraticFamily", "dim": 10}
        >>> [e.split for e in relabel(get_suite("default")[:2], [node], 100)]
        ['iid', 'ood']
    """
    trained = {config_structure(node) for node in families}
    return [
        dataclasses.replace(
            entry,
            split="iid"
            if entry_structure(entry) in trained and entry.horizon <= max_horizon
            else "ood",
        )
        for entry in entries
    ]


def get_suite(name: str) -> list[SuiteEntry]:
    """The entries of suite `name` (a copy of the list)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid: {sorted(SUITES)}")
    return list(SUITES[name])


def build(entry: SuiteEntry) -> TaskFamily:
    """The entry's family with its augmentations (not yet restricted to a split)."""
    from populations import FAMILIES, WRAPPERS

    if entry.family not in FAMILIES:
        raise ValueError(
            f"entry {entry.name!r}: unknown family {entry.family!r}; "
            f"valid: {sorted(FAMILIES)}"
        )
    family = FAMILIES[entry.family](**entry.kwargs)
    for wrapper, kwargs in entry.augment:
        if wrapper not in WRAPPERS:
            raise ValueError(
                f"entry {entry.name!r}: unknown augmentation {wrapper!r}; "
                f"valid: {sorted(WRAPPERS)}"
            )
        family = WRAPPERS[wrapper](family, **kwargs)
    return family


def build_eval(entry: SuiteEntry):
    """The entry's family restricted to the held-out "meta_test" tasks.

    An evaluator trains `build_eval(entry).enumerate(num_seeds)`: the same fixed
    tasks for every optimizer and learning rate, none of them ever sampled by
    meta-training.
    """
    from populations.splits import SplitFamily

    return SplitFamily(build(entry), "meta_test")


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _with_defaults(cls: type, kwargs: Mapping[str, Any], skip=()) -> dict:
    params = inspect.signature(cls).parameters
    unknown = set(kwargs) - set(params)
    if unknown:
        raise ValueError(
            f"{cls.__name__} takes no argument(s) {sorted(unknown)}; "
            f"valid: {sorted(params)}"
        )
    out = {k: p.default for k, p in params.items() if k not in skip}
    out.update({k: v for k, v in kwargs.items() if k not in skip})
    return _plain(out)


def structure(cls: type, kwargs: Mapping[str, Any], augment=()) -> str:
    """A canonical string for a family's structure: class, all arguments with
    defaults filled in, and augmentations (names and arguments, innermost first).
    Equal strings mean equal structures.

    Example:
        >>> from populations.quadratic import QuadraticFamily
        >>> structure(QuadraticFamily, {}) == structure(QuadraticFamily, {"dim": 10})
        True
    """
    from populations import WRAPPERS

    wrappers = [
        [name, _with_defaults(WRAPPERS[name], kw, skip=("family",))]
        for name, kw in augment
    ]
    return json.dumps(
        {
            "family": f"{cls.__module__}.{cls.__qualname__}",
            "kwargs": _with_defaults(cls, kwargs),
            "augment": wrappers,
        },
        sort_keys=True,
    )


def entry_structure(entry: SuiteEntry) -> str:
    """`structure` of a suite entry."""
    from populations import FAMILIES

    return structure(FAMILIES[entry.family], entry.kwargs, entry.augment)


def config_structure(node: Mapping[str, Any]) -> str:
    """`structure` of a Hydra-style family config (a plain dict with `_target_`,
    wrappers holding the wrapped config under `family`), e.g. one entry of
    `families` in configs/population/mix.yaml.
    """
    from populations import WRAPPERS

    wrapper_names = {f"{c.__module__}.{c.__qualname__}": n for n, c in WRAPPERS.items()}
    augment = []
    node = dict(node)
    while node["_target_"] in wrapper_names:
        kwargs = {k: v for k, v in node.items() if k not in ("_target_", "family")}
        augment.append((wrapper_names[node["_target_"]], kwargs))
        node = dict(node["family"])
    module_name, _, class_name = node.pop("_target_").rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return structure(cls, node, tuple(reversed(augment)))
