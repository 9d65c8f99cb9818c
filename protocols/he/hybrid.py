"""Hybrid BFV + pairwise masking: a key holder colluding with the server sees only masked updates.

With ``pairwise_masks = true`` (BFV only), every pair of participants
``i < j`` agrees a seed by X25519 + HKDF (purpose ``"he-pairwise-mask"``,
bound to the round and the ordered pair) and expands it with AES-256-CTR into
a vector ``m_ij`` uniform modulo the plaintext modulus ``t``. Client ``i``
encrypts ``x_i + sum_{j>i} m_ij - sum_{j<i} m_ij (mod t)``. BFV adds modulo
``t``, so the masks cancel in the sum of all participants and the decrypted
aggregate is exact; but one client's ciphertext, decrypted by anyone holding
the key (a client under client-held keys, or the authority), is uniformly
random modulo ``t`` unless the decryptor also knows every seed of that client,
i.e. colludes with all its peers (the pairwise-mask argument of Bonawitz et
al., CCS 2017, §3, with HE in place of the outer layer).

Masks need exact modular arithmetic, hence BFV; CKKS's approximate sums
cannot cancel uniform masks.

**No dropout recovery.** Recovering the masks of a client that vanished
after masking requires the survivors to reveal its seeds, which lets a server
that *claims* a dropout unmask that client (SecAgg's double masking with
Shamir-shared self-masks exists to prevent exactly that). This mode does not
implement that recovery: if a participant fails to upload, the round aborts
(the server learns nothing; all ciphertexts are discarded). Use SecAgg/SecAgg+
when dropouts are frequent.

Threat model: semi-honest server; the peer list the server relays is taken on
trust (a malicious server could give a client fake peers whose masks it
knows; authenticated public keys prevent that).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..csprng import KeyStream
from ..primitives import kex
from .keys import PROTOCOL_NAME, PROTOCOL_VERSION


def uniform_mod(stream: KeyStream, n: int, modulus: int) -> np.ndarray:
    """``n`` integers uniform on ``[0, modulus)`` by rejection sampling (no modulo bias)."""
    if not 2 <= modulus < 2**62:
        raise ValueError("modulus must be in [2, 2^62)")
    bits = (modulus - 1).bit_length()
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        want = n - filled
        # Acceptance is at least 1/2; draw a little more than twice what is missing.
        draw = stream.uniform_uint(2 * want + 64, bits).astype(np.int64)
        ok = draw[draw < modulus][:want]
        out[filled : filled + ok.shape[0]] = ok
        filled += ok.shape[0]
    return out


def mask_seed(sk: X25519PrivateKey, peer_public: bytes, round_index: int, me: int, peer: int) -> bytes:
    ctx = kex.KeyContext(PROTOCOL_NAME, PROTOCOL_VERSION, round_index, "he-pairwise-mask")
    return kex.agree(sk, peer_public, ctx, me, peer)


def pairwise_mask(
    sk: X25519PrivateKey, me: int, peers: Sequence[tuple[int, bytes]], round_index: int, modulus: int, length: int
) -> np.ndarray:
    """Client ``me``'s net mask ``sum_{j>me} m_ij - sum_{j<me} m_ij (mod t)``, in ``[0, t)``."""
    total = np.zeros(length, dtype=np.int64)
    for peer, pk in peers:
        if peer == me:
            raise ValueError("a client is not its own peer")
        m = uniform_mod(KeyStream(mask_seed(sk, pk, round_index, me, peer)), length, modulus)
        if peer > me:
            total += m
        else:
            total -= m
        np.mod(total, modulus, out=total)
    return total


def apply_mask(ints: np.ndarray, mask: np.ndarray, modulus: int) -> np.ndarray:
    """``ints + mask (mod t)`` in the centred range ``(-t/2, t/2]`` that SEAL's batch encoder takes."""
    out = np.mod(ints.astype(np.int64) + mask, modulus)
    half = modulus // 2
    out[out > half] -= modulus
    return out
