"""Strict, versioned, size-limited binary framing for protocol messages.

Nothing that crosses a trust boundary is unpickled. Every payload starts with a
fixed header::

    magic "SFED" (4) | wire version u8 | protocol id u8 | kind u8 | reserved u8 | body length u32

followed by exactly ``body length`` bytes. :func:`unpack` checks every field and
the total size before looking at the body; any deviation raises
:class:`~securefed.protocols.errors.DecodeError`.

Bodies are built from a small set of typed fields read through :class:`Reader`,
which refuses to read past the end and insists the body is consumed exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import DecodeError

MAGIC = b"SFED"
WIRE_VERSION = 1
HEADER = struct.Struct(">4sBBBBI")
#: Default upper bound on one message (256 MiB): a 1e7-parameter float64 vector fits.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Frame:
    """A decoded header plus the raw body bytes."""

    protocol: int
    kind: int
    body: bytes


def pack(protocol: int, kind: int, body: bytes) -> bytes:
    """Frame ``body`` for ``protocol`` and message ``kind``."""
    if not (0 <= protocol < 256 and 0 <= kind < 256):
        raise ValueError("protocol and kind must fit in one byte")
    return HEADER.pack(MAGIC, WIRE_VERSION, protocol, kind, 0, len(body)) + body


def unpack(
    data: bytes,
    *,
    protocol: int,
    kinds: frozenset[int] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Frame:
    """Check the header of ``data`` and return its frame.

    Raises:
        DecodeError: wrong magic, version, protocol or kind; truncated or
            trailing bytes; a message larger than ``max_bytes``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < HEADER.size:
        raise DecodeError(f"message of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, proto, kind, reserved, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("bad magic: not a securefed message")
    if version != WIRE_VERSION:
        raise DecodeError(f"unsupported wire version {version} (this build speaks {WIRE_VERSION})")
    if proto != protocol:
        raise DecodeError(f"message for protocol {proto}, expected {protocol}")
    if reserved != 0:
        raise DecodeError("reserved header byte must be zero")
    if kinds is not None and kind not in kinds:
        raise DecodeError(f"unexpected message kind {kind}")
    if len(data) != HEADER.size + length:
        raise DecodeError(
            f"body length field says {length} bytes but {len(data) - HEADER.size} follow the header"
        )
    return Frame(protocol=proto, kind=kind, body=data[HEADER.size :])


class Writer:
    """Append typed fields to a body."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(struct.pack(">B", v))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(struct.pack(">I", v))
        return self

    def i64(self, v: int) -> Writer:
        self._parts.append(struct.pack(">q", v))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(struct.pack(">Q", v))
        return self

    def f64(self, v: float) -> Writer:
        self._parts.append(struct.pack(">d", v))
        return self

    def blob(self, b: bytes) -> Writer:
        """Length-prefixed bytes (u32 length)."""
        self._parts.append(struct.pack(">I", len(b)))
        self._parts.append(bytes(b))
        return self

    def array(self, a: np.ndarray) -> Writer:
        """A 1-D little-endian array: dtype code, count, raw bytes."""
        code = _DTYPE_CODES.get(np.dtype(a.dtype).newbyteorder("<").str)
        if code is None or a.ndim != 1:
            raise ValueError(f"unsupported array {a.dtype} with {a.ndim} dims")
        self._parts.append(struct.pack(">BQ", code, a.shape[0]))
        self._parts.append(np.ascontiguousarray(a, dtype=np.dtype(a.dtype).newbyteorder("<")).tobytes())
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


_DTYPE_CODES = {"<f4": 1, "<f8": 2, "<u4": 3, "<u8": 4, "<i8": 5}
_CODE_DTYPES = {v: np.dtype(k) for k, v in _DTYPE_CODES.items()}


class Reader:
    """Read typed fields from a body; never past its end."""

    def __init__(self, body: bytes) -> None:
        self._b = memoryview(body)
        self._i = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._i + n > len(self._b):
            raise DecodeError(f"truncated body: need {n} bytes at offset {self._i}, have {len(self._b) - self._i}")
        out = self._b[self._i : self._i + n]
        self._i += n
        return out

    def u8(self) -> int:
        return int(struct.unpack(">B", self._take(1))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def i64(self) -> int:
        return int(struct.unpack(">q", self._take(8))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def f64(self) -> float:
        return float(struct.unpack(">d", self._take(8))[0])

    def blob(self, max_len: int) -> bytes:
        n = self.u32()
        if n > max_len:
            raise DecodeError(f"field of {n} bytes exceeds its limit of {max_len}")
        return bytes(self._take(n))

    def array(self, *, dtype: str, length: int | None = None, max_len: int = 1 << 28) -> np.ndarray:
        code, count = struct.unpack(">BQ", self._take(9))
        want = np.dtype(dtype).newbyteorder("<")
        got = _CODE_DTYPES.get(code)
        if got is None or got != want:
            raise DecodeError(f"array of dtype code {code}, expected {want.str}")
        if count > max_len:
            raise DecodeError(f"array of {count} elements exceeds the limit of {max_len}")
        if length is not None and count != length:
            raise DecodeError(f"array has {count} elements, expected {length}")
        raw = self._take(int(count) * want.itemsize)
        return np.frombuffer(raw, dtype=want).astype(want.newbyteorder("="), copy=True)

    def done(self) -> None:
        """Insist that the whole body was consumed."""
        if self._i != len(self._b):
            raise DecodeError(f"{len(self._b) - self._i} trailing bytes after the last field")
