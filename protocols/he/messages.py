"""Messages of homomorphic aggregation: frozen dataclasses over the strict wire format.

Every body starts with the round index and the 16-byte parameter fingerprint
(:attr:`HEParams.fingerprint`), so a peer configured with other parameters is
caught at the first message. Decoders take :class:`Limits` from the receiver's
own state (the update length, the number of chunks, the largest ciphertext)
and refuse anything larger *before* parsing ciphertexts or contexts; lengths
are read through :class:`~securefed.protocols.wire.Reader`, which never reads
past the end and insists the body is consumed exactly.

Ciphertexts travel without their context (each chunk is TenSEAL's
serialization of one ciphertext, see :mod:`.codec`); contexts travel in
:class:`Context` (authority -> server), :class:`Go` (server -> client, once per
key) and sealed inside :class:`KeyBundle` envelopes (client -> client, relayed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeVar

import numpy as np

from ..errors import DecodeError
from ..primitives.aead import NONCE_BYTES, TAG_BYTES
from ..primitives.kex import PUBLIC_KEY_BYTES
from ..wire import HEADER, Reader, Writer, pack, unpack
from .errors import ParameterMismatchError
from .keys import KEY_ID_BYTES, MAX_CONTEXT_BYTES

#: Wire protocol id of homomorphic aggregation ('H').
PROTOCOL_ID = 0x48
FINGERPRINT_BYTES = 16
MAX_ENVELOPE_BYTES = MAX_CONTEXT_BYTES + NONCE_BYTES + TAG_BYTES


class Kind(IntEnum):
    OFFER = 1
    ADVERTISE = 2
    KEY_REQUEST = 3
    KEY_BUNDLE = 4
    GO = 5
    UPLOAD = 6
    AGGREGATE = 7
    RELEASE = 8
    CONTEXT_REQUEST = 9
    CONTEXT = 10


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts, from its own configuration (never from the message)."""

    fingerprint: bytes
    dim: int
    max_clients: int
    n_chunks: int
    max_chunk_bytes: int

    def message_bytes(self, kind: Kind) -> int:
        """Upper bound on a whole message of ``kind`` (checked before any parsing)."""
        base = HEADER.size + 256
        ids = self.max_clients * (8 + 4 + PUBLIC_KEY_BYTES)
        chunks = self.n_chunks * (4 + self.max_chunk_bytes)
        if kind in (Kind.UPLOAD, Kind.AGGREGATE):
            return base + ids + chunks
        if kind == Kind.KEY_BUNDLE:
            return base + self.max_clients * (8 + 4 + MAX_ENVELOPE_BYTES)
        if kind == Kind.GO:
            return base + ids + MAX_ENVELOPE_BYTES + MAX_CONTEXT_BYTES
        if kind == Kind.CONTEXT:
            return base + MAX_CONTEXT_BYTES
        if kind == Kind.RELEASE:
            return base + ids + 9 + 8 * self.dim
        return base + ids


M = TypeVar("M", bound="HEMessage")


