"""The command line's error vocabulary: a user-facing mistake (one line, exit code
2), errors folded into one line, and a meta-training that stopped early."""

from __future__ import annotations

USAGE_ERROR = 2


class UsageError(Exception):
    """A user-facing mistake: printed as one line, exit code 2."""


def one_line(err: BaseException) -> str:
    """An error and its causes as one line: Hydra's and OmegaConf's multi-line
    messages folded (`full_key` kept, lists of valid options joined)."""
    messages: list[str] = []
    while err is not None and len(messages) < 3:
        if isinstance(err, OSError) and err.filename is not None:
            text = f"cannot use {err.filename}: {err.strerror or err}"
        else:
            text = _fold(str(err)) or type(err).__name__
        if text not in messages and not any(text in m for m in messages):
            messages.append(text)
        err = err.__cause__
    return ": ".join(messages)


def _fold(text: str) -> str:
    """`text`'s lines as one: a line ending in ':' is followed by its items."""
    folded, listing = "", False
    for line in (x.strip() for x in text.strip().splitlines()):
        if line.startswith("Config search path"):
            break
        if not line or line.startswith(
            ("object_type=", "reference_type=", "To append to your config")
        ):
            continue
        if line.startswith("full_key:"):
            folded += f" (key {line.partition(':')[2].strip()})"
            continue
        separator = ", " if listing and not folded.endswith(":") else " "
        folded = (
            line if not folded else folded + (separator if listing else "; ") + line
        )
        listing = listing or line.endswith(":")
    return folded


#: exit status of a run stopped by a signal after writing its checkpoint: 128 + signum
SIGNAL_EXIT_BASE = 128


class Stopped(Exception):
    """Meta-training ended early: a message for stderr and the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
