"""Task populations: vmapping, training under Adam, splits, augmentations, mixtures.

Every family is compiled once (module-level cache) into one function that samples 3
tasks, trains them with Adam and measures them, all under `jax.vmap`.
"""

from __future__ import annotations

import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from es_l2o.baselines import get_baseline
from es_l2o.tasks import TaskFamily
from populations import FAMILIES, WRAPPERS, suites
from populations import functions as fn_mod
from populations.augment import (
    GradientNoiseFamily,
    ReparamFamily,
    noisy_gradient,
    rebatch,
)
from populations.digits import (
    DigitsAutoencoderFamily,
    DigitsCNNFamily,
    DigitsMLPFamily,
    SoftmaxRegressionFamily,
    conv2d_same,
    digits_splits,
)
from populations.mix import FamilyMixture
from populations.quadratic import IllConditionedQuadraticFamily, QuadraticFamily
from populations.splits import (
    SPLITS,
    SplitFamily,
    config_key,
    draw_task_id,
    id_range,
    init_key,
    split_of,
)
from populations.text import (
    VOCAB_SIZE,
    CharRNNFamily,
    CharTransformerFamily,
    _load_text,
    char_corpus,
    encode,
)

# these tests run tiny programs once: XLA's cheapest optimisation level compiles
# them ~3x faster for the same results
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "population")
NUM_TASKS = 3
NUM_STEPS = 60

# name -> (factory, Adam learning rate); tiny sizes keep every compile short
FAMILY_CASES = {
    "quadratic": (lambda: QuadraticFamily(10), 0.1),
    "quadratic_ill": (lambda: IllConditionedQuadraticFamily(10), 0.1),
    "quadratic_ill_diag": (
        lambda: IllConditionedQuadraticFamily(300, rotate=False),
        0.1,
    ),
    "rosenbrock": (lambda: fn_mod.TestFunctionFamily("rosenbrock", 2), 0.1),
    "rastrigin": (lambda: fn_mod.TestFunctionFamily("rastrigin", 5), 0.02),
    "ackley": (lambda: fn_mod.TestFunctionFamily("ackley", 5), 0.05),
    "styblinski_tang": (lambda: fn_mod.TestFunctionFamily("styblinski_tang", 5), 0.1),
    "digits_softmax": (lambda: SoftmaxRegressionFamily(batch_size=16), 0.03),
    "digits_mlp": (
        lambda: DigitsMLPFamily((16, 16), activation="tanh", batch_size=16),
        0.01,
    ),
    "digits_cnn": (lambda: DigitsCNNFamily((4, 8), batch_size=8), 0.1),
    "digits_autoencoder": (
        lambda: DigitsAutoencoderFamily((16,), 4, batch_size=16),
        0.01,
    ),
    "char_rnn": (
        lambda: CharRNNFamily(16, 8, "gru", seq_len=8, batch_size=8, eval_windows=8),
        0.03,
    ),
    "char_transformer": (
        lambda: CharTransformerFamily(
            16, 1, 2, seq_len=8, batch_size=8, eval_windows=8
        ),
        0.03,
    ),
    "reparam": (lambda: ReparamFamily(SoftmaxRegressionFamily(batch_size=16)), 0.03),
    "gradient_noise": (
        lambda: GradientNoiseFamily(QuadraticFamily(10), (0.1, 1.0)),
        0.1,
    ),
}
DATA_CASES = [
    n
    for n in FAMILY_CASES
    if n.startswith(("digits", "char")) or n == "reparam"  # reparam wraps softmax
]


