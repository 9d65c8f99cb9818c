"""The SecAgg wire format: round trips, truncation, tampering, oversizing and fuzzing of every decoder.

Every malformed input must raise a typed ``RemoteProtocolError`` (in practice
``DecodeError``); nothing else may escape, and nothing is unpickled.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_secagg_harness import Stepper, exact_inputs, make

from securefed.protocols.errors import DecodeError, IntegrityError, RemoteProtocolError
from securefed.protocols.primitives import aead
from securefed.protocols.secagg.messages import (
    DECODERS,
    SHARE_PLAINTEXT,
    VERSION,
    Kind,
    Limits,
    MaskedInput,
    ShareBundle,
    UnmaskRequest,
    decode,
    peek_kind,
)

N, D = 6, 5
LIMITS = Limits(N, D + 2, 32)


def _messages() -> dict[Kind, bytes]:
    agg = make("secagg", authenticated=True, corrupt_fraction=0.0)
    s = Stepper(agg.new_round(5, exact_inputs(np.random.default_rng(0), N, D)))
    out: dict[Kind, bytes] = {}
    while not s.rnd.server.finished:
        for m in s.pending:
            out.setdefault(peek_kind(m.payload), m.payload)
        for m in s.stage():
            out.setdefault(peek_kind(m.payload), m.payload)
    return out


MESSAGES = _messages()
KINDS = sorted(MESSAGES)


def _decode(data: bytes, kind: Kind | None = None) -> object:
    if kind is None:
        return decode(data, LIMITS)
    return DECODERS[kind](data, LIMITS)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: Kind) -> None:
    msg = _decode(MESSAGES[kind], kind)
    again = msg.encode()  # type: ignore[attr-defined]
    assert again == MESSAGES[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_and_extension_is_refused(kind: Kind) -> None:
    data = MESSAGES[kind]
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            _decode(data[:cut], kind)
    with pytest.raises(DecodeError):
        _decode(data + b"\x00", kind)
    # a body-length field that covers an extra trailing byte
    longer = data[:8] + struct.pack(">I", len(data) - 12 + 1) + data[12:] + b"\x00"
    with pytest.raises(DecodeError):
        _decode(longer, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_every_single_byte_flip_is_typed(kind: Kind) -> None:
    data = MESSAGES[kind]
    step = max(1, len(data) // 600)
    for i in range(0, len(data), step):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            try:
                _decode(bytes(bad), kind)
            except RemoteProtocolError:
                pass


def test_header_fields_are_checked() -> None:
    data = MESSAGES[Kind.ADVERTISE_KEYS]
    for offset, value, what in [(0, b"XFED", "magic"), (4, b"\x02", "version"), (5, b"\x01", "protocol"),
                                (6, b"\x63", "kind"), (7, b"\x01", "reserved")]:
        bad = data[:offset] + value + data[offset + len(value):]
        with pytest.raises(DecodeError, match=what):
            _decode(bad, Kind.ADVERTISE_KEYS)
    body_version = data[:12] + bytes([VERSION + 1]) + data[13:]
    with pytest.raises(DecodeError, match="version"):
        _decode(body_version)


def test_oversized_lists_and_vectors_are_refused() -> None:
    survivors = tuple(range(N + 1))
    with pytest.raises(DecodeError):
        UnmaskRequest.decode(UnmaskRequest(5, survivors, ()).encode(), LIMITS)
    with pytest.raises(DecodeError, match="increasing"):
        UnmaskRequest.decode(UnmaskRequest(5, (1, 1), ()).encode(), LIMITS)
    with pytest.raises(DecodeError, match="entries"):
        MaskedInput.decode(MaskedInput(5, (), np.zeros(D + 3, np.uint32)).encode(), LIMITS)
    with pytest.raises(DecodeError):
        MaskedInput.decode(MaskedInput(5, (), np.zeros(D + 2, np.uint64)).encode(), LIMITS)
    small = Limits(N, D + 2, 20)
    with pytest.raises(DecodeError, match="outside"):
        MaskedInput.decode(MaskedInput(5, (), np.full(D + 2, 1 << 20, np.uint32)).encode(), small)


def test_share_bundle_and_ciphertext() -> None:
    b = ShareBundle(1, 2, 3, 4, 5)
    assert ShareBundle.decode(b.encode()) == b
    for cut in range(SHARE_PLAINTEXT.size):
        with pytest.raises(DecodeError):
            ShareBundle.decode(b.encode()[:cut])
    with pytest.raises(DecodeError, match="field element"):
        ShareBundle.decode(b.encode()[:-33] + b"\xff" * 33)
    with pytest.raises(DecodeError):
        ShareBundle.decode(b"\x02" + b.encode()[1:])
    key = bytes(32)
    ad = aead.associated_data("secagg", 3, "share_keys", 1, 2)
    ct = aead.encrypt(key, b.encode(), ad)
    for i in range(len(ct)):
        bad = bytearray(ct)
        bad[i] ^= 0x40
        with pytest.raises(IntegrityError):
            aead.decrypt(key, bytes(bad), ad)
    with pytest.raises(IntegrityError):  # same ciphertext replayed towards another receiver
        aead.decrypt(key, ct, aead.associated_data("secagg", 3, "share_keys", 1, 4))


@settings(max_examples=12_000, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    op=st.sampled_from(["replace", "insert", "delete", "random", "splice"]),
    pos=st.integers(0, 1 << 16),
    blob=st.binary(min_size=0, max_size=64),
)
def test_fuzzed_decoders_raise_only_typed_errors(kind: Kind, op: str, pos: int, blob: bytes) -> None:
    data = MESSAGES[kind]
    i = pos % (len(data) + 1)
    if op == "replace":
        bad = data[:i] + blob + data[i + len(blob):]
    elif op == "insert":
        bad = data[:i] + blob + data[i:]
    elif op == "delete":
        bad = data[:i] + data[i + len(blob):]
    elif op == "random":
        bad = blob
    else:  # keep a valid header, random body
        bad = data[:12] + blob
    for target in (None, kind):
        try:
            _decode(bad, target)
        except RemoteProtocolError:
            pass
    try:
        ShareBundle.decode(bad[: SHARE_PLAINTEXT.size])
    except RemoteProtocolError:
        pass
