"""The dependency-free TensorBoard writer, checked against known CRC vectors, a hand-written
TFRecord parser and TensorBoard's own reader."""
import glob
import os
import struct

import numpy as np
import pytest

from regft_jax.train.tensorboard import SummaryWriter, crc32c, masked_crc32c


def test_crc32c_known_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xff


def _write_run(logdir):
    expected = {"loss": {}, "lr": {}, "acc": {}}
    with SummaryWriter(logdir) as w:
        for step in range(0, 50, 10):
            loss = 1.0 / (step + 1)
            w.scalar("loss", loss, step)
            expected["loss"][step] = loss
            metrics = {"lr": 1e-4 * (step + 1), "acc": np.float32(step / 100)}
            w.scalars(metrics, step)
            for k, v in metrics.items():
                expected[k][step] = float(v)
    return expected


def _read_records(path):
    """Parse TFRecord framing by hand, verifying both masked CRCs of every record."""
    with open(path, "rb") as f:
        buf = f.read()
    records, pos = [], 0
    while pos < len(buf):
        header = buf[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
        assert len_crc == masked_crc32c(header)
        data = buf[pos + 12:pos + 12 + length]
        assert len(data) == length
        (data_crc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
        assert data_crc == masked_crc32c(data)
        records.append(data)
        pos += 16 + length
    assert pos == len(buf)
    return records


def test_tfrecord_framing_and_crcs(tmp_path):
    _write_run(tmp_path)
    (path,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*.regft_jax"))
    records = _read_records(path)
    assert len(records) == 1 + 2 * 5  # file_version event + two events per step
    # First record: wall_time (field 1, double), step (field 2, varint 0), file_version.
    first = records[0]
    assert first[0] == 0x09 and first[9:11] == b"\x10\x00"
    assert first[11:].endswith(b"brain.Event:2")

    # When the protobuf runtime is present, decode every record with the real Event proto too.
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    events = [event_pb2.Event.FromString(r) for r in records]
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [s for s in range(0, 50, 10) for _ in range(2)]
    assert [v.tag for v in events[2].summary.value] == ["lr", "acc"]


def test_negative_step_roundtrips(tmp_path):
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    with SummaryWriter(tmp_path) as w:
        w.scalar("x", 2.5, step=-3)
    (path,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    event = event_pb2.Event.FromString(_read_records(path)[1])
    assert event.step == -3 and event.summary.value[0].simple_value == 2.5


def test_event_accumulator_reads_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = _write_run(tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, by_step in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(by_step)
        np.testing.assert_allclose(
            [e.value for e in events], [by_step[s] for s in sorted(by_step)], rtol=1e-6)
