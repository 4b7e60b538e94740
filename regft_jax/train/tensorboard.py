"""A dependency-free TensorBoard scalar writer (no TensorFlow, no protobuf library).

TensorBoard reads ``events.out.tfevents.*`` files. Each file is a sequence of TFRecords::

    uint64 length              (little-endian)
    uint32 masked_crc32c(length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

where ``masked_crc(c) = (((c >> 15) | (c << 17)) + 0xA282EAD8) mod 2**32`` and crc32c is the
Castagnoli CRC (reflected polynomial 0x82F63B78). Every record's data is a serialized protobuf
``Event``; the subset written here is encoded by hand::

    message Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
                      Summary summary = 5; }
    message Summary { repeated Value value = 1; }
    message Value   { string tag = 1; float simple_value = 2; }

The first event of a file carries ``file_version = "brain.Event:2"``; every later one carries a
``Summary`` of scalar values for one step.

Usage::

    with SummaryWriter("runs/exp1") as w:
        w.scalar("loss", 0.5, step=10)
        w.scalars({"loss": 0.4, "lr": 1e-4}, step=20)
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

# --- crc32c -------------------------------------------------------------------------------------


def _make_crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: crc32c rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """Frame ``data`` as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length))
            + data + struct.pack("<I", masked_crc32c(data)))


# --- minimal protobuf encoding ------------------------------------------------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           values: Mapping[str, float] | None = None) -> bytes:
    msg = _key(1, _FIXED64) + struct.pack("<d", wall_time) + _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if values is not None:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, str(tag).encode())
                         + _key(2, _FIXED32) + struct.pack("<f", float(value)))
            for tag, value in values.items())
        msg += _bytes_field(5, summary)
    return msg


# --- writer -------------------------------------------------------------------------------------


class SummaryWriter:
    """Writes scalar summaries to ``logdir/events.out.tfevents.<time>.<host>.regft_jax``."""

    def __init__(self, logdir: str | os.PathLike):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.regft_jax"
        self.path = os.path.join(os.fspath(logdir), name)
        self._file = open(self.path, "ab")
        self._write(_event(now, 0, file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: bytes) -> None:
        if self._file is None:
            raise ValueError("SummaryWriter is closed")
        self._file.write(tfrecord(event))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar ``value`` under ``tag`` at ``step``."""
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log several scalars at ``step`` as one event."""
        self._write(_event(time.time(), int(step), values=values))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SummaryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
