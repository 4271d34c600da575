"""Where a meta-training run reports each iteration: metrics.jsonl, TensorBoard, a
progress bar.

A `RunLog` takes one record (a dict of scalars) per iteration and writes it to every
sink it was given; `position` counts the lines of metrics.jsonl that belong to the
run, which is what a checkpoint stores so that a resumed run can cut the file back.

Example:
    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> with RunLog(path, progress=False).open(total=2) as log:
    ...     log.write({"iteration": 0, "meta_loss": 1.5})
    ...     log.write({"iteration": 1, "meta_loss": 0.5})
    >>> log.position, json.loads(path.read_text().splitlines()[-1])["meta_loss"]
    (2, 0.5)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from es_l2o.checkpointer import count_lines, truncate_lines


def scalars(metrics: dict) -> dict[str, float | int]:
    """The scalar entries of a metrics dict as Python numbers (arrays dropped).

    Example:
        >>> import jax.numpy as jnp
        >>> scalars({"loss": jnp.float32(0.5), "steps": jnp.int32(3), "v": jnp.ones(2)})
        {'loss': 0.5, 'steps': 3}
    """
    out = {}
    for name, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        if value.ndim == 0:
            floating = np.issubdtype(value.dtype, np.floating)
            out[name] = float(value) if floating else int(value)
    return out


def progress_fields(record: dict) -> dict[str, str]:
    """The progress line: the meta-loss, and per family (metrics "meta_loss/NAME",
    "nonfinite_steps/NAME") its meta-loss and, where any, its non-finite steps.

    Example:
        >>> progress_fields({"meta_loss": 1.0, "meta_loss/quad": 0.25,
        ...                  "nonfinite_steps/quad": 2})
        {'meta_loss': '1', 'quad': '0.25', 'quad:nonfinite': '2'}
    """
    fields = {"meta_loss": f"{record.get('meta_loss', math.nan):.4g}"}
    for name, value in record.items():
        what, _, family = name.partition("/")
        if what == "meta_loss" and family:
            fields[family] = f"{value:.3g}"
        elif what == "nonfinite_steps" and family and value:
            fields[f"{family}:nonfinite"] = str(value)
    return fields


def _strict(record: dict) -> dict:
    """`record` with non-finite numbers as None (strict JSON has no NaN)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in record.items()
    }


class RunLog:
    """One record per iteration to metrics.jsonl, TensorBoard and a progress bar.

    Args:
        metrics_path: if given, one JSON line per record is appended there.
        tensorboard_dir: if given, every record's scalars also go to a TensorBoard
            event file there (step: the record's "iteration").
        progress: show a tqdm progress bar with ETA and the current meta-loss.
    """

    def __init__(
        self,
        metrics_path: str | os.PathLike | None = None,
        *,
        tensorboard_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ):
        self.metrics_path = None if metrics_path is None else Path(metrics_path)
        self.tensorboard_dir = tensorboard_dir
        self.progress = progress
        self.position = 0
        self._file = self._board = self._bar = None

    def open(self, *, total: int, start: int = 0, position: int | None = None):
        """Opens the sinks for iterations `start` .. `total`; returns self (a context
        manager that closes them).

        `position` is None for a new run (the file's lines so far are kept) or, on
        resume, the lines of metrics.jsonl the checkpoint counts: the file is cut
        back to them and TensorBoard marks the restart at `start`.
        """
        resumed = position is not None
        if self.metrics_path is None:
            self.position = position or 0
        elif resumed:
            self.position = truncate_lines(self.metrics_path, position)
        else:
            self.position = count_lines(self.metrics_path)
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=start,
                desc="meta-training",
                unit="it",
                dynamic_ncols=True,
            )
        if self.metrics_path is not None:
            self._file = open(self.metrics_path, "a")  # noqa: SIM115
        if self.tensorboard_dir is not None:
            from es_l2o.summaries import ScalarWriter

            self._board = ScalarWriter(
                self.tensorboard_dir, purge_step=start if resumed else None
            )
        return self

    def write(self, record: dict[str, Any]) -> None:
        """Reports one iteration's record (it must hold "iteration")."""
        if self._file is not None:
            line = json.dumps(_strict(record), allow_nan=False)  # NaN, inf: null
            self._file.write(line + "\n")
            self._file.flush()
            self.position += 1
        if self._board is not None:
            values = {k: v for k, v in record.items() if k != "iteration"}
            self._board.scalars(record["iteration"], values)
            self._board.flush()
        if self._bar is not None:
            self._bar.set_postfix(progress_fields(record))
            self._bar.update(1)

    def close(self) -> None:
        for sink in (self._bar, self._file, self._board):
            if sink is not None:
                sink.close()
        self._file = self._board = self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
