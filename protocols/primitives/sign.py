"""Ed25519 signatures for the authenticated (semi-malicious server) SecAgg variant.

Bonawitz et al. (CCS 2017, §4 "active adversary") let every client hold a
long-term signing key registered with a trusted PKI: clients sign their round
public keys in AdvertiseKeys and the set of survivors in ConsistencyCheck, so
the server can neither substitute keys nor show different clients different
survivor sets. Ed25519 (RFC 8032) via ``cryptography``.

Signed bytes are domain-separated by :func:`signed_message` (a context label,
the protocol version and length-prefixed fields), so a signature made for one
purpose never verifies for another. :func:`verify` raises; it never returns a
flag.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import DecodeError, IntegrityError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def generate_signing_key() -> tuple[Ed25519PrivateKey, bytes]:
    """A fresh Ed25519 key pair (private key object, 32 raw public-key bytes)."""
    sk = Ed25519PrivateKey.generate()
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sk, pk


def load_verify_key(raw: bytes) -> Ed25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise DecodeError(f"Ed25519 public key must be {PUBLIC_KEY_BYTES} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def signed_message(context: str, *fields: bytes) -> bytes:
    """The exact bytes that get signed: ``securefed/sig/v1|context|len-prefixed fields``."""
    c = context.encode()
    parts = [b"securefed/sig/v1|", struct.pack(">H", len(c)), c]
    for f in fields:
        parts.append(struct.pack(">I", len(f)))
        parts.append(f)
    return b"".join(parts)


def sign(sk: Ed25519PrivateKey, message: bytes) -> bytes:
    return sk.sign(message)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check ``signature`` on ``message`` under ``public_key``.

    Raises:
        DecodeError: malformed key or signature length.
        IntegrityError: the signature does not verify.
    """
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise DecodeError(f"Ed25519 signature must be {SIGNATURE_BYTES} bytes")
    key = load_verify_key(public_key)
    try:
        key.verify(signature, message)
    except InvalidSignature as err:
        raise IntegrityError("Ed25519 signature does not verify") from err
