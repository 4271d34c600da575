"""A minimal TensorBoard event-file writer for scalars, with no dependencies.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, data,
masked CRC-32C of the data), each holding one `tensorflow.Event` protocol buffer. The
few protobuf fields used here are encoded by hand:

    Event    { double wall_time = 1; int64 step = 2; string file_version = 3;
               Summary summary = 5; SessionLog session_log = 7; }
    Summary  { repeated Value value = 1; }
    Value    { string tag = 1; float simple_value = 2; }
    SessionLog { SessionStatus status = 1; }   // START = 1

A writer that continues a run writes a `SessionLog.START` event at its first step,
which tells TensorBoard to drop the events of steps at and after it that an earlier,
killed writer left behind.

Example:
    >>> import tempfile
    >>> with EventFileWriter(tempfile.mkdtemp()) as writer:
    ...     writer.scalars(0, {"meta_loss": 1.5})
    >>> writer.path.name.startswith("events.out.tfevents.")
    True
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

FILE_VERSION = "brain.Event:2"
_SESSION_START = 1


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecords use it: crc32c(b"123456789") = 0xE3069283."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The rotated, offset CRC that TFRecord framing stores."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, like protobuf
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    *,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
    session_start: bool = False,
) -> bytes:
    """One serialised `tensorflow.Event`."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(
                1,
                _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value),
            )
            for tag, value in scalars.items()
        )
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(7, _field(1, 0) + _varint(_SESSION_START))
    return out


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventFileWriter:
    """Appends scalar summaries to a new event file in `logdir`.

    Args:
        logdir: the folder TensorBoard is pointed at (created if missing).
        resume_step: when continuing a run from a checkpoint, its first step: a
            `SessionLog.START` event there makes TensorBoard drop stale later events.
    """

    def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None):
        directory = Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = (
            f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
            ".es_l2o"
        )
        self.path = directory / name
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._write(encode_event(now, 0, file_version=FILE_VERSION))
        if resume_step is not None:
            self._write(encode_event(now, int(resume_step), session_start=True))
        self.flush()

    def _write(self, event: bytes) -> None:
        self._file.write(frame_record(event))

    def scalars(
        self, step: int, values: dict[str, float], wall_time: float | None = None
    ) -> None:
        """Writes `values` (tag -> number) at `step`; non-numbers are skipped."""
        numbers = {
            tag: float(value)
            for tag, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        if numbers:
            self._write(
                encode_event(
                    time.time() if wall_time is None else wall_time,
                    int(step),
                    scalars=numbers,
                )
            )

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> EventFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
