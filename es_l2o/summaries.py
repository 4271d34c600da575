"""Scalar summaries in a TensorBoard event file, written through tensorboardX.

`ScalarWriter` writes with tensorboardX's `EventsWriter` (the writer that
`tensorboardX.SummaryWriter`'s background thread uses) directly, so every event is in
the file when `flush` returns: `SummaryWriter.flush` does not wait for its queue, and
a run killed right after it loses the events still queued. A writer that continues a
run from a checkpoint at step s writes, as `SummaryWriter(purge_step=s)` does, a
`SessionLog.START` event at s: TensorBoard then drops the events of steps >= s that
the killed run left, so the curves do not double.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> logdir = tempfile.mkdtemp()
    >>> with ScalarWriter(logdir) as writer:
    ...     writer.scalars(0, {"meta_loss": 1.5, "note": "not a number: skipped"})
    >>> [p.name.startswith("events.out.tfevents.") for p in Path(logdir).iterdir()]
    [True]
"""

from __future__ import annotations

import os
import time


class ScalarWriter:
    """Appends scalar summaries to a new event file in `logdir`.

    Args:
        logdir: the folder TensorBoard is pointed at (created if missing).
        purge_step: when continuing a run from a checkpoint, its first step.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(logdir, exist_ok=True)
        # the pid keeps two writers started in the same second apart
        self._writer = EventsWriter(
            os.path.join(os.fspath(logdir), "events"), f".{os.getpid()}"
        )
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._writer.write_event(
                Event(wall_time=time.time(), step=int(purge_step), session_log=start)
            )
        self._closed = False
        self.flush()

    def scalars(
        self, step: int, values: dict[str, float], wall_time: float | None = None
    ) -> None:
        """Writes `values` (tag -> number) at `step`; non-numbers are skipped."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        numbers = [
            Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        if numbers:
            self._writer.write_event(
                Event(
                    wall_time=time.time() if wall_time is None else wall_time,
                    step=int(step),
                    summary=Summary(value=numbers),
                )
            )

    def flush(self) -> None:
        """Puts every event written so far into the file."""
        self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
