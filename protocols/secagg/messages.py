"""SecAgg messages: frozen dataclasses and their strict, versioned wire format.

Every payload is a :mod:`securefed.protocols.wire` frame (magic, wire version,
protocol id :data:`PROTOCOL_ID`, kind) whose body starts with the SecAgg
message version :data:`VERSION` and the round index. Decoders know the exact
size of every field and the largest legal count of every list (from
:class:`Limits`, set by the round's configuration), insist that id lists are
strictly increasing (no duplicates by construction), and raise
:class:`~securefed.protocols.errors.DecodeError` on any deviation. Nothing is
pickled; the masked vector is read zero-copy with :func:`numpy.frombuffer`.

Message flow (Bonawitz et al. 2017, Fig. 4; server in the middle):

=====================  =========================  ======================
stage                  server -> client           client -> server
=====================  =========================  ======================
``advertise_keys``     AdvertiseRequest           AdvertiseKeys
``share_keys``         ShareKeysRequest           ShareKeys
``masked_input``       MaskedInputRequest         MaskedInput
``consistency_check``  ConsistencyRequest         ConsistencySignature
``unmasking``          UnmaskRequest              UnmaskResponse
=====================  =========================  ======================
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, Self

import numpy as np

from ..csprng import byte_view
from ..errors import DecodeError
from ..primitives import aead, kex, shamir
from ..primitives.sign import SIGNATURE_BYTES
from ..wire import HEADER, Reader, Writer, pack, unpack

PROTOCOL_ID: Final = 3
VERSION: Final = 1
#: Client ids must fit in a signed 62-bit range (they are packed as int64 in AEAD data).
MAX_CLIENT_ID: Final = (1 << 62) - 1
#: Length of the commitment to a self-mask seed (SHA-256).
COMMITMENT_BYTES: Final = 32
SEED_BYTES: Final = 32
#: Plaintext of one encrypted share bundle: version, sender, recipient, round, two shares.
SHARE_PLAINTEXT = struct.Struct(f">BQQQ{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")
SHARE_CIPHERTEXT_BYTES: Final = aead.NONCE_BYTES + SHARE_PLAINTEXT.size + aead.TAG_BYTES

STAGES: Final = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmasking")


class Kind(IntEnum):
    ADVERTISE_REQUEST = 1
    ADVERTISE_KEYS = 2
    SHARE_KEYS_REQUEST = 3
    SHARE_KEYS = 4
    MASKED_INPUT_REQUEST = 5
    MASKED_INPUT = 6
    CONSISTENCY_REQUEST = 7
    CONSISTENCY_SIGNATURE = 8
    UNMASK_REQUEST = 9
    UNMASK_RESPONSE = 10


#: The transport stage each message kind travels in.
STAGE_OF: Final[dict[Kind, str]] = {
    Kind.ADVERTISE_REQUEST: STAGES[0],
    Kind.ADVERTISE_KEYS: STAGES[0],
    Kind.SHARE_KEYS_REQUEST: STAGES[1],
    Kind.SHARE_KEYS: STAGES[1],
    Kind.MASKED_INPUT_REQUEST: STAGES[2],
    Kind.MASKED_INPUT: STAGES[2],
    Kind.CONSISTENCY_REQUEST: STAGES[3],
    Kind.CONSISTENCY_SIGNATURE: STAGES[3],
    Kind.UNMASK_REQUEST: STAGES[4],
    Kind.UNMASK_RESPONSE: STAGES[4],
}
#: Kinds the server sends (the rest are sent by clients).
SERVER_KINDS: Final = frozenset(
    {Kind.ADVERTISE_REQUEST, Kind.SHARE_KEYS_REQUEST, Kind.MASKED_INPUT_REQUEST, Kind.CONSISTENCY_REQUEST, Kind.UNMASK_REQUEST}
)


@dataclass(frozen=True)
class Limits:
    """Size bounds a decoder enforces, from the round's configuration.

    Attributes:
        max_clients: the number of sampled clients (bounds every id list).
        length: ring entries of a masked vector (update length + 2).
        modulus_bits: ring size ``b`` (selects uint32 or uint64 entries).
    """

    max_clients: int
    length: int
    modulus_bits: int

    @property
    def dtype(self) -> str:
        return "<u4" if self.modulus_bits <= 32 else "<u8"


def peek_kind(data: bytes) -> Kind:
    """The kind of a SecAgg payload (header checks only)."""
    if len(data) < HEADER.size:
        raise DecodeError("message shorter than the header")
    kind = data[6]
    try:
        return Kind(kind)
    except ValueError:
        raise DecodeError(f"unknown SecAgg message kind {kind}") from None


def _open(data: bytes, kind: Kind, max_body: int) -> Reader:
    frame = unpack(data, protocol=PROTOCOL_ID, kinds=frozenset({kind}), max_bytes=HEADER.size + max_body)
    r = Reader(frame.body)
    v = r.u8()
    if v != VERSION:
        raise DecodeError(f"SecAgg message version {v}, this build speaks {VERSION}")
    return r


def _start(round_index: int) -> Writer:
    return Writer().u8(VERSION).u64(round_index)


def _write_ids(w: Writer, ids: tuple[int, ...]) -> None:
    w.u32(len(ids))
    for i in ids:
        w.u64(i)


def _read_ids(r: Reader, limit: int, what: str) -> tuple[int, ...]:
    n = r.u32()
    if n > limit:
        raise DecodeError(f"{what}: {n} ids exceed the limit of {limit}")
    ids = tuple(r.u64() for _ in range(n))
    _check_ids(ids, what)
    return ids


def _check_ids(ids: tuple[int, ...], what: str) -> None:
    prev = -1
    for i in ids:
        if i > MAX_CLIENT_ID:
            raise DecodeError(f"{what}: client id {i} out of range")
        if i <= prev:
            raise DecodeError(f"{what}: ids must be strictly increasing (duplicate or unsorted {i})")
        prev = i


def _fixed(r: Reader, n: int, what: str) -> bytes:
    b = r.blob(n)
    if len(b) != n:
        raise DecodeError(f"{what} must be {n} bytes, got {len(b)}")
    return b


@dataclass(frozen=True)
class AdvertiseRequest:
    """Server opens the round: who takes part and under which parameters."""

    round_index: int
    clients: tuple[int, ...]
    k: int
    threshold: int
    length: int
    modulus_bits: int
    graph_seed: bytes

    def encode(self) -> bytes:
        w = _start(self.round_index).u32(self.k).u32(self.threshold).u64(self.length).u8(self.modulus_bits)
        w.blob(self.graph_seed)
        _write_ids(w, self.clients)
        return pack(PROTOCOL_ID, Kind.ADVERTISE_REQUEST, w.getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> AdvertiseRequest:
        r = _open(data, Kind.ADVERTISE_REQUEST, 96 + 8 * limits.max_clients)
        round_index, k, t, length, bits = r.u64(), r.u32(), r.u32(), r.u64(), r.u8()
        seed = _fixed(r, SEED_BYTES, "graph seed")
        clients = _read_ids(r, limits.max_clients, "clients")
        r.done()
        return cls(round_index, clients, k, t, length, bits, seed)


@dataclass(frozen=True)
class AdvertiseKeys:
    """A client's two round keys (Bonawitz's ``c`` and ``s``), seed commitment and signature."""

    round_index: int
    enc_public: bytes
    mask_public: bytes
    commitment: bytes
    signature: bytes = b""

    def encode(self) -> bytes:
        w = _start(self.round_index).blob(self.enc_public).blob(self.mask_public).blob(self.commitment)
        w.blob(self.signature)
        return pack(PROTOCOL_ID, Kind.ADVERTISE_KEYS, w.getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> AdvertiseKeys:
        r = _open(data, Kind.ADVERTISE_KEYS, 256)
        round_index = r.u64()
        c = _fixed(r, kex.PUBLIC_KEY_BYTES, "encryption public key")
        s = _fixed(r, kex.PUBLIC_KEY_BYTES, "masking public key")
        com = _fixed(r, COMMITMENT_BYTES, "seed commitment")
        sig = r.blob(SIGNATURE_BYTES)
        if len(sig) not in (0, SIGNATURE_BYTES):
            raise DecodeError(f"signature must be empty or {SIGNATURE_BYTES} bytes")
        r.done()
        return cls(round_index, c, s, com, sig)


@dataclass(frozen=True)
class PeerKeys:
    client: int
    enc_public: bytes
    mask_public: bytes
    commitment: bytes
    signature: bytes


@dataclass(frozen=True)
class ShareKeysRequest:
    """The advertised keys of the recipient's neighbours (sorted by id)."""

    round_index: int
    peers: tuple[PeerKeys, ...]

    def encode(self) -> bytes:
        w = _start(self.round_index).u32(len(self.peers))
        for p in self.peers:
            w.u64(p.client).blob(p.enc_public).blob(p.mask_public).blob(p.commitment).blob(p.signature)
        return pack(PROTOCOL_ID, Kind.SHARE_KEYS_REQUEST, w.getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> ShareKeysRequest:
        r = _open(data, Kind.SHARE_KEYS_REQUEST, 16 + 200 * limits.max_clients)
        round_index, n = r.u64(), r.u32()
        if n > limits.max_clients:
            raise DecodeError(f"{n} peers exceed the limit of {limits.max_clients}")
        peers = []
        for _ in range(n):
            cid = r.u64()
            c = _fixed(r, kex.PUBLIC_KEY_BYTES, "encryption public key")
            s = _fixed(r, kex.PUBLIC_KEY_BYTES, "masking public key")
            com = _fixed(r, COMMITMENT_BYTES, "seed commitment")
            sig = r.blob(SIGNATURE_BYTES)
            if len(sig) not in (0, SIGNATURE_BYTES):
                raise DecodeError(f"signature must be empty or {SIGNATURE_BYTES} bytes")
            peers.append(PeerKeys(cid, c, s, com, sig))
        r.done()
        _check_ids(tuple(p.client for p in peers), "peers")
        return cls(round_index, tuple(peers))


@dataclass(frozen=True)
class EncryptedShare:
    """An AES-GCM ciphertext of a share bundle; ``peer`` is the other end."""

    peer: int
    ciphertext: bytes


def _write_shares(w: Writer, shares: tuple[EncryptedShare, ...]) -> None:
    w.u32(len(shares))
    for s in shares:
        w.u64(s.peer).blob(s.ciphertext)


def _read_shares(r: Reader, limit: int) -> tuple[EncryptedShare, ...]:
    n = r.u32()
    if n > limit:
        raise DecodeError(f"{n} encrypted shares exceed the limit of {limit}")
    out = []
    for _ in range(n):
        peer = r.u64()
        out.append(EncryptedShare(peer, _fixed(r, SHARE_CIPHERTEXT_BYTES, "share ciphertext")))
    _check_ids(tuple(s.peer for s in out), "share peers")
    return tuple(out)


def _shares_body_max(limits: Limits) -> int:
    return 16 + (12 + SHARE_CIPHERTEXT_BYTES) * limits.max_clients


@dataclass(frozen=True)
class _SharesMessage:
    """A round index and a list of encrypted share bundles; the subclass fixes the kind."""

    KIND: ClassVar[Kind]
    round_index: int
    shares: tuple[EncryptedShare, ...]

    def encode(self) -> bytes:
        w = _start(self.round_index)
        _write_shares(w, self.shares)
        return pack(PROTOCOL_ID, self.KIND, w.getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> Self:
        r = _open(data, cls.KIND, _shares_body_max(limits))
        round_index = r.u64()
        shares = _read_shares(r, limits.max_clients)
        r.done()
        return cls(round_index, shares)


@dataclass(frozen=True)
class ShareKeys(_SharesMessage):
    """Client -> server: one encrypted share bundle per neighbour (``peer`` = recipient)."""

    KIND: ClassVar[Kind] = Kind.SHARE_KEYS


@dataclass(frozen=True)
class MaskedInputRequest(_SharesMessage):
    """Server -> client: the bundles addressed to it (``peer`` = sender)."""

    KIND: ClassVar[Kind] = Kind.MASKED_INPUT_REQUEST


@dataclass(frozen=True)
class MaskedInput:
    """Client -> server: the masked vector, and the peers whose bundles failed to decrypt."""

    round_index: int
    rejected: tuple[int, ...]
    vector: np.ndarray

    def encode(self) -> bytes:
        w = _start(self.round_index)
        _write_ids(w, self.rejected)
        vec = np.ascontiguousarray(self.vector)
        dtype = np.dtype("<u4" if vec.dtype.itemsize == 4 else "<u8")
        vec = vec.astype(dtype, copy=False)
        head = w.getvalue() + struct.pack(">BQ", 3 if dtype.itemsize == 4 else 4, vec.shape[0])
        body = b"".join([head, byte_view(vec)])
        return pack(PROTOCOL_ID, Kind.MASKED_INPUT, body)

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> MaskedInput:
        item = 4 if limits.modulus_bits <= 32 else 8
        max_body = 32 + 8 * limits.max_clients + 9 + item * limits.length
        frame = unpack(data, protocol=PROTOCOL_ID, kinds=frozenset({Kind.MASKED_INPUT}), max_bytes=HEADER.size + max_body)
        body = frame.body
        r = Reader(body[: min(len(body), 13 + 4 + 8 * limits.max_clients + 9)])
        if r.u8() != VERSION:
            raise DecodeError(f"SecAgg message version mismatch (this build speaks {VERSION})")
        round_index = r.u64()
        rejected = _read_ids(r, limits.max_clients, "rejected peers")
        offset = 1 + 8 + 4 + 8 * len(rejected)
        if len(body) < offset + 9:
            raise DecodeError("truncated masked vector header")
        code, count = struct.unpack_from(">BQ", body, offset)
        if code != (3 if item == 4 else 4):
            raise DecodeError(f"masked vector has dtype code {code}, expected {limits.dtype}")
        if count != limits.length:
            raise DecodeError(f"masked vector has {count} entries, expected {limits.length}")
        start = offset + 9
        if len(body) != start + item * count:
            raise DecodeError(f"masked vector body is {len(body) - start} bytes, expected {item * count}")
        vec = np.frombuffer(body, dtype=np.dtype(limits.dtype), count=count, offset=start)
        if not vec.dtype.isnative:
            vec = vec.astype(vec.dtype.newbyteorder("="))
        if limits.modulus_bits not in (32, 64) and int(vec.max(initial=0)) >> limits.modulus_bits:
            raise DecodeError(f"masked vector entry outside Z_2^{limits.modulus_bits}")
        return cls(round_index, rejected, vec)


@dataclass(frozen=True)
class ConsistencyRequest:
    """Server -> client: the survivors whose masked inputs will be summed."""

    round_index: int
    survivors: tuple[int, ...]

    def encode(self) -> bytes:
        w = _start(self.round_index)
        _write_ids(w, self.survivors)
        return pack(PROTOCOL_ID, Kind.CONSISTENCY_REQUEST, w.getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> ConsistencyRequest:
        r = _open(data, Kind.CONSISTENCY_REQUEST, 16 + 8 * limits.max_clients)
        round_index = r.u64()
        survivors = _read_ids(r, limits.max_clients, "survivors")
        r.done()
        return cls(round_index, survivors)


@dataclass(frozen=True)
class ConsistencySignature:
    round_index: int
    signature: bytes

    def encode(self) -> bytes:
        return pack(PROTOCOL_ID, Kind.CONSISTENCY_SIGNATURE, _start(self.round_index).blob(self.signature).getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> ConsistencySignature:
        r = _open(data, Kind.CONSISTENCY_SIGNATURE, 96)
        round_index = r.u64()
        sig = _fixed(r, SIGNATURE_BYTES, "signature")
        r.done()
        return cls(round_index, sig)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> client: whose self-mask shares (survivors) and key shares (dropped) to reveal.

    ``signatures`` (authenticated variant) are the neighbours' consistency
    signatures over ``survivors``, as ``(signer, signature)`` sorted by signer.
    """

    round_index: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        w = _start(self.round_index)
        _write_ids(w, self.survivors)
        _write_ids(w, self.dropped)
        w.u32(len(self.signatures))
        for signer, sig in self.signatures:
            w.u64(signer).blob(sig)
        return pack(PROTOCOL_ID, Kind.UNMASK_REQUEST, w.getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> UnmaskRequest:
        r = _open(data, Kind.UNMASK_REQUEST, 32 + 96 * limits.max_clients)
        round_index = r.u64()
        survivors = _read_ids(r, limits.max_clients, "survivors")
        dropped = _read_ids(r, limits.max_clients, "dropped")
        n = r.u32()
        if n > limits.max_clients:
            raise DecodeError(f"{n} signatures exceed the limit of {limits.max_clients}")
        sigs = tuple((r.u64(), _fixed(r, SIGNATURE_BYTES, "signature")) for _ in range(n))
        r.done()
        _check_ids(tuple(s for s, _ in sigs), "signers")
        return cls(round_index, survivors, dropped, sigs)


@dataclass(frozen=True)
class UnmaskResponse:
    """Client -> server: ``(peer, share)`` pairs of self-mask seeds and of masking keys."""

    round_index: int
    seed_shares: tuple[tuple[int, int], ...]
    key_shares: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        w = _start(self.round_index)
        for group in (self.seed_shares, self.key_shares):
            w.u32(len(group))
            for peer, share in group:
                w.u64(peer).blob(shamir.share_to_bytes(share))
        return pack(PROTOCOL_ID, Kind.UNMASK_RESPONSE, w.getvalue())

    @classmethod
    def decode(cls, data: bytes, limits: Limits) -> UnmaskResponse:
        r = _open(data, Kind.UNMASK_RESPONSE, 32 + 2 * (12 + shamir.SHARE_BYTES) * limits.max_clients)
        round_index = r.u64()
        groups = []
        for what in ("seed shares", "key shares"):
            n = r.u32()
            if n > limits.max_clients:
                raise DecodeError(f"{n} {what} exceed the limit of {limits.max_clients}")
            g = tuple((r.u64(), shamir.share_from_bytes(_fixed(r, shamir.SHARE_BYTES, "share"))) for _ in range(n))
            _check_ids(tuple(p for p, _ in g), what)
            groups.append(g)
        r.done()
        return cls(round_index, groups[0], groups[1])


Decoded = (
    AdvertiseRequest
    | AdvertiseKeys
    | ShareKeysRequest
    | ShareKeys
    | MaskedInputRequest
    | MaskedInput
    | ConsistencyRequest
    | ConsistencySignature
    | UnmaskRequest
    | UnmaskResponse
)

DECODERS: Final[dict[Kind, Callable[[bytes, Limits], Decoded]]] = {
    Kind.ADVERTISE_REQUEST: AdvertiseRequest.decode,
    Kind.ADVERTISE_KEYS: AdvertiseKeys.decode,
    Kind.SHARE_KEYS_REQUEST: ShareKeysRequest.decode,
    Kind.SHARE_KEYS: ShareKeys.decode,
    Kind.MASKED_INPUT_REQUEST: MaskedInputRequest.decode,
    Kind.MASKED_INPUT: MaskedInput.decode,
    Kind.CONSISTENCY_REQUEST: ConsistencyRequest.decode,
    Kind.CONSISTENCY_SIGNATURE: ConsistencySignature.decode,
    Kind.UNMASK_REQUEST: UnmaskRequest.decode,
    Kind.UNMASK_RESPONSE: UnmaskResponse.decode,
}


def decode(data: bytes, limits: Limits) -> Decoded:
    """Decode any SecAgg payload (dispatch on its kind)."""
    return DECODERS[peek_kind(data)](data, limits)


# -- encrypted share bundles -------------------------------------------------


@dataclass(frozen=True)
class ShareBundle:
    """What ``sender`` secret-shares to ``recipient``: its shares of ``b`` and of ``s_sk``."""

    sender: int
    recipient: int
    round_index: int
    seed_share: int
    key_share: int

    def encode(self) -> bytes:
        return SHARE_PLAINTEXT.pack(
            VERSION,
            self.sender,
            self.recipient,
            self.round_index,
            shamir.share_to_bytes(self.seed_share),
            shamir.share_to_bytes(self.key_share),
        )

    @classmethod
    def decode(cls, raw: bytes) -> ShareBundle:
        if len(raw) != SHARE_PLAINTEXT.size:
            raise DecodeError(f"share bundle must be {SHARE_PLAINTEXT.size} bytes, got {len(raw)}")
        v, sender, recipient, rnd, b, s = SHARE_PLAINTEXT.unpack(raw)
        if v != VERSION:
            raise DecodeError(f"share bundle version {v}, this build speaks {VERSION}")
        return cls(sender, recipient, rnd, shamir.share_from_bytes(b), shamir.share_from_bytes(s))
