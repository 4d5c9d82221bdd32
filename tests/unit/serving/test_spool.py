"""DiskSpool: order, bound, torn-tail recovery, cursor persistence, segment deletion."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.spool import DiskSpool, SpoolFull, SpoolRecord, encode_record


def rec(i: int, topic: str = "t", size: int = 20) -> SpoolRecord:
    return SpoolRecord(topic, f"k{i % 3}".encode(), f"v{i:06d}".encode().ljust(size, b"."))


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.log"))


def test_fifo_order_across_segments_and_batches(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1_000_000, segment_bytes=200)
    records = [rec(i) for i in range(50)]
    spool.append_many(records[:7])
    spool.append_many(records[7:30], fsync=False)
    spool.append_many(records[30:])
    assert len(spool) == 50
    assert len(segment_files(tmp_path)) > 3  # small segments really rolled
    got: list[SpoolRecord] = []
    while len(spool):
        chunk = spool.peek(6)
        got.extend(chunk)
        spool.advance(len(chunk))
    assert got == records
    assert spool.bytes == 0


def test_peek_does_not_consume_and_none_key_round_trips(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=10_000)
    a = SpoolRecord("alignloop.interactions", None, b"")
    b = SpoolRecord("alignloop.feedback", b"\x00key", b"\xff" * 10)
    spool.append_many([a, b])
    assert spool.peek(10) == [a, b]
    assert spool.peek(1) == [a]
    spool.advance(1)
    assert spool.peek(10) == [b]
    with pytest.raises(ValueError):
        spool.advance(2)


def test_bound_raises_spool_full_and_writes_nothing(tmp_path: Path) -> None:
    one = len(encode_record(rec(0)))
    spool = DiskSpool(tmp_path, max_bytes=one * 3)
    spool.append_many([rec(0), rec(1)])
    with pytest.raises(SpoolFull):
        spool.append_many([rec(2), rec(3)])  # all-or-nothing: neither is written
    assert len(spool) == 2
    assert spool.bytes == 2 * one
    spool.append_many([rec(2)])
    with pytest.raises(SpoolFull):
        spool.append_many([rec(3)])
    # Consuming frees room again.
    spool.advance(2)
    spool.append_many([rec(3), rec(4)])
    assert spool.peek(10) == [rec(2), rec(3), rec(4)]


def test_torn_tail_is_detected_truncated_and_not_misparsed(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=100_000)
    spool.append_many([rec(i) for i in range(5)])
    spool.close()
    seg = segment_files(tmp_path)[-1]
    good_size = seg.stat().st_size
    # A crash mid-append: half of a sixth record's frame reached the disk.
    frame = encode_record(rec(5))
    with open(seg, "ab") as f:
        f.write(frame[: len(frame) // 2])

    reopened = DiskSpool(tmp_path, max_bytes=100_000)
    assert len(reopened) == 5
    assert reopened.peek(10) == [rec(i) for i in range(5)]
    assert seg.stat().st_size == good_size  # torn bytes removed
    # Appends after recovery are readable (they do not land behind garbage).
    reopened.append_many([rec(6)])
    reopened.close()
    again = DiskSpool(tmp_path, max_bytes=100_000)
    assert again.peek(10) == [*(rec(i) for i in range(5)), rec(6)]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,  # zero-filled tail (filesystem crash)
        b"\xa1\x5b\x00\x00\x00\x20\x00\x00\x00\x00" + b"x" * 32,  # right length, bad crc
        b"\xa1",  # a header cut short
    ],
)
def test_corrupt_tail_variants_are_skipped(tmp_path: Path, garbage: bytes) -> None:
    spool = DiskSpool(tmp_path, max_bytes=100_000)
    spool.append_many([rec(0), rec(1)])
    spool.close()
    with open(segment_files(tmp_path)[-1], "ab") as f:
        f.write(garbage)
    reopened = DiskSpool(tmp_path, max_bytes=100_000)
    assert reopened.peek(10) == [rec(0), rec(1)]
    assert len(reopened) == 2


def test_flipped_byte_in_last_record_is_detected(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=100_000)
    spool.append_many([rec(0), rec(1)])
    spool.close()
    seg = segment_files(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # inside the value of rec(1)
    seg.write_bytes(bytes(data))
    reopened = DiskSpool(tmp_path, max_bytes=100_000)
    assert reopened.peek(10) == [rec(0)]


def test_cursor_persists_across_reopen(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=100_000, segment_bytes=150)
    spool.append_many([rec(i) for i in range(20)])
    spool.advance(7)  # a replay delivered 7, then the process died
    spool.close()
    reopened = DiskSpool(tmp_path, max_bytes=100_000, segment_bytes=150)
    assert len(reopened) == 13
    assert reopened.bytes == 13 * len(encode_record(rec(0)))
    assert reopened.peek(100) == [rec(i) for i in range(7, 20)]
    # Appending after reopen continues the same FIFO.
    reopened.append_many([rec(20)])
    assert reopened.peek(100)[-1] == rec(20)


def test_consumed_segments_are_deleted(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=100_000, segment_bytes=100)
    spool.append_many([rec(i) for i in range(12)])
    before = segment_files(tmp_path)
    assert len(before) >= 4
    spool.advance(6)
    middle = segment_files(tmp_path)
    assert 0 < len(middle) < len(before)
    assert before[0] not in middle
    spool.advance(6)
    assert segment_files(tmp_path) == []  # empty spool: nothing left on disk
    assert len(spool) == 0
    # Still usable, and an empty spool reopens empty.
    spool.append_many([rec(99)])
    spool.close()
    reopened = DiskSpool(tmp_path, max_bytes=100_000, segment_bytes=100)
    assert reopened.peek(5) == [rec(99)]
    reopened.advance(1)
    reopened.close()
    assert len(DiskSpool(tmp_path, max_bytes=100_000)) == 0


def test_record_larger_than_a_segment_still_fits(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=100_000, segment_bytes=64)
    big = SpoolRecord("t", b"k", b"x" * 500)
    spool.append_many([rec(0), big, rec(1)])
    assert spool.peek(5) == [rec(0), big, rec(1)]


def test_topic_bytes_follow_appends_advances_and_reopening(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1_000_000, segment_bytes=300)
    records = [rec(i, topic="feedback" if i % 4 == 0 else "interactions") for i in range(20)]
    spool.append_many(records)

    def expected(rs: list[SpoolRecord], topic: str) -> int:
        return sum(len(encode_record(r)) for r in rs if r.topic == topic)

    assert spool.topic_bytes("feedback") == expected(records, "feedback") > 0
    assert spool.topic_bytes("interactions") == expected(records, "interactions") > 0
    assert spool.topic_bytes("other") == 0
    spool.advance(7)
    left = records[7:]
    assert spool.topic_bytes("feedback") == expected(left, "feedback")
    assert spool.topic_bytes("interactions") == expected(left, "interactions")
    spool.close()

    reopened = DiskSpool(tmp_path, max_bytes=1_000_000, segment_bytes=300)
    assert reopened.topic_bytes("feedback") == expected(left, "feedback")
    assert reopened.topic_bytes("interactions") == expected(left, "interactions")
    reopened.advance(len(left))
    assert (reopened.topic_bytes("feedback"), reopened.topic_bytes("interactions")) == (0, 0)
