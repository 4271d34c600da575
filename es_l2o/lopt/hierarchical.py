"""A VeLO-style hierarchical learned optimizer (Metz et al. 2022, arXiv 2211.09760).

The expensive part runs once per tensor, the cheap part once per parameter:

1. Per-tensor statistics (means and variances of the gradient, momenta and root
   second moment after dividing by the tensor's parameter RMS, the tensor's rank and
   size) plus training-progress and loss features form one input row per tensor.
2. A mix layer `Linear(x) + max_over_tensors(relu(Linear'(x)))` (the only exchange
   between tensors) feeds an LSTM whose weights are shared by every tensor and whose
   state (learned initial value) is kept per tensor.
3. The LSTM emits per tensor the coefficients that mix a bank of per-parameter MLP
   weight sets (a hypernetwork) and a step-size multiplier.
4. The generated MLP (two hidden layers of 4 units) reads ~30 Adafactor-style features
   of every parameter and outputs a direction `d` and a log-magnitude `m`; the step is
   `lr_mult * d * exp(exp_mult * m) * step_mult * max(rms(p), param_scale_floor)`.

The per-tensor network runs once for all tensors (a batch of rows). The
per-parameter work is one fused elementwise pass per tensor, which reads the gradient,
parameter and accumulators where they are (no flat copy of the pytree) with the
tensor's generated weights as scalars; inputs that are constant along a row or a
column (the factored second moments) enter the first layer once per row or column.

Each per-parameter feature channel is divided by a per-tensor scale of its base
quantity (rms of the gradient, of each momentum, of the root second moment, the
parameter RMS; ratios such as `m / sqrt(v)` are already scale-free). VeLO divides
every channel by its own tensor RMS; one reduction per channel costs more than the
rest of the update on a CPU, and per-tensor scales give the same invariance to
rescaling a tensor's gradient or parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_l2o.lopt import features as F
from es_l2o.lopt.base import (
    LearnedOptimizer,
    check_hidden_sizes,
    check_num_steps,
    checked_transformation,
)
from es_l2o.lowrank import dense, has_perturbed


class HierarchicalState(NamedTuple):
    """Optimizer state.

    count: steps taken. Per group of tensors (`features.ShapeGroups` over their
    `matrix_view`): momenta `(members, num_momenta, *view)`, second_moment
    `(members, *view)` and factored row / column second moments
    (`features.FactoredMoments`). loss: loss EMAs.
    tensor_means: per-tensor means of each momentum and of the second moment,
    shape (num_momenta + 1, num_tensors): EMAs are linear, so these are EMAs of the
    per-tensor mean gradient and squared gradient, with no pass over the parameters.
    lstm_h, lstm_c: the per-tensor LSTM state, shape (num_tensors, lstm_size).
    initial_rms: each tensor's parameter RMS at the first update, shape
    (num_tensors,): the step's scale with `step_scale="initial"`.
    log_step: each tensor's learned log step multiplier, shape (num_tensors,):
    stays 0 unless `step_adaptation` is on.
    """

    count: jax.Array
    momenta: tuple[jax.Array, ...]
    second_moment: tuple[jax.Array, ...]
    factored: tuple[F.FactoredMoments, ...]
    loss: F.LossEMAState
    tensor_means: jax.Array
    lstm_h: jax.Array
    lstm_c: jax.Array
    initial_rms: jax.Array
    log_step: jax.Array


STEP_SCALES = ("param", "initial")
SCHEDULES = ("constant", "cosine")
#: `step_adaptation`: the per-tensor log step moves at most this much per step ...
LOG_STEP_RATE = 0.1
#: ... and stays within +- this bound (a factor of e**3, about 20, either way)
LOG_STEP_BOUND = 3.0


def schedule_factor(schedule: str, count, num_steps) -> jax.Array:
    """The fixed step-size schedule at step `count` of `num_steps` (traced or not).

    "constant" is 1; "cosine" decays from 1 to 0.1 over the run (the LSTM's
    `lr_mult` modulates either).

    Example:
        >>> [round(float(schedule_factor("cosine", t, 100)), 3) for t in (0, 50, 100)]
        [1.0, 0.55, 0.1]
    """
    if schedule == "constant":
        return jnp.ones((), jnp.float32)
    frac = jnp.clip(
        jnp.asarray(count, jnp.float32)
        / jnp.maximum(jnp.asarray(num_steps, jnp.float32), 1.0),
        0.0,
        1.0,
    )
    return 0.1 + 0.45 * (1.0 + jnp.cos(jnp.pi * frac))


class ParamFeatures(NamedTuple):
    """One tensor's per-parameter MLP inputs, by how they vary.

    entries: `(input index, array, scale)`: input = scale * array, per entry.
    products: `(factor, terms)`: each term `(input index, array or None, scale)` is
    the input `factor * scale * array` (`factor * scale` where array is None).
    rows / cols: `{input index: (batch, rows) or (batch, cols)}`, inputs that are
    constant along a row or a column.
    """

    entries: list
    products: list
    rows: dict
    cols: dict


class _NormalStream:
    """Consecutive slices of one standard-normal draw.

    One random-number program compiles much faster than one per weight matrix.
    Without a key it only counts the draws (and returns zeros).
    """

    def __init__(self, key, total: int = 0):
        self.values = None if key is None else jax.random.normal(key, (total,))
        self.count = 0

    def __call__(self, shape) -> jax.Array:
        n = int(np.prod(shape))
        start, self.count = self.count, self.count + n
        if self.values is None:
            return jnp.zeros(shape)
        return self.values[start : start + n].reshape(shape)


def _dense(normals, fan_in, fan_out, scale=1.0):
    w = scale * normals((fan_in, fan_out)) / np.sqrt(max(fan_in, 1))
    return {"w": w, "b": jnp.zeros((fan_out,))}


def _one_of(what: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{what} must be one of {options}, got {value!r}")
    return value


def _mean_square(x: jax.Array, extent: jax.Array) -> jax.Array:
    """Mean of `x**2` over the true `extent` of a zero-padded `(batch, rows, cols)`."""
    inside = None
    for axis in range(x.ndim):
        index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
        ok = index < extent[axis]
        inside = ok if inside is None else inside & ok
    total = jnp.sum(jnp.where(inside, x * x, 0.0))
    return total / jnp.maximum(jnp.prod(extent), 1.0)


def alignment(sums) -> jax.Array:
    """Cosines between each tensor's (clipped) gradient and each momentum before
    the step, `(num_momenta, num_tensors)`; 0 where a momentum is still zero.

    Example:
        >>> sums = {"gm": jnp.array([[2.0, 0.0]]), "gc2": jnp.array([1.0]),
        ...         "mp2": jnp.array([[4.0, 0.0]])}
        >>> alignment(sums).tolist()
        [[1.0], [0.0]]
    """
    norms = jnp.sqrt(sums["gc2"][:, None] * sums["mp2"])
    cosine = sums["gm"] / jnp.maximum(norms, 1e-30)
    return jnp.clip(jnp.where(norms > 0, cosine, 0.0), -1.0, 1.0).T


def _saturate(total: jax.Array) -> jax.Array:
    """A sum over a tensor's raw gradient made safe: NaN -> 0, +-inf -> +-1e30."""
    return jnp.nan_to_num(total, nan=0.0, posinf=1e30, neginf=-1e30)