def _train(family: TaskFamily, lr: float, cfg, key):
    """Figures of one task before and after NUM_STEPS of Adam (leading axis 2)."""
    task = family.task(cfg)
    key_init, key_steps, key_eval = jax.random.split(key, 3)
    params = task.init(key_init)
    opt = get_baseline("adam")(lr)

    def body(carry, step_key):
        p, state = carry
        grads = jax.grad(task.loss)(p, step_key)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (final, _), _ = jax.lax.scan(
        body, (params, opt.init(params)), jax.random.split(key_steps, NUM_STEPS)
    )
    # one batched copy of the forward pass measures both ends (same keys)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, final)

    def measure(p):
        return {**task.metrics(p, key_eval), "eval_loss": task.eval_loss(p, key_eval)}

    return jax.vmap(measure)(both)


def run_once(fn, *args):
    """`jax.jit(fn)(*args)`, compiled with `FAST_COMPILE`, as numpy arrays."""
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)
    return jax.tree.map(np.asarray, compiled(*args))


@functools.cache
def trained(name: str):
    """Results of training NUM_TASKS vmapped tasks of FAMILY_CASES[name]."""
    factory, lr = FAMILY_CASES[name]
    family = factory()

    def run(key):
        return _train(family, lr, family.sample(jax.random.fold_in(key, 1)), key)

    keys = jax.random.split(jax.random.key(0), NUM_TASKS)
    return family, run_once(jax.vmap(run), keys)


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_family_vmaps_and_loss_falls_under_adam(name):
    family, out = trained(name)
    assert isinstance(family, TaskFamily)
    initial, final = out["train_loss"][:, 0], out["train_loss"][:, 1]
    assert initial.shape == (NUM_TASKS,)
    for value in jax.tree.leaves(out):
        assert np.all(np.isfinite(value)), name
    # every one of the three tasks improves (on the same data before and after)
    assert np.all(final < 0.9 * initial), (name, initial, final)
    # the three sampled tasks are different tasks
    assert len(np.unique(np.round(initial, 6))) == NUM_TASKS


@pytest.mark.parametrize("name", DATA_CASES)
def test_data_tasks_report_validation_and_test(name):
    family, out = trained(name)
    assert family.has_validation
    final = jax.tree.map(lambda x: x[:, 1], out)
    for split in ("train", "val", "test"):
        assert final[f"{split}_loss"].shape == (NUM_TASKS,)
    np.testing.assert_allclose(final["eval_loss"], final["val_loss"], rtol=1e-5)
    if name != "digits_autoencoder":
        for split in ("train", "val", "test"):
            accuracy = final[f"{split}_accuracy"]
            assert np.all((accuracy >= 0) & (accuracy <= 1))
        # trained classifiers beat chance on held-out data
        chance = 1 / VOCAB_SIZE if name.startswith("char") else 0.1
        assert np.all(final["val_accuracy"] > 1.5 * chance), final


def test_families_without_data_have_no_validation():
    for name in ("quadratic_ill", "rosenbrock"):
        family, _ = trained(name)
        assert not family.has_validation
        assert not family.task(family.sample(jax.random.key(0))).has_validation


def test_registry_covers_every_family_class():
    assert len(FAMILIES) >= 9
    for name, cls in FAMILIES.items():
        assert issubclass(cls, TaskFamily), name
    assert set(WRAPPERS) == {"reparam", "gradient_noise"}


# --- data splits -------------------------------------------------------------


def test_digits_splits_are_disjoint_and_complete():
    data = digits_splits()
    rows = {
        name: {
            (tuple(np.round(x, 5)), int(y))
            for x, y in zip(*map(np.asarray, s), strict=True)
        }
        for name, s in data._asdict().items()
    }
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    assert sum(len(r) for r in rows.values()) == 1797


def test_text_corpus_split_is_a_contiguous_partition():
    corpus = char_corpus()
    parts = [np.asarray(p) for p in corpus]
    np.testing.assert_array_equal(
        np.concatenate(parts), encode(_load_text("pydoc_topics"))
    )
    assert all(p.size > 10_000 for p in parts)
    assert max(int(p.max()) for p in parts) < VOCAB_SIZE
    assert encode("A\n~\u00e9").tolist() == [35, 1, 96, 0]


