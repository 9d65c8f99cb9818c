"""Cryptographically secure random streams for masks, rounding and noise.

Every secret, mask, share and DP noise draw in securefed comes from here (or
from :mod:`secrets` / :func:`os.urandom` directly), never from :mod:`random` or
NumPy's generators. The stream is AES-256 in counter mode from
``cryptography`` (OpenSSL, AES-NI), keyed by a full 256-bit seed, written into
preallocated buffers with ``update_into``: allocating ``update()`` calls cost
about 3x in throughput on this machine (performance-limits.md §2.1).

A :class:`KeyStream` is deterministic given its 32-byte seed, which is what
pairwise masking needs (both peers expand the same agreed seed); for fresh
randomness use :meth:`KeyStream.fresh`, seeded from :func:`os.urandom`.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)
#: AES block size: keystream positions are addressable at this granularity.
BLOCK_BYTES = 16


def ctr_encryptor(seed: bytes, byte_offset: int = 0) -> CipherContext:
    """The AES-256-CTR encryptor of :class:`KeyStream` positioned ``byte_offset`` bytes in.

    The counter block starts at zero (the all-zero IV) and counts blocks as a
    128-bit big-endian integer, so byte ``i`` of the stream of ``seed`` is the
    same whichever offset a reader started from. This is what lets the mask
    expansion in :mod:`securefed.protocols.secagg.masking` split one stream
    across threads. ``byte_offset`` must be a multiple of 16.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"KeyStream seed must be exactly {SEED_BYTES} bytes")
    if byte_offset < 0 or byte_offset % BLOCK_BYTES:
        raise ValueError(f"byte_offset must be a non-negative multiple of {BLOCK_BYTES}")
    counter = (byte_offset // BLOCK_BYTES).to_bytes(BLOCK_BYTES, "big")
    return Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()


class KeyStream:
    """An AES-256-CTR keystream over a 256-bit seed.

    Successive calls continue the same stream, so two holders of a seed that
    make the same sequence of calls obtain identical outputs.
    """

    def __init__(self, seed: bytes) -> None:
        # A fixed all-zero IV is safe because every seed is used for one stream only.
        self._enc = ctr_encryptor(seed)

    @classmethod
    def fresh(cls) -> KeyStream:
        """A stream seeded from the operating system's CSPRNG."""
        return cls(os.urandom(SEED_BYTES))

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Overwrite ``out`` (any contiguous integer/float buffer) with keystream bytes."""
        buf = byte_view(out)
        n = len(buf)
        if n:
            # Encrypting zeros yields the raw keystream, written straight into ``out``.
            self._enc.update_into(_zeros(n)[:n], buf)
        return out

    def bytes(self, n: int) -> bytes:
        out = np.empty(n, dtype=np.uint8)
        self.fill(out)
        return out.tobytes()

    def uniform_uint(self, n: int, bits: int, out: np.ndarray | None = None) -> np.ndarray:
        """``n`` integers uniform on ``[0, 2**bits)``, ``bits`` in 1..64.

        Exact: a power-of-two range needs no rejection sampling.
        """
        if not 1 <= bits <= 64:
            raise ValueError("bits must be in 1..64")
        dtype = np.uint32 if bits <= 32 else np.uint64
        if out is None:
            out = np.empty(n, dtype=dtype)
        elif out.dtype != dtype or out.shape != (n,):
            raise ValueError(f"out must be {np.dtype(dtype).name}[{n}]")
        self.fill(out)
        width = 32 if dtype == np.uint32 else 64
        if bits < width:
            out &= dtype((1 << bits) - 1)
        return out

    def uniform_float(self, n: int, dtype: type = np.float64) -> np.ndarray:
        """``n`` floats uniform on ``[0, 1)`` with 53 (float64) or 24 (float32) random bits."""
        if dtype == np.float32:
            u = self.uniform_uint(n, 32)
            return (u >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
        u64 = self.uniform_uint(n, 64)
        return (u64 >> np.uint64(11)).astype(np.float64) * (2.0**-53)

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` float64 draws from N(0, 1) by the Box-Muller transform.

        Floating-point caveat: like every float Gaussian sampler, the output is
        a discretisation of N(0,1); Mironov (CCS 2012) shows such samplers can
        leak through their least significant bits. Distributed DP uses discrete
        Gaussian or Skellam noise on integers instead.
        """
        m = (n + 1) // 2
        u = self.uniform_float(2 * m)
        u1 = 1.0 - u[:m]  # in (0, 1]: log is finite
        u2 = u[m:]
        r = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * np.pi * u2
        out = np.empty(2 * m)
        out[:m] = r * np.cos(theta)
        out[m:] = r * np.sin(theta)
        return out[:n]


_ZERO_CACHE: dict[str, np.ndarray] = {}


def byte_view(a: np.ndarray) -> memoryview:
    """A writable byte view of a contiguous array (the ``update_into`` target)."""
    return a.data.cast("B")


def _zeros(n: int) -> memoryview:
    """A shared read-only zero buffer of at least ``n`` bytes (grown on demand)."""
    z = _ZERO_CACHE.get("z")
    if z is None or z.shape[0] < n:
        z = np.zeros(max(n, 1 << 20), dtype=np.uint8)
        z.setflags(write=False)
        _ZERO_CACHE["z"] = z
    return byte_view(z)


def random_seed() -> bytes:
    """A fresh 256-bit seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)
