"""Character-level language models on text that ships with Python (no download).

The corpus is the text of the interactive-help topics in the standard library
(`pydoc_data.topics`, ~465,000 characters on Python 3.11; its exact content
follows the Python version), or, with `source="stdlib_docstrings"`, the docstrings
of a fixed list of standard-library modules. Characters are mapped to 97 ids
(printable ASCII, newline, and one id for everything else); the text is cut once
into contiguous train / validation / test parts (80 / 10 / 10 % by default).

Minibatches are windows of `seq_len + 1` characters at random positions of the
training part, drawn inside jit from the step's key. Validation and test figures
use a fixed set of `eval_windows` evenly spaced windows of their part.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from es_l2o.tasks import Task, TaskFamily
from populations.common import check_positive_int, check_range, log_uniform, normal

#: 0: any other character, 1: newline, 2..96: printable ASCII (space .. "~")
VOCAB_SIZE = 97
SOURCES = ("pydoc_topics", "stdlib_docstrings")
_DOCSTRING_MODULES = (
    "abc",
    "argparse",
    "collections",
    "contextlib",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
    "unittest",
)


def encode(text: str) -> np.ndarray:
    """Character ids of `text` (uint8).

    Example:
        >>> encode("A\\n~").tolist()
        [35, 1, 96]
    """
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    codes = np.where(codes == ord("\t"), ord(" "), codes)
    printable = (codes >= 32) & (codes < 127)
    ids = np.where(printable, codes - 30, 0)
    return np.where(codes == ord("\n"), 1, ids).astype(np.uint8)


def _load_text(source: str) -> str:
    if source == "pydoc_topics":
        from pydoc_data.topics import topics

        return "\n".join(topics[name] for name in sorted(topics))
    if source == "stdlib_docstrings":
        parts = []
        for module_name in _DOCSTRING_MODULES:
            module = importlib.import_module(module_name)
            parts.append(inspect.getdoc(module) or "")
            for name in sorted(vars(module)):
                obj = vars(module)[name]
                if name.startswith("_") or not callable(obj):
                    continue
                if getattr(obj, "__module__", None) == module_name:
                    parts.append(inspect.getdoc(obj) or "")
        return "\n\n".join(p for p in parts if p)
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


class CharCorpus(NamedTuple):
    """Character ids of the three contiguous parts of the text, on device."""

    train: jax.Array
    val: jax.Array
    test: jax.Array


@functools.cache
def char_corpus(
    source: str = "pydoc_topics", val_fraction: float = 0.1, test_fraction: float = 0.1
) -> CharCorpus:
    """The fixed train / validation / test cut of the corpus (uint8 ids).

    Example:
        >>> corpus = char_corpus()
        >>> corpus.train.shape[0] > 7 * corpus.val.shape[0] > 0
        True
    """
    ids = encode(_load_text(source))
    num_val = int(round(len(ids) * val_fraction))
    num_test = int(round(len(ids) * test_fraction))
    num_train = len(ids) - num_val - num_test
    if min(num_val, num_test) < 1_000 or num_train < 1_000:
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction} leave "
            f"{num_train} / {num_val} / {num_test} characters; each part needs 1,000"
        )
    bounds = [0, num_train, num_train + num_val, len(ids)]
    return CharCorpus(
        *(jnp.asarray(ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    )


def _windows(part: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    return part[starts[:, None] + jnp.arange(length)].astype(jnp.int32)


def _lm_loss(logits, targets):
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


class CharLMConfig(NamedTuple):
    """What varies between language-model tasks: the initialisation scale."""

    init_scale: jax.Array


class CharLMTask(Task):
    """A next-character model: subclasses give `init` and `apply` (logits)."""

    def __init__(self, family: CharLMFamily, cfg: CharLMConfig):
        self.family = family
        self.cfg = cfg

    @property
    def has_validation(self):
        return True

    def apply(self, params, tokens: jax.Array) -> jax.Array:
        """Logits (batch, time, VOCAB_SIZE) for int tokens (batch, time)."""
        raise NotImplementedError

    def window_loss(self, params, windows: jax.Array) -> jax.Array:
        """Mean next-character cross-entropy (nats) over windows (batch, T + 1)."""
        return _lm_loss(self.apply(params, windows[:, :-1]), windows[:, 1:])

    def batch(self, key: jax.Array) -> jax.Array:
        """Training windows (batch_size, seq_len + 1) at random positions."""
        family = self.family
        train = family.corpus.train
        high = train.shape[0] - family.seq_len
        starts = jax.random.randint(key, (family.batch_size,), 0, high)
        return _windows(train, starts, family.seq_len + 1)

    def loss(self, params, key):
        return self.window_loss(params, self.batch(key))

    def eval_loss(self, params, key):
        del key
        return self.window_loss(params, self.family.eval_windows["val"])

    def metrics(self, params, key):
        del key
        out = {}
        for name, windows in self.family.eval_windows.items():
            logits = self.apply(params, windows[:, :-1])
            out[f"{name}_loss"] = _lm_loss(logits, windows[:, 1:])
            out[f"{name}_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == windows[:, 1:])
        return out


class CharLMFamily(TaskFamily):
    """Shared parts of the language-model families: corpus, windows, sampling."""

    has_validation = True

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        init_scale_range: Sequence[float],
        eval_windows: int,
        source: str,
    ):
        self.seq_len = check_positive_int(seq_len, "seq_len")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.init_scale_range = check_range(init_scale_range, "init_scale_range")
        num_windows = check_positive_int(eval_windows, "eval_windows")
        self.source = source
        self.corpus = char_corpus(source)
        self.eval_windows = {}
        for name, part in self.corpus._asdict().items():
            starts = np.linspace(0, part.shape[0] - seq_len - 1, num_windows)
            starts = jnp.asarray(starts.astype(np.int32))
            self.eval_windows[name] = _windows(part, starts, seq_len + 1)

    def sample(self, key):
        return CharLMConfig(init_scale=log_uniform(key, self.init_scale_range))


class CharRNNTask(CharLMTask):
    """A recurrent next-character model; see `CharRNNFamily`."""

    def init(self, key):
        family, scale = self.family, self.cfg.init_scale
        e, h = family.embed_size, family.hidden_size
        gates = 3 if family.cell == "gru" else 1
        keys = jax.random.split(key, 4)
        return {
            "embed": normal(keys[0], (VOCAB_SIZE, e), 1.0),
            "cell": {
                "wx": normal(keys[1], (e, gates * h), scale / np.sqrt(e)),
                "wh": normal(keys[2], (h, gates * h), scale / np.sqrt(h)),
                "b": jnp.zeros((gates * h,)),
            },
            "head": {
                "w": normal(keys[3], (h, VOCAB_SIZE), 1.0 / np.sqrt(h)),
                "b": jnp.zeros((VOCAB_SIZE,)),
            },
        }

    def apply(self, params, tokens):
        cell = params["cell"]
        inputs = params["embed"][tokens] @ cell["wx"] + cell["b"]  # (B, T, G*H)
        h0 = jnp.zeros((tokens.shape[0], self.family.hidden_size), inputs.dtype)

        def rnn(h, x):
            h = jnp.tanh(x + h @ cell["wh"])
            return h, h

        def gru(h, x):
            xr, xz, xn = jnp.split(x, 3, axis=-1)
            hr, hz, hn = jnp.split(h @ cell["wh"], 3, axis=-1)
            r = jax.nn.sigmoid(xr + hr)
            z = jax.nn.sigmoid(xz + hz)
            n = jnp.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
            return h, h

        step = gru if self.family.cell == "gru" else rnn
        _, hs = jax.lax.scan(step, h0, jnp.swapaxes(inputs, 0, 1))
        hs = jnp.swapaxes(hs, 0, 1)
        return hs @ params["head"]["w"] + params["head"]["b"]


class CharRNNFamily(CharLMFamily):
    """Character-level RNN (tanh) or GRU language models on the bundled text.

    Args:
        hidden_size: recurrent state size.
        embed_size: character embedding size.
        cell: "rnn" (Elman, tanh) or "gru".
        seq_len: characters per training window (the unroll length of the RNN).
        batch_size: windows per minibatch.
        init_scale_range: log-uniform multiplier of the recurrent weights' scale.
        eval_windows: windows in each split's fixed evaluation set.
        source: one of `SOURCES`.

    Example:
        >>> family = CharRNNFamily(hidden_size=16, seq_len=8, batch_size=4)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> params = task.init(jax.random.key(1))
        >>> 3.0 < float(task.loss(params, jax.random.key(2))) < 6.0  # ~log(97)
        True
    """

    name = "char_rnn"

    def __init__(
        self,
        hidden_size: int = 32,
        embed_size: int = 16,
        cell: str = "rnn",
        seq_len: int = 16,
        batch_size: int = 16,
        init_scale_range: Sequence[float] = (0.5, 1.5),
        eval_windows: int = 64,
        source: str = "pydoc_topics",
    ):
        if cell not in ("rnn", "gru"):
            raise ValueError(f"cell must be 'rnn' or 'gru', got {cell!r}")
        self.hidden_size = check_positive_int(hidden_size, "hidden_size")
        self.embed_size = check_positive_int(embed_size, "embed_size")
        self.cell = cell
        super().__init__(seq_len, batch_size, init_scale_range, eval_windows, source)

    def task(self, cfg):
        return CharRNNTask(self, cfg)


def _layer_norm(x, p):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


class CharTransformerTask(CharLMTask):
    """A causal pre-LayerNorm transformer; see `CharTransformerFamily`."""

    def init(self, key):
        family, scale = self.family, self.cfg.init_scale
        d, m = family.d_model, family.mlp_ratio * family.d_model
        keys = jax.random.split(key, 3 + 4 * family.num_layers)
        out_std = scale / np.sqrt(d) / np.sqrt(2 * family.num_layers)

        def norm():
            return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}

        params = {
            "embed": normal(keys[0], (VOCAB_SIZE, d), 1.0),
            "position": normal(keys[1], (family.seq_len, d), 0.1),
            "final_norm": norm(),
            "head": normal(keys[2], (d, VOCAB_SIZE), 1.0 / np.sqrt(d)),
        }
        for i in range(family.num_layers):
            k = keys[3 + 4 * i : 7 + 4 * i]
            params[f"block_{i}"] = {
                "attn_norm": norm(),
                "qkv": normal(k[0], (d, 3 * d), scale / np.sqrt(d)),
                "attn_out": normal(k[1], (d, d), out_std),
                "mlp_norm": norm(),
                "mlp_in": normal(k[2], (d, m), scale / np.sqrt(d)),
                "mlp_out": normal(k[3], (m, d), out_std * np.sqrt(d / m)),
            }
        return params

    def apply(self, params, tokens):
        family = self.family
        b, t = tokens.shape
        heads, d = family.num_heads, family.d_model
        x = params["embed"][tokens] + params["position"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for i in range(family.num_layers):
            p = params[f"block_{i}"]
            q, k, v = jnp.split(_layer_norm(x, p["attn_norm"]) @ p["qkv"], 3, -1)
            q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
            weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
            x = x + attended @ p["attn_out"]
            hidden = jax.nn.gelu(_layer_norm(x, p["mlp_norm"]) @ p["mlp_in"])
            x = x + hidden @ p["mlp_out"]
        return _layer_norm(x, params["final_norm"]) @ params["head"]


class CharTransformerFamily(CharLMFamily):
    """Tiny decoder-only transformers (learned positions, causal attention).

    Args:
        d_model: residual width; must be divisible by `num_heads`.
        num_layers: transformer blocks (attention + MLP).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of `d_model`.
        seq_len, batch_size, init_scale_range, eval_windows, source: as in
            `CharRNNFamily` (the initial scale multiplies the block weights).

    Example:
        >>> family = CharTransformerFamily(d_model=16, num_heads=2, seq_len=8)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> params = task.init(jax.random.key(1))
        >>> task.apply(params, family.eval_windows["val"][:2, :-1]).shape
        (2, 8, 97)
    """

    name = "char_transformer"

    def __init__(
        self,
        d_model: int = 32,
        num_layers: int = 1,
        num_heads: int = 2,
        mlp_ratio: int = 2,
        seq_len: int = 16,
        batch_size: int = 16,
        init_scale_range: Sequence[float] = (0.5, 1.5),
        eval_windows: int = 64,
        source: str = "pydoc_topics",
    ):
        self.d_model = check_positive_int(d_model, "d_model")
        self.num_layers = check_positive_int(num_layers, "num_layers")
        self.num_heads = check_positive_int(num_heads, "num_heads")
        self.mlp_ratio = check_positive_int(mlp_ratio, "mlp_ratio")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={d_model} must be divisible by num_heads={num_heads}"
            )
        super().__init__(seq_len, batch_size, init_scale_range, eval_windows, source)

    def task(self, cfg):
        return CharTransformerTask(self, cfg)