@dataclass(frozen=True)
class HEMessage:
    """Fields every message carries."""

    KIND: ClassVar[Kind]
    round_index: int
    fingerprint: bytes

    def _body(self, w: Writer) -> None:
        raise NotImplementedError

    def encode(self) -> bytes:
        w = Writer().u64(self.round_index).blob(self.fingerprint)
        self._body(w)
        return pack(PROTOCOL_ID, self.KIND, w.getvalue())

    @classmethod
    def _parse(cls: type[M], r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> M:
        raise NotImplementedError

    @classmethod
    def decode(cls: type[M], data: bytes, lim: Limits) -> M:
        """Parse ``data`` strictly.

        Raises:
            DecodeError: wrong framing, kind, sizes or trailing bytes.
            ParameterMismatchError: the sender uses other parameters.
        """
        frame = unpack(data, protocol=PROTOCOL_ID, kinds=frozenset({cls.KIND}), max_bytes=lim.message_bytes(cls.KIND))
        r = Reader(frame.body)
        round_index = r.u64()
        fp = r.blob(FINGERPRINT_BYTES)
        if fp != lim.fingerprint:
            raise ParameterMismatchError("peer uses other encryption parameters (fingerprint differs)")
        msg = cls._parse(r, round_index, fp, lim)
        r.done()
        return msg


def _key_id(r: Reader, *, optional: bool = False) -> bytes:
    kid = r.blob(KEY_ID_BYTES)
    if len(kid) != KEY_ID_BYTES and not (optional and not kid):
        raise DecodeError(f"key id must be {KEY_ID_BYTES} bytes, got {len(kid)}")
    return kid


def _public_key(r: Reader, *, optional: bool = False) -> bytes:
    pk = r.blob(PUBLIC_KEY_BYTES)
    if len(pk) != PUBLIC_KEY_BYTES and not (optional and not pk):
        raise DecodeError(f"X25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(pk)}")
    return pk


def _count(r: Reader, limit: int, what: str) -> int:
    n = r.u32()
    if n > limit:
        raise DecodeError(f"{n} {what} exceed the limit of {limit}")
    return n


def _ids(r: Reader, lim: Limits) -> tuple[int, ...]:
    n = _count(r, lim.max_clients, "contributors")
    ids = tuple(r.i64() for _ in range(n))
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise DecodeError("contributor list has duplicates or negative ids")
    return ids


def _chunks(r: Reader, lim: Limits) -> tuple[bytes, ...]:
    n = r.u32()
    if n != lim.n_chunks:
        raise ParameterMismatchError(f"{n} ciphertext chunks, expected {lim.n_chunks}")
    return tuple(r.blob(lim.max_chunk_bytes) for _ in range(n))


def _write_chunks(w: Writer, chunks: Sequence[bytes]) -> None:
    w.u32(len(chunks))
    for c in chunks:
        w.blob(c)


@dataclass(frozen=True)
class Offer(HEMessage):
    """Server -> client (client-held, stage ``setup``): the round, the update length, the current key."""

    KIND: ClassVar[Kind] = Kind.OFFER
    dim: int
    key_id: bytes  # empty: no key yet

    def _body(self, w: Writer) -> None:
        w.u64(self.dim).blob(self.key_id)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> Offer:
        return cls(round_index, fingerprint, r.u64(), _key_id(r, optional=True))


@dataclass(frozen=True)
class Advertise(HEMessage):
    """Client -> server (``setup``): a fresh X25519 public key and the key id the client holds."""

    KIND: ClassVar[Kind] = Kind.ADVERTISE
    public_key: bytes
    held_key_id: bytes  # empty: holds no key

    def _body(self, w: Writer) -> None:
        w.blob(self.public_key).blob(self.held_key_id)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> Advertise:
        return cls(round_index, fingerprint, _public_key(r), _key_id(r, optional=True))


@dataclass(frozen=True)
class KeyRequest(HEMessage):
    """Server -> key holder (``keys``): seal the key for these clients (empty key id: generate one)."""

    KIND: ClassVar[Kind] = Kind.KEY_REQUEST
    key_id: bytes
    recipients: tuple[tuple[int, bytes], ...]

    def _body(self, w: Writer) -> None:
        w.blob(self.key_id).u32(len(self.recipients))
        for cid, pk in self.recipients:
            w.i64(cid).blob(pk)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> KeyRequest:
        kid = _key_id(r, optional=True)
        n = _count(r, lim.max_clients, "recipients")
        recipients = tuple((r.i64(), _public_key(r)) for _ in range(n))
        if len({c for c, _ in recipients}) != n:
            raise DecodeError("duplicate recipients")
        return cls(round_index, fingerprint, kid, recipients)


@dataclass(frozen=True)
class KeyBundle(HEMessage):
    """Holder -> server (``keys``): the key id and one AES-GCM envelope per recipient."""

    KIND: ClassVar[Kind] = Kind.KEY_BUNDLE
    key_id: bytes
    envelopes: tuple[tuple[int, bytes], ...]

    def _body(self, w: Writer) -> None:
        w.blob(self.key_id).u32(len(self.envelopes))
        for cid, env in self.envelopes:
            w.i64(cid).blob(env)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> KeyBundle:
        kid = _key_id(r)
        n = _count(r, lim.max_clients, "envelopes")
        envs = tuple((r.i64(), r.blob(MAX_ENVELOPE_BYTES)) for _ in range(n))
        if len({c for c, _ in envs}) != n:
            raise DecodeError("duplicate envelope recipients")
        return cls(round_index, fingerprint, kid, envs)


@dataclass(frozen=True)
class Go(HEMessage):
    """Server -> client (``upload``): encrypt under ``key_id`` now.

    Client-held: ``holder``/``holder_public_key``/``envelope`` carry the key to
    a client that lacks it. Key-authority: ``public_context`` carries the
    public key once per key. ``peers``: the other participants' X25519 keys when
    pairwise masks are on (:mod:`.hybrid`). Empty fields are absent.
    """

    KIND: ClassVar[Kind] = Kind.GO
    dim: int
    key_id: bytes
    holder: int
    holder_public_key: bytes
    envelope: bytes
    public_context: bytes
    peers: tuple[tuple[int, bytes], ...] = ()

    def _body(self, w: Writer) -> None:
        w.u64(self.dim).blob(self.key_id).i64(self.holder).blob(self.holder_public_key)
        w.blob(self.envelope).blob(self.public_context).u32(len(self.peers))
        for cid, pk in self.peers:
            w.i64(cid).blob(pk)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> Go:
        head = (r.u64(), _key_id(r), r.i64(), _public_key(r, optional=True), r.blob(MAX_ENVELOPE_BYTES),
                r.blob(MAX_CONTEXT_BYTES))
        n = _count(r, lim.max_clients, "peers")
        peers = tuple((r.i64(), _public_key(r)) for _ in range(n))
        if len({c for c, _ in peers}) != n or any(c < 0 for c, _ in peers):
            raise DecodeError("peer list has duplicates or negative ids")
        return cls(round_index, fingerprint, *head, peers=peers)


@dataclass(frozen=True)
class Upload(HEMessage):
    """Client -> server (``upload``): the encrypted ``[w * clip(x), w]``, chunk by chunk."""

    KIND: ClassVar[Kind] = Kind.UPLOAD
    key_id: bytes
    chunks: tuple[bytes, ...]

    def _body(self, w: Writer) -> None:
        w.blob(self.key_id)
        _write_chunks(w, self.chunks)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> Upload:
        return cls(round_index, fingerprint, _key_id(r), _chunks(r, lim))


@dataclass(frozen=True)
class Aggregate(HEMessage):
    """Server -> decryptor (``decrypt``): the summed ciphertext and who is in it."""

    KIND: ClassVar[Kind] = Kind.AGGREGATE
    key_id: bytes
    contributors: tuple[int, ...]
    chunks: tuple[bytes, ...]

    def _body(self, w: Writer) -> None:
        w.blob(self.key_id).u32(len(self.contributors))
        for c in self.contributors:
            w.i64(c)
        _write_chunks(w, self.chunks)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> Aggregate:
        return cls(round_index, fingerprint, _key_id(r), _ids(r, lim), _chunks(r, lim))


@dataclass(frozen=True)
class Release(HEMessage):
    """Authority -> server (``decrypt``): the decrypted sum (key-authority mode only)."""

    KIND: ClassVar[Kind] = Kind.RELEASE
    key_id: bytes
    contributors: tuple[int, ...]
    total: np.ndarray
    total_weight: float

    def _body(self, w: Writer) -> None:
        w.blob(self.key_id).u32(len(self.contributors))
        for c in self.contributors:
            w.i64(c)
        w.array(np.asarray(self.total, dtype=np.float64)).f64(self.total_weight)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> Release:
        kid, ids = _key_id(r), _ids(r, lim)
        total = r.array(dtype="<f8", length=lim.dim)
        weight = r.f64()
        if not (np.isfinite(total).all() and np.isfinite(weight)):
            raise DecodeError("released aggregate has NaN or Inf entries")
        return cls(round_index, fingerprint, kid, ids, total, weight)


@dataclass(frozen=True)
class ContextRequest(HEMessage):
    """Server -> authority (``setup``): the public context of the current key (``rotate``: a new key)."""

    KIND: ClassVar[Kind] = Kind.CONTEXT_REQUEST
    rotate: bool

    def _body(self, w: Writer) -> None:
        w.u8(int(self.rotate))

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> ContextRequest:
        flag = r.u8()
        if flag > 1:
            raise DecodeError(f"rotate flag must be 0 or 1, got {flag}")
        return cls(round_index, fingerprint, bool(flag))


@dataclass(frozen=True)
class Context(HEMessage):
    """Authority -> server (``setup``): the public context (public key, no secret key)."""

    KIND: ClassVar[Kind] = Kind.CONTEXT
    key_id: bytes
    public_context: bytes

    def _body(self, w: Writer) -> None:
        w.blob(self.key_id).blob(self.public_context)

    @classmethod
    def _parse(cls, r: Reader, round_index: int, fingerprint: bytes, lim: Limits) -> Context:
        return cls(round_index, fingerprint, _key_id(r), r.blob(MAX_CONTEXT_BYTES))
