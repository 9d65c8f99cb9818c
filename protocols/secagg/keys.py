"""Derivations shared by SecAgg clients and server: key contexts, commitments, signed bytes.

Defined once so both sides bind exactly the same context (Flower writes its
mask sign convention twice; style-anchors.md §4):

* pairwise mask seeds ``s_uv`` and share-encryption keys ``c_uv`` are
  HKDF-SHA256 outputs of X25519 agreements whose ``info`` binds the protocol
  name and version, the round, the ordered pair ``(min(u, v), max(u, v))`` and
  the purpose (:class:`~securefed.protocols.primitives.kex.KeyContext`);
* the mask of pair ``(u, v)`` is *added* by the smaller id and *subtracted* by
  the larger one (:func:`pair_negated`), so the two cancel in the sum;
* a client commits to its self-mask seed with SHA-256 in AdvertiseKeys, so
  the server can check a reconstructed seed before using it;
* AES-GCM associated data binds protocol, round, stage, sender and receiver.
"""

from __future__ import annotations

import hashlib
import struct

from ..primitives import aead
from ..primitives.kex import KeyContext
from ..primitives.sign import signed_message
from .messages import VERSION

MASK_PURPOSE = "pairwise-mask-seed"
ENCRYPTION_PURPOSE = "share-encryption"
BUNDLE_STAGE = "share_keys"


def mask_context(protocol: str, round_index: int) -> KeyContext:
    return KeyContext(protocol=protocol, version=VERSION, round_index=round_index, purpose=MASK_PURPOSE)


def encryption_context(protocol: str, round_index: int) -> KeyContext:
    return KeyContext(protocol=protocol, version=VERSION, round_index=round_index, purpose=ENCRYPTION_PURPOSE)


def pair_negated(me: int, peer: int) -> bool:
    """True if ``me`` subtracts the mask it shares with ``peer`` (it has the larger id)."""
    return me > peer


def seed_commitment(protocol: str, round_index: int, client: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a 256-bit self-mask seed (hiding: the seed is uniformly random)."""
    p = protocol.encode()
    h = hashlib.sha256()
    h.update(b"securefed/secagg/seed-commitment/v1|")
    h.update(struct.pack(">H", len(p)) + p + struct.pack(">IQq", VERSION, round_index, client))
    h.update(seed)
    return h.digest()


def bundle_ad(protocol: str, round_index: int, sender: int, receiver: int) -> bytes:
    return aead.associated_data(protocol, round_index, BUNDLE_STAGE, sender, receiver)


def advertise_message(
    protocol: str, round_index: int, client: int, enc_public: bytes, mask_public: bytes, commitment: bytes
) -> bytes:
    header = struct.pack(">IQq", VERSION, round_index, client)
    return signed_message(f"{protocol}/advertise-keys", header, enc_public, mask_public, commitment)


def consistency_message(protocol: str, round_index: int, survivors: tuple[int, ...]) -> bytes:
    header = struct.pack(">IQ", VERSION, round_index)
    ids = b"".join(struct.pack(">q", s) for s in survivors)
    return signed_message(f"{protocol}/consistency-check", header, ids)
