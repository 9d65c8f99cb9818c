"""X25519 key agreement and HKDF-SHA256 key derivation.

Derived keys are domain-separated: the HKDF ``info`` binds the protocol name
and version, the round, the *ordered* pair of party ids and the purpose (e.g.
``"mask"`` vs ``"share-encryption"``), so one agreement never yields the same
key for two uses (RFC 5869 §3.2 on ``info``; Bonawitz et al., CCS 2017 §4
derive separate mask and encryption keys the same way).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import DecodeError

PUBLIC_KEY_BYTES = 32
KEY_BYTES = 32


@dataclass(frozen=True)
class KeyContext:
    """What a derived key is bound to (becomes the HKDF ``info``)."""

    protocol: str
    version: int
    round_index: int
    purpose: str

    def info(self, a: int, b: int) -> bytes:
        """``info`` for the ordered pair ``(min(a,b), max(a,b))``: both peers derive the same key."""
        lo, hi = (a, b) if a <= b else (b, a)
        p = self.protocol.encode()
        u = self.purpose.encode()
        return (
            b"securefed/kdf/v1|"
            + struct.pack(">H", len(p)) + p
            + struct.pack(">IQqq", self.version, self.round_index, lo, hi)
            + struct.pack(">H", len(u)) + u
        )


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair (private key object, 32 raw public-key bytes)."""
    sk = X25519PrivateKey.generate()
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sk, pk


def private_bytes(sk: X25519PrivateKey) -> bytes:
    """Raw 32-byte private key (to be secret-shared, never sent in the clear)."""
    return sk.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_bytes(sk: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``sk`` (e.g. to check a reconstructed key)."""
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise DecodeError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def load_public(raw: bytes) -> X25519PublicKey:
    """Parse a peer's raw public key strictly."""
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise DecodeError(f"X25519 public key must be {PUBLIC_KEY_BYTES} bytes")
    return X25519PublicKey.from_public_bytes(raw)


# Not a secret: a fixed scalar used only to test peer keys for small order.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def check_public(raw: bytes) -> None:
    """Refuse a public key that is malformed or of small order.

    A small-order point gives the all-zero shared secret with *every* private
    key (scalars are clamped to multiples of 8), which ``cryptography`` refuses
    at exchange time; probing with a fixed key finds it up front, so a server
    can exclude the advertiser instead of forwarding a key its peers would
    choke on.

    Raises:
        DecodeError: wrong length or small-order point.
    """
    try:
        _PROBE.exchange(load_public(raw))
    except ValueError as err:
        raise DecodeError(f"invalid X25519 public key: {err}") from err


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def agree(sk: X25519PrivateKey, peer_public: bytes, ctx: KeyContext, me: int, peer: int) -> bytes:
    """The 256-bit key shared by ``me`` and ``peer`` for ``ctx``.

    Raises:
        DecodeError: the peer's public key is malformed.
        IntegrityError-like ValueError from ``cryptography`` for a low-order point
            (all-zero shared secret) is re-raised as :class:`DecodeError`.
    """
    try:
        shared = sk.exchange(load_public(peer_public))
    except ValueError as err:  # low-order point: cryptography refuses the all-zero secret
        raise DecodeError(f"invalid peer public key: {err}") from err
    return hkdf(shared, ctx.info(me, peer))