def test_text_batches_come_from_the_training_part_only():
    family = CharRNNFamily(16, 8, seq_len=8, batch_size=4, eval_windows=4)
    task = family.task(family.sample(jax.random.key(0)))
    batches = run_once(jax.vmap(task.batch), jax.random.split(jax.random.key(1), 50))
    train_text = np.asarray(family.corpus.train).tobytes()
    windows = np.asarray(batches).reshape(-1, 9).astype(np.uint8)
    assert all(w.tobytes() in train_text for w in windows)
    for name in ("val", "test"):
        part = np.asarray(getattr(family.corpus, name)).tobytes()
        for w in np.asarray(family.eval_windows[name]).astype(np.uint8):
            assert w.tobytes() in part


# --- task splits ---------------------------------------------------------------


def test_split_id_ranges_are_disjoint():
    ranges = [id_range(s) for s in SPLITS]
    for (_, high), (low, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert high == low
    assert ranges[-1][1] <= 2**32
    keys = jax.random.split(jax.random.key(0), 2000)
    for split in SPLITS:
        ids = np.asarray(jax.vmap(lambda k, s=split: draw_task_id(k, s))(keys))
        low, high = id_range(split)
        assert np.all((ids >= low) & (ids < high)), split
        assert {split_of(i) for i in ids[:50]} == {split}
    with pytest.raises(ValueError, match="meta_train"):
        id_range("train")


def test_task_keys_are_an_injective_function_of_the_id():
    ids = jnp.asarray([0, 1, 2**30, 2**31 + 5], jnp.uint32)
    cfg_data = np.asarray(jax.vmap(lambda i: jax.random.key_data(config_key(i)))(ids))
    init_data = np.asarray(jax.vmap(lambda i: jax.random.key_data(init_key(i)))(ids))
    np.testing.assert_array_equal(cfg_data[:, 1], np.asarray(ids))
    np.testing.assert_array_equal(init_data[:, 1], np.asarray(ids))
    assert np.all(cfg_data[:, 0] == 0) and np.all(init_data[:, 0] == 1)


def test_meta_training_never_samples_an_evaluation_task():
    family = QuadraticFamily(10)
    train = SplitFamily(family, "meta_train")
    test = SplitFamily(family, "meta_test")
    sampled, held_out = run_once(
        lambda keys: (jax.vmap(train.sample)(keys), test.enumerate(100)),
        jax.random.split(jax.random.key(0), 1000),
    )
    assert not set(np.asarray(sampled.task_id)) & set(np.asarray(held_out.task_id))
    train_w = {np.asarray(w).tobytes() for w in sampled.cfg.w}
    test_w = {np.asarray(w).tobytes() for w in held_out.cfg.w}
    assert len(test_w) == 100 and not train_w & test_w
    # evaluation tasks are a fixed list: enumerate is reproducible
    again = run_once(lambda: test.enumerate(3, start=1))
    np.testing.assert_array_equal(again.cfg.w, held_out.cfg.w[1:4])


def test_split_task_initialisation_is_part_of_its_identity():
    family = SplitFamily(DigitsMLPFamily((8,), batch_size=8), "meta_test")
    cfgs = family.enumerate(2)
    task_0 = family.task(jax.tree.map(lambda x: x[0], cfgs))
    task_1 = family.task(jax.tree.map(lambda x: x[1], cfgs))
    a = task_0.init(jax.random.key(0))["layer_0"]["w"]
    b = task_0.init(jax.random.key(1))["layer_0"]["w"]
    c = task_1.init(jax.random.key(0))["layer_0"]["w"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert family.has_validation and family.name == "digits_mlp"
    with pytest.raises(ValueError, match="do not fit"):
        family.enumerate(2**30 + 1)


# --- augmentations --------------------------------------------------------------


def test_reparam_scales_each_tensor_and_keeps_the_function():
    inner = DigitsMLPFamily((8,), batch_size=8)
    family = ReparamFamily(inner, scale_range=(0.01, 100.0))

    def compare(key):
        cfg = family.sample(key)
        task, inner_task = family.task(cfg), inner.task(cfg.cfg)
        params, inner_params = task.init(key), inner_task.init(key)
        values = (task.loss(params, key), inner_task.loss(inner_params, key))
        grads = jax.grad(task.loss)(params, key)
        inner_grads = jax.grad(inner_task.loss)(inner_params, key)
        return cfg.scales, values, grads, inner_grads

    scales, values, grads, inner_grads = run_once(compare, jax.random.key(0))
    scales = jax.tree.leaves(scales)
    assert len(scales) == 4 and len({float(s) for s in scales}) == 4
    assert all(0.01 <= float(s) <= 100.0 for s in scales)
    np.testing.assert_allclose(values[0], values[1], rtol=1e-5)
    # d/dp L(p * s) = s * L'(p * s): each tensor's gradient scales with its factor
    for g, gi, s in zip(
        jax.tree.leaves(grads), jax.tree.leaves(inner_grads), scales, strict=True
    ):
        np.testing.assert_allclose(g, gi * s, rtol=1e-4, atol=1e-6)


def test_gradient_noise_changes_gradients_not_values():
    inner = IllConditionedQuadraticFamily(2000, rotate=False)
    noisy = GradientNoiseFamily(inner, noise_std_range=(0.5, 0.5))
    silent = GradientNoiseFamily(inner, noise_std_range=(0.0, 0.0))

    def compare(key):
        cfg = noisy.sample(key)
        task, inner_task = noisy.task(cfg), inner.task(cfg.cfg)
        params = inner_task.init(key)
        keys = jax.random.split(key)
        value, grads = jax.value_and_grad(task.loss)(params, keys[0])
        inner_value, inner_grads = jax.value_and_grad(inner_task.loss)(params, keys[0])
        other = jax.grad(task.loss)(params, keys[1])
        quiet = jax.grad(silent.task(cfg._replace(noise_std=0.0)).loss)(params, keys[0])
        return value, inner_value, grads["x"], inner_grads["x"], other["x"], quiet["x"]

    value, inner_value, grads, clean, other, quiet = run_once(
        compare, jax.random.key(0)
    )
    assert float(value) == float(inner_value)
    noise = grads - clean
    assert abs(noise.std() - 0.5) < 0.05 and abs(noise.mean()) < 0.05
    assert not np.allclose(noise, other - clean)  # fresh noise for every key
    np.testing.assert_allclose(quiet, clean)
    g = jax.grad(lambda p: noisy_gradient(p, jax.random.key(0), 0.0).sum())
    np.testing.assert_array_equal(g(jnp.ones(3)), np.ones(3))


def test_rebatch_changes_the_batch_size_through_wrappers():
    family = ReparamFamily(SoftmaxRegressionFamily(batch_size=256))
    small = rebatch(family, 4)
    assert small.family.batch_size == 4 and family.family.batch_size == 256
    assert small.name == family.name

    def spreads(key):
        cfg = family.sample(key)
        params = family.task(cfg).init(key)
        keys = jax.random.split(key, 64)
        return [
            jnp.std(jax.vmap(fam.task(cfg).loss, in_axes=(None, 0))(params, keys))
            for fam in (small, family)
        ]

    small_spread, large_spread = run_once(spreads, jax.random.key(0))
    assert small_spread > 3 * large_spread
    with pytest.raises(ValueError, match="no batch size"):
        rebatch(QuadraticFamily(), 4)


# --- mixture -------------------------------------------------------------------


def test_mixture_picks_families_with_the_given_frequencies():
    families = [QuadraticFamily(2), QuadraticFamily(3), QuadraticFamily(4)]
    mixture = FamilyMixture(families, [1.0, 3.0, 0.0])
    assert len(mixture) == 3 and mixture[1] is families[1]
    picks = mixture.schedule(jax.random.key(0), 8000)
    counts = np.bincount(picks, minlength=3) / picks.size
    np.testing.assert_allclose(counts, [0.25, 0.75, 0.0], atol=0.02)
    assert int(mixture.choose(jax.random.fold_in(jax.random.key(0), 7))) == picks[7]
    for bad in ([1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0]):
        with pytest.raises(ValueError, match="weight"):
            FamilyMixture(families, bad)


def test_mixture_for_split_wraps_every_family():
    mixture = FamilyMixture([QuadraticFamily(2), DigitsMLPFamily((4,))], [1, 2])
    held = mixture.for_split("meta_valid")
    assert all(isinstance(f, SplitFamily) for f in held.families)
    assert all(f.split == "meta_valid" for f in held.families)
    assert held.weights == mixture.weights and held.names == mixture.names
    assert not mixture.has_validation


# --- suites and configs -----------------------------------------------------------


def test_default_suite_size_and_breadth():
    entries = suites.get_suite("default")
    assert len(entries) >= 12
    assert len({e.family for e in entries}) >= 5
    assert {e.split for e in entries} == {"iid", "ood"}
    for name in suites.SUITES:
        names = [e.name for e in suites.get_suite(name)]
        assert len(names) == len(set(names)), name
    with pytest.raises(ValueError, match="default"):
        suites.get_suite("nope")


@pytest.mark.parametrize("suite", sorted(suites.SUITES))
def test_suite_split_tags_agree_with_the_meta_training_mixture(suite):
    mix = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, "mix.yaml")))
    trained_structures = {suites.config_structure(node) for node in mix["families"]}
    for entry in suites.get_suite(suite):
        seen = suites.entry_structure(entry) in trained_structures
        in_distribution = seen and entry.horizon <= suites.META_TRAIN_HORIZON
        assert (entry.split == "iid") == in_distribution, entry.name
        if entry.split == "ood" and seen:  # a longer horizon makes it OOD
            assert entry.horizon >= 5 * suites.META_TRAIN_HORIZON, entry.name
        family = suites.build_eval(entry)
        assert family.split == "meta_test"
        assert isinstance(family.family, TaskFamily)