class HierarchicalLOpt(LearnedOptimizer):
    """Per-tensor LSTM hypernetwork over a per-parameter MLP (VeLO's design).

    Args:
        lstm_size: units of the per-tensor LSTM (VeLO: 512).
        bank_size: per-parameter MLP weight sets mixed per tensor (VeLO: 256).
        mix_size: width of the mix layer before the LSTM (VeLO: 512).
        hidden_sizes: hidden widths of the per-parameter MLP (VeLO: (4, 4)).
        momentum_decays: decays of the momentum accumulators.
        second_moment_decay: decay of the diagonal second moment.
        factored_decays: decays of the factored row / column second moments.
        exp_mult: alpha in `d * exp(alpha * m)`.
        step_mult: beta, the base step relative to the parameter scale.
        param_scale_floor: floor on `rms(p)` so that zero-initialised tensors move.
        bank_noise: spread of the bank members around their shared initialisation.
        step_scale: what `rms(p)` in the step is: "param", the tensor's current
            RMS (a relative step: a tensor that keeps moving outwards grows
            geometrically), or "initial", its RMS at the first update (steps of a
            fixed size per tensor, as Adam's: growth at most linear in the steps).
        normalize_update: divide each tensor's MLP output `d * exp(alpha * m)` by its
            RMS (Celo2's normalised update), so that the step's RMS is exactly
            `lr_mult * step_mult * scale * schedule`: the MLP sets the shape of the
            step, the per-tensor LSTM its size.
        schedule: a fixed step-size schedule under `lr_mult` (`SCHEDULES`).
        step_floor: floor on the step's scale (default: `param_scale_floor`), so
            that zero-initialised tensors (biases, output layers) take steps of a
            useful size while `param_scale_floor` keeps the features' normaliser.
        weight_decay: decoupled decay: each step also subtracts
            `weight_decay * lr_mult * step_mult * schedule * p`, as AdamW's does.
        step_adaptation: learned per-tensor step-size adaptation. The LSTM also
            reads, per tensor, the cosine between the gradient and each momentum
            before this step (positive: consecutive steps agree, the step may grow;
            negative: they oscillate, it should shrink; the signal of hypergradient
            descent) and the tensor's current log step `s`. Each step `s` moves by
            `LOG_STEP_RATE * tanh(u)`, within `+-LOG_STEP_BOUND`, and multiplies
            `lr_mult` by `exp(s)`; `u` is a head output of the LSTM plus a linear
            function of those cosines (`theta["step_control"]`). Everything it adds
            to theta starts at zero, so the untrained optimizer, or an embedded one
            (`embed_theta`), steps exactly as it would without it.
        step_shrink_rate: with `step_adaptation`, the rate at which `s` falls:
            `step_shrink_rate * tanh(u)` where `u < 0` (default `LOG_STEP_RATE`,
            the rate at which it rises). Larger, a step that grew too large for
            the curvature is undone in a few steps instead of tens ("grow slowly,
            shrink fast", as the bold driver heuristic does).
        floor_params: with it, a model of `N < floor_params` parameters raises its
            step floor to `step_floor * sqrt(floor_params / N)`, at most
            `floor_cap`: tuned Adam's learning rate falls with the model's size
            (0.1 on a 650-weight softmax regression, 0.03 on a 2,410-weight MLP,
            0.01 on a 26,000-weight one), while steps sized by each tensor's
            initial RMS alone are the same for all three. `N` is read from the
            parameters' shapes: the floor is a constant of each compiled program.
        floor_cap: the largest floor `floor_params` may raise the floor to.

    The initial `theta` behaves like momentum normalised by the root second moment
    (an Adam-like direction) with noise, so that meta-training starts from an
    optimizer that descends.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> lopt = HierarchicalLOpt(lstm_size=8, bank_size=2, mix_size=8)
        >>> opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
        >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
        >>> state = opt.init(params)
        >>> update = jax.jit(opt.update)  # one program, not op by op
        >>> updates, state = update(params, state, params, value=jnp.array(1.0))
        >>> jax.tree.map(jnp.shape, updates)
        {'b': (3,), 'w': (2, 3)}
    """

    name = "hierarchical"

    def __init__(
        self,
        lstm_size: int = 32,
        bank_size: int = 8,
        mix_size: int = 32,
        hidden_sizes: Sequence[int] = (4, 4),
        momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
        second_moment_decay: float = 0.999,
        factored_decays: Sequence[float] = (0.9, 0.99, 0.999),
        exp_mult: float = 0.001,
        step_mult: float = 0.01,
        param_scale_floor: float = 0.01,
        bank_noise: float = 0.1,
        step_scale: str = "param",
        normalize_update: bool = False,
        schedule: str = "constant",
        step_floor: float | None = None,
        weight_decay: float = 0.0,
        step_adaptation: bool = False,
        step_shrink_rate: float = LOG_STEP_RATE,
        floor_params: int | None = None,
        floor_cap: float = 0.5,
    ):
        for what, value in (
            ("lstm_size", lstm_size),
            ("bank_size", bank_size),
            ("mix_size", mix_size),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        self.lstm_size = int(lstm_size)
        self.bank_size = int(bank_size)
        self.mix_size = int(mix_size)
        self.hidden_sizes = check_hidden_sizes(hidden_sizes)
        self.momentum_decays = tuple(float(b) for b in momentum_decays)
        self.factored_decays = tuple(float(b) for b in factored_decays)
        for what, decays in (
            ("momentum_decays", self.momentum_decays),
            ("factored_decays", self.factored_decays),
        ):
            if not decays or not all(0.0 <= b < 1.0 for b in decays):
                raise ValueError(f"{what} must be one or more values in [0, 1)")
        if not 0.0 <= second_moment_decay < 1.0:
            raise ValueError(
                f"second_moment_decay must lie in [0, 1), got {second_moment_decay!r}"
            )
        if param_scale_floor <= 0:
            raise ValueError(
                f"param_scale_floor must be > 0, got {param_scale_floor!r}"
            )
        step_floor = param_scale_floor if step_floor is None else step_floor
        if step_floor <= 0 or weight_decay < 0:
            raise ValueError(
                f"step_floor must be > 0 and weight_decay >= 0, got {step_floor!r} "
                f"and {weight_decay!r}"
            )
        if not step_shrink_rate > 0:
            raise ValueError(f"step_shrink_rate must be > 0, got {step_shrink_rate!r}")
        self.step_shrink_rate = float(step_shrink_rate)
        if floor_params is not None and (
            int(floor_params) != floor_params or floor_params < 1
        ):
            raise ValueError(
                f"floor_params must be a positive integer or null, got {floor_params!r}"
            )
        if not floor_cap > 0:
            raise ValueError(f"floor_cap must be > 0, got {floor_cap!r}")
        self.floor_params = None if floor_params is None else int(floor_params)
        self.floor_cap = float(floor_cap)
        self.step_floor = float(step_floor)
        self.weight_decay = float(weight_decay)
        self.second_moment_decay = float(second_moment_decay)
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        self.param_scale_floor = float(param_scale_floor)
        self.bank_noise = float(bank_noise)
        self.step_scale = _one_of("step_scale", step_scale, STEP_SCALES)
        self.schedule = _one_of("schedule", schedule, SCHEDULES)
        self.normalize_update = bool(normalize_update)
        self.step_adaptation = bool(step_adaptation)
        fmas = F.mlp_multiply_adds(self._mlp_sizes)
        if fmas > F.FUSED_MAX_MULTIPLY_ADDS:
            raise ValueError(
                f"hidden_sizes {hidden_sizes!r} give the per-parameter MLP {fmas} "
                f"multiply-adds per parameter; at most {F.FUSED_MAX_MULTIPLY_ADDS} run "
                "as one fused pass (VeLO uses (4, 4); (8, 8) fits)"
            )

    def config(self):
        return {
            "lstm_size": self.lstm_size,
            "bank_size": self.bank_size,
            "mix_size": self.mix_size,
            "hidden_sizes": list(self.hidden_sizes),
            "momentum_decays": list(self.momentum_decays),
            "second_moment_decay": self.second_moment_decay,
            "factored_decays": list(self.factored_decays),
            "exp_mult": self.exp_mult,
            "step_mult": self.step_mult,
            "param_scale_floor": self.param_scale_floor,
            "bank_noise": self.bank_noise,
            "step_scale": self.step_scale,
            "normalize_update": self.normalize_update,
            "schedule": self.schedule,
            "step_floor": self.step_floor,
            "weight_decay": self.weight_decay,
            "step_adaptation": self.step_adaptation,
            "step_shrink_rate": self.step_shrink_rate,
            "floor_params": self.floor_params,
            "floor_cap": self.floor_cap,
        }

    # -- sizes ---------------------------------------------------------------------

    @property
    def num_param_features(self) -> int:
        """Per-parameter MLP inputs: 6 + 2 per momentum + 6 per factored decay."""
        return 6 + 2 * len(self.momentum_decays) + 6 * len(self.factored_decays)

    @property
    def num_tensor_features(self) -> int:
        """Per-tensor LSTM inputs: progress, loss and tensor statistics."""
        shared = len(F.PROGRESS_CENTERS) + F.LOSS_EMA_COUNT - 1
        stats = 6 + 2 * len(self.momentum_decays)  # g, momenta, sqrt(v), rms(p), size
        return shared + stats + F.MAX_RANK_FEATURE + 1 + self._num_adaptation_features

    @property
    def _num_adaptation_features(self) -> int:
        """Cosines of the gradient with each momentum, and the log step (last)."""
        return len(self.momentum_decays) + 1 if self.step_adaptation else 0

    @property
    def _num_head_outputs(self) -> int:
        """Bank coefficients, lr_mult, and the log step's drive if adapting."""
        return self.bank_size + 1 + int(self.step_adaptation)

    @property
    def _mlp_sizes(self) -> tuple[int, ...]:
        return (self.num_param_features, *self.hidden_sizes, 2)

    @property
    def _mlp_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        sizes = self._mlp_sizes
        shapes = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            shapes += [(f"w{i}", (a, b)), (f"b{i}", (b,))]
        return shapes

    @property
    def num_mlp_weights(self) -> int:
        """Weights of one per-parameter MLP (one bank member)."""
        return sum(int(np.prod(s)) for _, s in self._mlp_shapes)

    # -- meta-parameters -------------------------------------------------------------

    def init(self, key):
        # one compiled program instead of dozens of eagerly dispatched small ops
        return jax.jit(self._init)(key)

    def _init(self, key):
        counter = _NormalStream(None)
        self._build_theta(counter)  # counts the normal draws
        return self._build_theta(_NormalStream(key, counter.count))

    def _build_theta(self, normals):
        h, m, i = self.lstm_size, self.mix_size, self.num_tensor_features
        theta = {
            "mix": _dense(normals, i, m),
            "mix_max": _dense(normals, i, m),
            "lstm": _dense(normals, m + h, 4 * h),
            "lstm_init": {"h": jnp.zeros((h,)), "c": jnp.zeros((h,))},
            # small: the initial coefficients are ~1 (the bank's mean) and lr_mult ~1
            "head": _dense(normals, h, self._num_head_outputs, scale=0.1),
        }
        if self.step_adaptation:
            # zero: the log step stays at 0 until meta-training moves it
            theta["head"]["w"] = theta["head"]["w"].at[:, -1].set(0.0)
            theta["step_control"] = self._zero_step_control()
            for layer in ("mix", "mix_max"):
                rows = slice(i - self._num_adaptation_features, i)
                theta[layer]["w"] = theta[layer]["w"].at[rows].set(0.0)
        bank = {}
        for name, value in self._base_mlp(normals).items():
            spread = self.bank_noise * (jnp.std(value) + 0.1 / np.sqrt(value.size))
            noise = normals((self.bank_size, *value.shape))
            bank[name] = value[None] + spread * noise
        theta["bank"] = bank
        return theta

    def _base_mlp(self, normals):
        """An MLP whose direction output is `-(m_0 / sqrt(v))`, plus small noise."""
        sizes = self._mlp_sizes
        mlp = {}
        for idx, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layer = _dense(normals, a, b, scale=0.1)
            mlp[f"w{idx}"], mlp[f"b{idx}"] = layer["w"], layer["b"]
        if min(self.hidden_sizes) >= 2:
            # +x and -x through the ReLU layers, recombined at the output
            feature = 3 + len(self.momentum_decays) + 1  # m_0 / sqrt(v)
            w0 = mlp["w0"].at[:, :2].set(0.0)
            mlp["w0"] = w0.at[feature, 0].set(1.0).at[feature, 1].set(-1.0)
            for idx in range(1, len(self.hidden_sizes)):
                w = mlp[f"w{idx}"].at[:2, :2].set(jnp.eye(2))
                mlp[f"w{idx}"] = w.at[2:, :2].set(0.0)
            last = f"w{len(self.hidden_sizes)}"
            mlp[last] = mlp[last].at[:2, 0].set(jnp.array([-1.0, 1.0]))
        return mlp

    def embed_theta(self, source, theta):
        """`source`'s theta with `step_adaptation` switched on: the new inputs'
        mix rows, the head's log-step column and `step_control` are zero, so the
        optimizer steps exactly as `source`'s did.

        Example:
            >>> import jax
            >>> small = HierarchicalLOpt(lstm_size=4, bank_size=2, mix_size=4)
            >>> large = HierarchicalLOpt(
            ...     lstm_size=4, bank_size=2, mix_size=4, step_adaptation=True)
            >>> theta = large.embed_theta(small, small.init(jax.random.key(0)))
            >>> theta["mix"]["w"].shape[0] == large.num_tensor_features
            True
        """
        wanted = {
            **self.config(),
            "step_adaptation": False,
            "step_shrink_rate": getattr(source, "step_shrink_rate", None),
        }
        if not isinstance(source, HierarchicalLOpt) or source.config() != wanted:
            return super().embed_theta(source, theta)
        added = self._num_adaptation_features
        theta = dict(theta)
        for layer in ("mix", "mix_max"):
            w = theta[layer]["w"]
            zeros = jnp.zeros((added, w.shape[1]), w.dtype)
            theta[layer] = {**theta[layer], "w": jnp.concatenate([w, zeros])}
        head = theta["head"]
        theta["head"] = {
            "w": jnp.pad(head["w"], ((0, 0), (0, 1))),
            "b": jnp.pad(head["b"], (0, 1)),
        }
        theta["step_control"] = self._zero_step_control()
        return theta

    def _zero_step_control(self):
        """The log step's gains on the alignment cosines and its bias, at zero."""
        return {"w": jnp.zeros((len(self.momentum_decays),)), "b": jnp.zeros(())}

    # -- the per-tensor network ------------------------------------------------------

    def tensor_inputs(self, sums, shapes, loss_state, count, num_steps, log_step):
        """Per-tensor LSTM inputs `(num_tensors, num_tensor_features)`.

        `sums` are the per-tensor means of `_statistics`; `shapes` the tensors' shapes;
        `log_step` the tensors' log steps (read with `step_adaptation`).
        """
        sizes = np.asarray([max(int(np.prod(s)), 1) for s in shapes], np.float64)
        nm = len(self.momentum_decays)
        scale_p = jnp.maximum(jnp.sqrt(sums["p2"]), self.param_scale_floor)
        # a spread below float32's resolution of mean_sq - mean**2 is rounding noise
        # that differs between compiled programs: floor it at that resolution
        var = lambda mean, mean_sq: jnp.maximum(mean_sq - mean**2, 1e-6 * mean_sq)
        # one symlog and one log over stacked rows (not one small op per column)
        signed = F.symlog_feature(
            jnp.concatenate([sums["g"][None], sums["m"]]) / scale_p
        )
        spreads = jnp.sqrt(
            jnp.concatenate(
                [var(sums["g"], sums["g2"])[None], var(sums["m"], sums["m2"])]
            )
        )
        scales = F.log_feature(
            jnp.concatenate(
                [
                    spreads / scale_p,
                    jnp.stack(
                        [
                            jnp.sqrt(sums["v"]) / scale_p,
                            # the current gradient scale relative to its average
                            0.1 * jnp.sqrt(sums["g2"] / (sums["v"] + 1e-30)),
                            jnp.sqrt(sums["p2"]),
                        ]
                    ),
                ]
            )
        )
        # columns: (symlog mean, log spread) for g and each momentum, then the rest
        pairs = jnp.stack([signed, scales[: nm + 1]], axis=1).reshape(2 * nm + 2, -1)
        cols = [pairs, scales[nm + 1 :], jnp.asarray(np.log(sizes)[None] / 10.0)]
        cols = jnp.concatenate(cols).astype(jnp.float32).T
        per_tensor = jnp.concatenate(
            [
                cols,
                jnp.asarray(F.rank_one_hot([len(s) for s in shapes])),
            ],
            axis=1,
        )
        shared = jnp.concatenate(
            [
                F.progress_features(count, num_steps),
                F.loss_features(loss_state),
            ]
        )
        shared = jnp.broadcast_to(shared, (len(shapes), shared.shape[0]))
        columns = [shared, per_tensor]
        if self.step_adaptation:
            columns += [alignment(sums).T, (log_step / LOG_STEP_BOUND)[:, None]]
        return jnp.concatenate(columns, axis=1)

    def tensor_network(self, theta, inputs, lstm_h, lstm_c):
        """Mix layer and LSTM step: returns (mlp_weights, lr_mult, lstm_h, lstm_c,
        drive).

        mlp_weights: (num_tensors, num_mlp_weights) generated per-parameter MLPs;
        drive: `(num_tensors, 1)` the log step's head output with
        `step_adaptation`, else `(num_tensors, 0)`.
        """
        mix = dense(inputs, theta["mix"]["w"]) + theta["mix"]["b"]
        exchange = jax.nn.relu(
            dense(inputs, theta["mix_max"]["w"]) + theta["mix_max"]["b"]
        )
        x = mix + jnp.max(exchange, axis=0, keepdims=True)
        gates = (
            dense(jnp.concatenate([x, lstm_h], axis=1), theta["lstm"]["w"])
            + theta["lstm"]["b"]
        )
        i, f, g, o = jnp.split(gates, 4, axis=1)
        lstm_c = jax.nn.sigmoid(f + 1.0) * lstm_c + jax.nn.sigmoid(i) * jnp.tanh(g)
        lstm_h = jax.nn.sigmoid(o) * jnp.tanh(lstm_c)
        out = dense(lstm_h, theta["head"]["w"]) + theta["head"]["b"]
        coeffs = 1.0 + out[:, : self.bank_size]
        lr_mult = 1.0 + out[:, self.bank_size]
        weights = self._mix_bank(theta["bank"], coeffs) / self.bank_size
        return weights, lr_mult, lstm_h, lstm_c, out[:, self.bank_size + 1 :]

    def adapted_log_step(self, theta, inputs, drive, log_step):
        """The log steps after this step (`step_adaptation`), `(num_tensors,)`.

        drive: the LSTM head's extra output `(num_tensors, 1)`; inputs: the
        `tensor_inputs`, whose adaptation columns hold the alignment cosines.
        """
        nm = len(self.momentum_decays)
        first = self.num_tensor_features - self._num_adaptation_features
        cosines = inputs[:, first : first + nm]
        control = theta["step_control"]
        u = drive[:, 0] + cosines @ control["w"] + control["b"]
        drift = jnp.tanh(u)
        rate = jnp.where(drift < 0, self.step_shrink_rate, LOG_STEP_RATE)
        moved = log_step + rate * drift
        return jnp.clip(moved, -LOG_STEP_BOUND, LOG_STEP_BOUND)

    def _mix_bank(self, bank, coeffs):
        """`coeffs @ bank` over the bank as one (bank_size, num_mlp_weights) matrix;
        a low-rank perturbed bank member by member (no member matrix formed)."""
        names = [name for name, _ in self._mlp_shapes]
        if has_perturbed(bank):
            return jnp.concatenate([dense(coeffs, bank[n]) for n in names], axis=1)
        bank = [bank[name].reshape(self.bank_size, -1) for name in names]
        return coeffs @ jnp.concatenate(bank, axis=1)

    # -- the per-parameter network ---------------------------------------------------

    def _unpack_weights(self, weights):
        """(..., num_mlp_weights) -> dict of (..., *shape) arrays."""
        out, start = {}, 0
        for name, shape in self._mlp_shapes:
            n = int(np.prod(shape))
            out[name] = weights[..., start : start + n].reshape(
                (*weights.shape[:-1], *shape)
            )
            start += n
        return out

    def per_param_mlp(self, features: ParamFeatures, weights):
        """One tensor's generated MLP: returns (direction, log-magnitude).

        features: the tensor's `param_features`; weights: its `(num_mlp_weights,)`.
        Written as scalar-times-array sums so that XLA fuses the whole MLP with the
        features into one pass. Terms that share a per-entry factor are summed
        before the factor is applied (`ParamFeatures.products`), so that only the
        base arrays, not every feature, stay live across the hidden units.
        """
        w = self._unpack_weights(weights)
        w0, b0 = w["w0"], w["b0"]
        units = range(w0.shape[1])

        def weighted(k, x, scale, j):
            coeff = w0[k, j] * scale
            return coeff if x is None else coeff * x

        row = jnp.stack(
            [sum(w0[k, j] * x for k, x in features.rows.items()) + b0[j] for j in units]
        )
        col = jnp.stack(
            [sum(w0[k, j] * x for k, x in features.cols.items()) for j in units]
        )
        # materialised: fused into the per-entry pass, XLA would recompute every
        # row's and column's terms once per entry
        row, col = jax.lax.optimization_barrier((row, col))
        hidden = []
        for j in units:
            acc = row[j][:, :, None] + col[j][:, None, :]
            for term in features.entries:
                acc = acc + weighted(*term, j)
            for factor, terms in features.products:
                acc = acc + factor * sum(weighted(*term, j) for term in terms)
            hidden.append(acc)
        num_layers = len(self.hidden_sizes) + 1
        for layer in range(1, num_layers):
            hidden = [F.relu(h) for h in hidden]
            wl, bl = w[f"w{layer}"], w[f"b{layer}"]
            hidden = [
                sum((wl[k, j] * h for k, h in enumerate(hidden)), bl[j])
                for j in range(wl.shape[1])
            ]
        return hidden[0], hidden[1]

    def param_features(self, g, p, momenta, v, factored, scales) -> ParamFeatures:
        """One tensor's MLP inputs, split by how they vary.

        g, p, v: `(batch, rows, cols)` (the `matrix_view`); momenta: a stack of those;
        factored: `(row_factor, col_factor, col_mean)` of `F.factored_factors`;
        scales: this tensor's scalars. Input k is, in this order: g, clip(g), p,
        each momentum, sqrt(v) (each over its tensor RMS); each momentum, the
        tensor's rms(sqrt(v)) and g over sqrt(v); then per factored decay its row
        and column factors, their reciprocal roots, and g and a momentum over the
        factored root second moment.
        """
        nm, one = len(self.momentum_decays), 1.0
        rinv_v = jax.lax.rsqrt(v + scales["eps_v"])
        clipped = jnp.clip(g * scales["inv_rms_g"], -1.0, 1.0)
        entries = [(0, g, scales["inv_rms_g"]), (1, clipped, one)]
        entries.append((2, p, scales["inv_scale_p"]))
        entries += [(3 + d, momenta[d], scales["inv_rms_m"][d]) for d in range(nm)]
        entries.append((3 + nm, jnp.sqrt(v), scales["inv_rms_sv"]))
        base = 4 + nm  # inputs over sqrt(v)
        over_root = [(base + d, momenta[d], one) for d in range(nm)]
        over_root += [(base + nm, None, scales["rms_sv"]), (base + nm + 1, g, one)]
        products = [(rinv_v, over_root)]
        rows, cols = {}, {}
        row_factor, col_factor, col_mean = factored
        r_root = jax.lax.rsqrt(row_factor + 1e-3)
        c_root = jax.lax.rsqrt(col_factor + 1e-3)
        row_scale = r_root * jax.lax.rsqrt(col_mean + 1e-30)[:, None, None]
        first = base + nm + 2
        for d in range(len(self.factored_decays)):
            k = first + 6 * d
            rows[k], cols[k + 1] = row_factor[d], col_factor[d]
            rows[k + 2], cols[k + 3] = r_root[d], c_root[d]
            ada = row_scale[d][:, :, None] * c_root[d][:, None, :]
            products.append(
                (ada, [(k + 4, g, one), (k + 5, momenta[min(d, nm - 1)], one)])
            )
        return ParamFeatures(entries, products, rows, cols)

    # -- the transform ---------------------------------------------------------------

    def _tensor_statistics(self, g, p, momenta, v, factored, extent):
        """One tensor's new accumulators and the means the LSTM reads.

        g, p: the tensor's (zero-padded) `matrix_view`; momenta `(num_momenta,
        *view)`, v, factored: its state; extent: its true `(batch, rows, cols)`.

        Returns:
            ((g, p, momenta, v, factored, extent), means) where means holds the
            tensor's mean g, g^2, p^2 and each momentum's mean square. The
            accumulators and the step use the clipped gradient; the sums of g and
            g^2 read the raw one and saturate (`_saturate`), so that no clipped
            copy of the tensor is written out for them.
        """
        raw = g.astype(jnp.float32)
        g = F.clip_gradient(raw)
        p = p.astype(jnp.float32)
        previous = momenta
        # all momenta in one array: one pass, and no copy into the new state
        momenta, v = F.update_moments(
            momenta, v, g, self.momentum_decays, self.second_moment_decay
        )
        # products, not a shared raw**2: that would be written out and read back
        row_sums = _saturate(jnp.einsum("brc,brc->br", raw, raw))
        col_sums = _saturate(jnp.einsum("brc,brc->bc", raw, raw))
        factored = F.update_factored_sums(
            factored, row_sums, col_sums, self.factored_decays, extent
        )
        inv = 1.0 / jnp.maximum(jnp.prod(extent), 1.0)  # padding entries are zero
        means = {
            "g": _saturate(jnp.sum(raw)) * inv,
            "g2": _saturate(jnp.sum(row_sums)) * inv,
            "p2": jnp.sum(p * p) * inv,
            "m2": jnp.sum(momenta * momenta, axis=(1, 2, 3)) * inv,
        }
        if self.step_adaptation:
            means["gm"] = jnp.sum(previous * g, axis=(1, 2, 3)) * inv
            means["mp2"] = jnp.sum(previous * previous, axis=(1, 2, 3)) * inv
            means["gc2"] = jnp.sum(g * g) * inv
        return (g, p, momenta, v, factored, extent), means

    def _tensor_step(self, tensor, scales, weights):
        """One tensor's update from its `_tensor_statistics`, scalars and weights."""
        g, p, momenta, v, factored, extent = tensor
        features = self.param_features(
            g, p, momenta, v, F.factored_factors(factored, extent), scales
        )
        direction, magnitude = self.per_param_mlp(features, weights)
        update = direction * jnp.exp(self.exp_mult * magnitude)
        if self.normalize_update:
            update = update * jax.lax.rsqrt(_mean_square(update, extent) + 1e-24)
        return update * scales["step"]

    def _statistics(self, state, groups, grads, params):
        """Every group's accumulators and the per-tensor means (in tensor order).

        Returns:
            (per-group stacked `_tensor_statistics`, sums, tensor_means).
        """
        nm = len(self.momentum_decays)
        per_group, means = [], []
        for group, m, v, fac in zip(
            groups, state.momenta, state.second_moment, state.factored, strict=True
        ):
            tensors, group_means = jax.vmap(self._tensor_statistics)(
                group.stack(grads), group.stack(params), m, v, fac, group.extents()
            )
            per_group.append(tensors)
            means.append(group_means)
        sums = {k: jnp.concatenate([x[k] for x in means], axis=0) for k in means[0]}
        sums["m2"] = sums["m2"].T  # (num_momenta, num_tensors)
        # EMAs are linear: the mean momentum and second moment of a tensor are EMAs
        # of its mean gradient and mean squared gradient (no pass over the entries)
        decays = jnp.asarray(
            (*self.momentum_decays, self.second_moment_decay), jnp.float32
        )[:, None]
        target = jnp.concatenate(
            [jnp.broadcast_to(sums["g"], (nm, sums["g"].shape[0])), sums["g2"][None]]
        )
        tensor_means = decays * state.tensor_means + (1.0 - decays) * target
        sums["m"], sums["v"] = tensor_means[:nm], tensor_means[nm]
        return per_group, sums, tensor_means

    def _init_state(self, theta, params) -> HierarchicalState:
        """The optimizer state of `params` (never reads leaf values)."""
        nm, nf = len(self.momentum_decays), len(self.factored_decays)
        groups = F.ShapeGroups.of(params, F.matrix_shape)
        t = groups.num_tensors
        leaves = jax.tree_util.tree_leaves(params)
        return HierarchicalState(
            count=jnp.zeros((), jnp.int32),
            momenta=tuple(g.zeros(leaves, (nm,)) for g in groups),
            second_moment=tuple(g.zeros(leaves) for g in groups),
            factored=tuple(
                F.FactoredMoments(
                    rows=g.zeros(leaves, (nf,))[..., 0],
                    cols=g.zeros(leaves, (nf,))[..., 0, :],
                )
                for g in groups
            ),
            loss=F.init_loss_emas(),
            tensor_means=jnp.zeros((nm + 1, t), jnp.float32),
            lstm_h=jnp.broadcast_to(theta["lstm_init"]["h"], (t, self.lstm_size)),
            lstm_c=jnp.broadcast_to(theta["lstm_init"]["c"], (t, self.lstm_size)),
            initial_rms=jnp.zeros((t,), jnp.float32),
            log_step=jnp.zeros((t,), jnp.float32),
        )

    def step_floor_of(self, num_params: int) -> float:
        """The floor on the step's scale in a model of `num_params` parameters.

        Example:
            >>> lopt = HierarchicalLOpt(step_floor=0.1, floor_params=40_000)
            >>> [round(lopt.step_floor_of(n), 3) for n in (10, 10_000, 50_000)]
            [0.5, 0.2, 0.1]
        """
        if self.floor_params is None or num_params >= self.floor_params:
            return self.step_floor
        raised = self.step_floor * float(np.sqrt(self.floor_params / num_params))
        return max(min(raised, self.floor_cap), self.step_floor)

    def _scales(self, sums, lr_mult, state, num_steps, num_params):
        """Per-tensor normalisers and step sizes (with the schedule's factor), and
        the parameters' RMS at the first step (which `step_scale="initial"` sizes
        every later step by)."""
        rms_p = jnp.sqrt(sums["p2"])
        initial_rms = jnp.where(state.count == 0, rms_p, state.initial_rms)
        scale_p = jnp.maximum(rms_p, self.param_scale_floor)
        floor = self.step_floor_of(num_params)
        step_p = jnp.maximum(rms_p, floor)
        if self.step_scale == "initial":
            step_p = jnp.maximum(initial_rms, floor)
        schedule = schedule_factor(self.schedule, state.count, num_steps)
        scales = {
            "inv_rms_g": jax.lax.rsqrt(sums["g2"] + 1e-30),
            "inv_scale_p": 1.0 / scale_p,
            "inv_rms_m": jax.lax.rsqrt(sums["m2"] + 1e-30).T,
            "inv_rms_sv": jax.lax.rsqrt(sums["v"] + 1e-30),  # rms of sqrt(v)
            "rms_sv": jnp.sqrt(sums["v"]),
            "eps_v": 1e-8 * sums["v"] + 1e-30,
            "step": lr_mult * self.step_mult * step_p * schedule,
        }
        if self.weight_decay:
            scales["decay"] = self.weight_decay * lr_mult * self.step_mult * schedule
        return scales, initial_rms

    def _param_steps(self, groups, per_group, scales, weights, state, grads):
        """The per-parameter network: one fused pass per group of equal shapes;
        each step in its gradient's shape and dtype."""
        steps = groups.map(
            self._tensor_step,
            state.count >= 0,
            [
                (tensors, {k: x[g.rows] for k, x in scales.items()}, weights[g.rows])
                for g, tensors in zip(groups, per_group, strict=True)
            ],
        )
        return [
            step.reshape(jnp.shape(g)).astype(jnp.result_type(g))
            for step, g in zip(steps, grads, strict=True)
        ]

    @staticmethod
    def _decayed(steps, params, treedef, decay, groups) -> list[jax.Array]:
        """Each step minus its tensor's decoupled weight decay."""
        rows = groups.leaf_rows
        return [
            (step - decay[rows[i]] * p).astype(step.dtype)
            for i, (step, p) in enumerate(
                zip(steps, treedef.flatten_up_to(params), strict=True)
            )
        ]

    def _per_tensor(self, theta, sums, groups, loss_state, state, num_steps):
        """The per-tensor network, batched over tensors: `(mlp_weights, lr_mult,
        lstm_h, lstm_c, log_step)`, lr_mult including `exp(log_step)`."""
        inputs = self.tensor_inputs(
            sums,
            groups.tensor_shapes,
            loss_state,
            state.count,
            num_steps,
            state.log_step,
        )
        weights, lr_mult, lstm_h, lstm_c, drive = self.tensor_network(
            theta, inputs, state.lstm_h, state.lstm_c
        )
        log_step = state.log_step
        if self.step_adaptation:
            log_step = self.adapted_log_step(theta, inputs, drive, log_step)
            lr_mult = lr_mult * jnp.exp(log_step)
        return weights, lr_mult, lstm_h, lstm_c, log_step

    def _update(self, theta, num_steps, updates, state, params, value):
        if params is None:
            raise ValueError(
                "HierarchicalLOpt reads the parameters: call "
                "update(grads, state, params)"
            )
        grads, treedef = jax.tree_util.tree_flatten(updates)
        count = optax.safe_increment(state.count)
        loss_state = F.update_loss_emas(state.loss, value, num_steps)
        if not grads:
            return updates, state._replace(count=count, loss=loss_state)
        groups = F.ShapeGroups.of(updates, F.matrix_shape)
        per_group, sums, tensor_means = self._statistics(
            state, groups, grads, treedef.flatten_up_to(params)
        )
        weights, lr_mult, lstm_h, lstm_c, log_step = self._per_tensor(
            theta, sums, groups, loss_state, state, num_steps
        )
        num_params = sum(int(np.size(g)) for g in grads)
        scales, initial_rms = self._scales(sums, lr_mult, state, num_steps, num_params)
        steps = self._param_steps(groups, per_group, scales, weights, state, grads)
        if self.weight_decay:
            steps = self._decayed(steps, params, treedef, scales["decay"], groups)
        new_state = HierarchicalState(
            count=count,
            momenta=tuple(t[2] for t in per_group),
            second_moment=tuple(t[3] for t in per_group),
            factored=tuple(t[4] for t in per_group),
            loss=loss_state,
            tensor_means=tensor_means,
            lstm_h=lstm_h,
            lstm_c=lstm_c,
            initial_rms=initial_rms,
            log_step=log_step,
        )
        return jax.tree_util.tree_unflatten(treedef, steps), new_state

    def transform(self, theta, num_steps):
        check_num_steps(num_steps)

        def init_fn(params):
            return self._init_state(theta, params)

        def update_fn(updates, state, params=None, *, value=None, **extra):
            del extra
            return self._update(theta, num_steps, updates, state, params, value)

        return checked_transformation(init_fn, update_fn)

    def generated_weights(self, theta, params, grads, num_steps=100, value=None):
        """The per-tensor MLP weights and lr multipliers after one update (inspection).

        Returns:
            (weights, lr_mult): `(num_tensors, num_mlp_weights)` and `(num_tensors,)`,
            rows in the order of the pytree's leaves.
        """
        return jax.jit(self._generated_weights)(theta, params, grads, num_steps, value)

    def _generated_weights(self, theta, params, grads, num_steps, value):
        opt = self.transform(theta, num_steps)
        state = opt.init(params)
        groups = F.ShapeGroups.of(grads, F.matrix_shape)
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        _, sums, _ = self._statistics(
            state, groups, leaves, treedef.flatten_up_to(params)
        )
        loss_state = F.update_loss_emas(state.loss, value, num_steps)
        weights, lr_mult, *_ = self._per_tensor(
            theta, sums, groups, loss_state, state, num_steps
        )
        order = groups.leaf_rows
        return weights[order], lr_mult[order]
