"""AES-256-GCM authenticated encryption with associated data.

The associated data binds a ciphertext to its context (sender, receiver, round,
stage), so a ciphertext replayed in another round or redirected to another
peer fails authentication. Nonces are 96 random bits from :func:`os.urandom`;
each key encrypts few messages, far below the 2^32 random-nonce bound of
NIST SP 800-38D §8.3.

Decryption raises :class:`~securefed.protocols.errors.IntegrityError`; it never
returns a flag.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import DecodeError, IntegrityError

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


def associated_data(protocol: str, round_index: int, stage: str, sender: int, receiver: int) -> bytes:
    p, s = protocol.encode(), stage.encode()
    return (
        b"securefed/aead/v1|"
        + struct.pack(">H", len(p)) + p
        + struct.pack(">Qqq", round_index, sender, receiver)
        + struct.pack(">H", len(s)) + s
    )


def encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """``nonce || ciphertext || tag``."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256-GCM key must be {KEY_BYTES} bytes")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt(key: bytes, blob: bytes, ad: bytes, *, max_plaintext: int = 1 << 20) -> bytes:
    """Authenticate and decrypt; raise on any failure.

    Raises:
        DecodeError: the blob is shorter than nonce + tag or longer than allowed.
        IntegrityError: the tag does not verify (tampered, wrong key or wrong context).
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256-GCM key must be {KEY_BYTES} bytes")
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise DecodeError("ciphertext shorter than nonce and tag")
    if len(blob) > NONCE_BYTES + TAG_BYTES + max_plaintext:
        raise DecodeError(f"ciphertext exceeds the {max_plaintext}-byte plaintext limit")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag as err:
        raise IntegrityError("AES-GCM authentication failed: tampered, misdirected or replayed ciphertext") from err