def test_every_population_config_instantiates():
    paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
    assert len(paths) >= 12
    for path in paths:
        obj = instantiate(OmegaConf.load(path))
        assert isinstance(obj, TaskFamily | FamilyMixture), path
    mix = instantiate(OmegaConf.load(os.path.join(CONFIG_DIR, "mix.yaml")))
    assert len(mix) >= 5 and abs(sum(mix.probabilities) - 1) < 1e-9


# --- building blocks ---------------------------------------------------------------


@pytest.mark.parametrize("stride,kernel", [(1, 3), (2, 3), (2, 2)])
def test_conv2d_same_matches_lax(stride, kernel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, 3, 5)).astype(np.float32)
    expected = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv2d_same(x, w, stride), expected, atol=1e-4)


def test_digits_mlp_initialisation_is_unchanged():
    family = DigitsMLPFamily((8,), batch_size=8)
    cfg = family.sample(jax.random.key(0))
    params = family.task(cfg).init(jax.random.key(1))
    _, sub = jax.random.split(jax.random.key(1))
    expected = cfg.init_scale / jnp.sqrt(64) * jax.random.normal(sub, (64, 8))
    np.testing.assert_allclose(params["layer_0"]["w"], expected, rtol=1e-6)


def test_constructors_name_bad_values():
    with pytest.raises(ValueError, match="function"):
        fn_mod.TestFunctionFamily("sphere")
    with pytest.raises(ValueError, match="divisible"):
        CharTransformerFamily(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="cell"):
        CharRNNFamily(cell="lstm")
    with pytest.raises(ValueError, match="log10_condition_range"):
        IllConditionedQuadraticFamily(log10_condition_range=(3, 1))
    with pytest.raises(ValueError, match="noise_std_range"):
        GradientNoiseFamily(QuadraticFamily(), (0.0, 1.0))
