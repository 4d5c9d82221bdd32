"""A bounded, crash-safe, append-only FIFO of Kafka records on local disk.

The event publisher writes here while the broker is unreachable and replays from here
when it returns. The properties that matter, and how they are achieved:

* **Order.** Records are appended to numbered segment files (``seg-000000000001.log``...)
  and read back from a single cursor, so replay order is append order.
* **Crash safety.** Each record is framed as ``magic | payload length | crc32(payload)``
  followed by the payload. A record torn by a crash mid-write (short header, short payload,
  wrong checksum, or a zero-filled tail) fails the check and is never mis-parsed; on open,
  the torn tail of the newest segment is truncated away so later appends are readable.
  ``append_many(..., fsync=True)`` returns only after the bytes reached the disk.
* **Resumable replay.** The read cursor (segment number, byte offset) is persisted by
  ``advance()`` with write-temp + fsync + rename, so a replay that died half-way resumes
  after the last record it advanced over. Delivery is at-least-once: a crash between the
  broker's ack and ``advance()`` re-sends those records; consumers dedupe by event id.
* **Bounded.** ``bytes`` counts the encoded size of unread records; an append that would
  exceed ``max_bytes`` raises :class:`SpoolFull` and writes nothing. Fully consumed
  segments are deleted, so disk use exceeds ``bytes`` by at most one segment.
  ``topic_bytes(topic)`` splits ``bytes`` by topic (rebuilt from disk on open), so a user of
  the spool can give one topic a share of the bound that others cannot take.

Thread-safe: one lock serialises every operation.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from schemas.durable import fsync_dir

log = logging.getLogger(__name__)

_MAGIC = b"\xa1\x5b"
_HEADER = struct.Struct(">2sII")  # magic, payload length, crc32(payload)
_TOPIC_LEN = struct.Struct(">H")
_KEY_LEN = struct.Struct(">i")  # -1: key is None
_MAX_PAYLOAD = 1 << 30  # sanity bound on a length field; garbage lengths fail the read
_MIN_PAYLOAD = _TOPIC_LEN.size + _KEY_LEN.size
_CURSOR_FILE = "cursor.json"
_SEGMENT_FMT = "seg-{:012d}.log"


class SpoolFull(Exception):
    """Appending would take the spool beyond its ``max_bytes`` bound; nothing was written."""


class SpoolRecord(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes


def encode_record(record: SpoolRecord) -> bytes:
    """One framed record: header + payload (topic, key, value)."""
    topic = record.topic.encode()
    key_len = -1 if record.key is None else len(record.key)
    payload = b"".join(
        (
            _TOPIC_LEN.pack(len(topic)),
            topic,
            _KEY_LEN.pack(key_len),
            record.key or b"",
            record.value,
        )
    )
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def encoded_size(record: SpoolRecord) -> int:
    """``len(encode_record(record))`` without building it (what the bound counts)."""
    key = 0 if record.key is None else len(record.key)
    return _HEADER.size + _MIN_PAYLOAD + len(record.topic.encode()) + key + len(record.value)


def _decode_payload(payload: bytes) -> SpoolRecord:
    (topic_len,) = _TOPIC_LEN.unpack_from(payload, 0)
    pos = _TOPIC_LEN.size
    topic = payload[pos : pos + topic_len].decode()
    pos += topic_len
    (key_len,) = _KEY_LEN.unpack_from(payload, pos)
    pos += _KEY_LEN.size
    key = None if key_len < 0 else payload[pos : pos + key_len]
    pos += max(key_len, 0)
    return SpoolRecord(topic, key, payload[pos:])


def _payload_topic(payload: bytes) -> str:
    (topic_len,) = _TOPIC_LEN.unpack_from(payload, 0)
    return payload[_TOPIC_LEN.size : _TOPIC_LEN.size + topic_len].decode()


def _read_one(f: BinaryIO) -> tuple[bytes, int] | None:
    """Read one framed record at the file position: (payload, framed size), or None if the
    bytes there are missing, torn or corrupt. The caller decides what None means."""
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    magic, length, crc = _HEADER.unpack(header)
    if magic != _MAGIC or not _MIN_PAYLOAD <= length <= _MAX_PAYLOAD:
        return None
    payload = f.read(length)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return None
    return payload, _HEADER.size + length


class DiskSpool:
    """FIFO of :class:`SpoolRecord` in segment files under ``directory``.

    ``max_bytes`` bounds unread encoded bytes; ``segment_bytes`` is the size at which a new
    segment file is started (a record bigger than that still fits, alone, in its own one).
    """

    # Set by _recover() (from __init__) and kept up to date under _lock.
    _cursor: tuple[int, int]  # (segment, offset) of the first unread record
    _tail: int  # the segment appends go to
    _tail_size: int
    _count: int
    _bytes: int
    _topic_bytes: dict[str, int]  # _bytes by topic

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        segment_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._writer: BinaryIO | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    # --- public API -------------------------------------------------------------------

    def __len__(self) -> int:
        """Unread records."""
        return self._count

    @property
    def bytes(self) -> int:
        """Encoded size of the unread records (what ``max_bytes`` bounds)."""
        return self._bytes

    def topic_bytes(self, topic: str) -> int:
        """The part of ``bytes`` that records of ``topic`` take."""
        return self._topic_bytes.get(topic, 0)

    def append_many(self, records: Iterable[SpoolRecord], fsync: bool = True) -> None:
        """Append records in order, all or nothing with respect to the bound.

        Raises :class:`SpoolFull` (writing none of them) if they would not fit. With
        ``fsync=True`` the records are on disk when this returns.
        """
        records = list(records)
        frames = [encode_record(r) for r in records]
        if not frames:
            return
        size = sum(len(f) for f in frames)
        with self._lock:
            if self._bytes + size > self.max_bytes:
                raise SpoolFull(
                    f"spool {self.directory} holds {self._bytes} bytes; {size} more would "
                    f"exceed its bound of {self.max_bytes}"
                )
            pending: list[bytes] = []
            for frame in frames:
                if self._tail_size > 0 and self._tail_size + len(frame) > self.segment_bytes:
                    self._write(pending, fsync)
                    pending = []
                    self._roll()
                pending.append(frame)
                self._tail_size += len(frame)
            self._write(pending, fsync)
            self._count += len(frames)
            self._bytes += size
            for record, frame in zip(records, frames, strict=True):
                self._add_topic_bytes(record.topic, len(frame))

    def sync(self) -> None:
        """fsync whatever was appended with ``fsync=False``."""
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
                os.fsync(self._writer.fileno())

    def peek(self, n: int) -> list[SpoolRecord]:
        """Up to ``n`` records from the cursor, oldest first, without consuming them."""
        with self._lock:
            return [_decode_payload(payload) for payload, *_ in self._scan(n)]

    def advance(self, n: int) -> None:
        """Consume ``n`` records (they were delivered). Persists the cursor, then deletes
        segments that are entirely behind it."""
        if n <= 0:
            return
        with self._lock:
            if n > self._count:
                raise ValueError(f"cannot advance {n} records; only {self._count} unread")
            consumed = 0
            by_topic: dict[str, int] = {}
            seg, off = self._cursor
            for payload, end_seg, end_off, size in self._scan(n):
                consumed += size
                topic = _payload_topic(payload)
                by_topic[topic] = by_topic.get(topic, 0) + size
                seg, off = end_seg, end_off
            if seg < self._tail and off >= self._segment_path(seg).stat().st_size:
                seg, off = seg + 1, 0  # finished a sealed segment: let it be deleted now
            if self._count == n:
                # Empty now: start the next append in a fresh segment, so the whole
                # current one can go.
                self._close_writer()
                seg, off = self._tail + 1, 0
                self._tail, self._tail_size = seg, 0
            self._save_cursor(seg, off)
            self._count -= n
            self._bytes -= consumed
            for topic, size in by_topic.items():
                self._add_topic_bytes(topic, -size)
            self._delete_segments_before(seg)

    def close(self) -> None:
        with self._lock:
            self._close_writer()

    def __repr__(self) -> str:
        return f"DiskSpool({self.directory}, records={self._count}, bytes={self._bytes})"

    # --- reading ------------------------------------------------------------------------

    def _segment_path(self, seg: int) -> Path:
        return self.directory / _SEGMENT_FMT.format(seg)

    def _segments(self) -> list[int]:
        found = []
        for p in self.directory.glob("seg-*.log"):
            try:
                found.append(int(p.name[4:-4]))
            except ValueError:
                continue
        return sorted(found)

    def _scan(self, n: int) -> Iterator[tuple[builtins.bytes, int, int, int]]:
        """Yield up to ``n`` unread records from the cursor, each with the position just
        after it and its framed size: (payload, segment, offset, size)."""
        if self._writer is not None:
            self._writer.flush()
        seg, off = self._cursor
        remaining = min(n, self._count)
        while remaining > 0 and seg <= self._tail:
            path = self._segment_path(seg)
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(off)
                    while remaining > 0:
                        got = _read_one(f)
                        if got is None:
                            break  # end of segment (recovery made sure nothing torn follows)
                        payload, size = got
                        off += size
                        remaining -= 1
                        yield payload, seg, off, size
            if remaining > 0:
                seg, off = seg + 1, 0

    def _add_topic_bytes(self, topic: str, size: int) -> None:
        left = self._topic_bytes.get(topic, 0) + size
        if left:
            self._topic_bytes[topic] = left
        else:
            self._topic_bytes.pop(topic, None)

    # --- writing ------------------------------------------------------------------------

    # ``builtins.bytes``: in this class body ``bytes`` is the property above.
    def _write(self, frames: list[builtins.bytes], fsync: bool) -> None:
        if not frames:
            return
        if self._writer is None:
            path = self._segment_path(self._tail)
            created = not path.exists()
            self._writer = open(path, "ab")  # noqa: SIM115 - kept open across appends
            if created:
                fsync_dir(self.directory)
        self._writer.write(b"".join(frames))
        self._writer.flush()
        if fsync:
            os.fsync(self._writer.fileno())

    def _roll(self) -> None:
        """Close the current tail segment (durably) and make the next one the tail."""
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
        self._close_writer()
        self._tail += 1
        self._tail_size = 0

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- cursor and recovery ------------------------------------------------------------

    def _save_cursor(self, seg: int, off: int) -> None:
        tmp = self.directory / (_CURSOR_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"segment": seg, "offset": off}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / _CURSOR_FILE)
        fsync_dir(self.directory)
        self._cursor = (seg, off)

    def _load_cursor(self) -> tuple[int, int] | None:
        try:
            data = json.loads((self.directory / _CURSOR_FILE).read_text())
            return int(data["segment"]), int(data["offset"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.error(
                "spool cursor in %s is unreadable; replaying from the oldest segment",
                self.directory,
            )
            return None

    def _delete_segments_before(self, seg: int) -> None:
        deleted = False
        for s in self._segments():
            if s < seg:
                self._segment_path(s).unlink(missing_ok=True)
                deleted = True
        if deleted:
            fsync_dir(self.directory)

    def _recover(self) -> None:
        """Rebuild counters from disk; truncate a torn tail; drop consumed segments."""
        segments = self._segments()
        cursor = self._load_cursor()
        if cursor is None:
            cursor = (segments[0] if segments else 1, 0)
        self._cursor = cursor
        self._delete_segments_before(cursor[0])
        segments = [s for s in segments if s >= cursor[0]]
        self._tail = max(segments[-1] if segments else cursor[0], cursor[0])
        self._tail_size = 0
        self._count = 0
        self._bytes = 0
        self._topic_bytes = {}
        for seg in segments:
            start = cursor[1] if seg == cursor[0] else 0
            path = self._segment_path(seg)
            file_size = path.stat().st_size
            with open(path, "rb") as f:
                f.seek(start)
                good_end = start
                while (got := _read_one(f)) is not None:
                    good_end += got[1]
                    self._count += 1
                    self._bytes += got[1]
                    self._add_topic_bytes(_payload_topic(got[0]), got[1])
            if good_end < file_size:
                # A torn/corrupt record. In the newest segment that is the normal trace of
                # a crash mid-append; anywhere else it means lost data, which we report.
                if seg != self._tail:
                    log.error(
                        "spool segment %s is corrupt after byte %d; skipping %d bytes",
                        path,
                        good_end,
                        file_size - good_end,
                    )
                else:
                    log.warning(
                        "spool segment %s has a torn tail at byte %d; truncating %d bytes",
                        path,
                        good_end,
                        file_size - good_end,
                    )
                os.truncate(path, good_end)
            if seg == self._tail:
                self._tail_size = good_end
