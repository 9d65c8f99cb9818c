"""Fixed-point encoding of float vectors into the ring Z_{2^b}.

Masking (SecAgg) and BFV aggregate integers, so a float update ``x`` becomes

1. ``clip(x, -c, c)``, counting the entries that were clipped;
2. multiplied by the client's weight ``w <= max_weight`` and by ``2^f``;
3. rounded *stochastically*: ``floor(y + u)`` with ``u ~ U[0, 1)`` from a
   CSPRNG, so ``E[round(y)] = y`` and the rounding error of a sum of n clients
   is zero-mean with variance at most n/4 units (Gupta et al. 2015 for
   unbiasedness; TFF's ``SecureSumFactory`` uses the same scheme);
4. mapped to ``Z_{2^b}`` by two's complement.

After the sum, :meth:`FixedPointEncoder.decode_sum` maps back to signed
integers and divides by ``2^f``.

**No wrap-around, by construction.** Every encoded entry lies in
``[-(m+1), m+1]`` with ``m = ceil(c * max_weight * 2^f)``, so the true sum of n
clients lies in ``[-n(m+1), n(m+1)]``; it decodes exactly iff
``n(m+1) < 2^(b-1)``. :meth:`FixedPointEncoder.check_capacity` proves that
inequality at set-up and refuses a configuration that could overflow, naming
the knobs to change.

**Weights under masking.** Weighted FedAvg needs ``sum w_i x_i`` and
``sum w_i``. Clients scale by their own weight before encoding, and the weight
is summed securely too (the protocol appends it as one more encoded entry), so
the server learns only the two sums, never an individual weight. Bounding the
weight by ``max_weight`` is what makes the capacity proof possible.

**Two rounding paths.** :meth:`FixedPointEncoder.encode` draws a 53-bit
uniform per entry and works on whole-vector float64 copies. The SecAgg client
hot path uses :class:`ChunkQuantizer` (and :meth:`FixedPointEncoder.encode_fast`
built on it) instead: the same clip-scale-round-wrap steps, cache-sized chunks,
preallocated buffers and a 32-bit uniform per entry taken from a
position-addressable AES-256-CTR stream (so threads can split a vector). The
32-bit uniform ``u = r / 2^32`` makes ``P[round up]`` equal to the fractional
part rounded up to a multiple of ``2^-32``: exactly unbiased whenever the
scaled value has at most 32 fractional bits (e.g. every float32 entry with
``|x * 2^f| >= 2^-8`` at weight 1) and biased by less than ``2^-32`` of one
quantization step otherwise, far below float32 input resolution. Halving the
random bytes is what keeps encoding within budget next to mask expansion
(performance-limits.md §2.2).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .csprng import SEED_BYTES, KeyStream, byte_view, ctr_encryptor
from .errors import ConfigurationError, OverflowRiskError


@dataclass(frozen=True)
class EncodedVector:
    """An encoded update: ring elements plus how many entries were clipped."""

    values: np.ndarray
    clipped: int


@dataclass(frozen=True)
class FixedPointEncoder:
    """Clip, scale, stochastically round and wrap floats into ``Z_{2^modulus_bits}``.

    Attributes:
        clip: per-entry clipping bound ``c`` (> 0).
        scale_bits: fractional bits ``f``: resolution ``2^-f``.
        modulus_bits: ring size ``b`` (1..64); uint32 storage for b <= 32.
        max_weight: largest client weight allowed (1.0 for unweighted sums).
    """

    clip: float
    scale_bits: int
    modulus_bits: int = 32
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigurationError(f"clip must be a positive finite number, got {self.clip}")
        if not 0 <= self.scale_bits <= 52:
            raise ConfigurationError(f"scale_bits must be in 0..52, got {self.scale_bits}")
        if not 2 <= self.modulus_bits <= 64:
            raise ConfigurationError(f"modulus_bits must be in 2..64, got {self.modulus_bits}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigurationError(f"max_weight must be positive and finite, got {self.max_weight}")
        if self.max_entry >= 2 ** (self.modulus_bits - 1):
            raise OverflowRiskError(
                f"one encoded entry (up to {self.max_entry}) does not fit in {self.modulus_bits} bits: "
                "lower clip, scale_bits or max_weight, or raise modulus_bits"
            )

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.modulus_bits <= 32 else np.uint64

    @property
    def max_entry(self) -> int:
        """Largest absolute value of one encoded entry (after stochastic rounding)."""
        return math.ceil(self.clip * self.max_weight * 2.0**self.scale_bits) + 1

    def max_clients(self) -> int:
        """Largest number of summands that provably cannot wrap."""
        return (2 ** (self.modulus_bits - 1) - 1) // self.max_entry

    def check_capacity(self, n_clients: int) -> None:
        """Raise :class:`OverflowRiskError` unless a sum of ``n_clients`` cannot wrap."""
        if n_clients < 1:
            raise ConfigurationError("n_clients must be at least 1")
        if n_clients > self.max_clients():
            need = math.ceil(math.log2(n_clients * self.max_entry + 1)) + 1
            raise OverflowRiskError(
                f"a sum of {n_clients} clients could reach {n_clients * self.max_entry} in absolute value, "
                f"which wraps modulo 2^{self.modulus_bits} (at most {self.max_clients()} clients fit). "
                f"Raise modulus_bits to >= {need}, lower scale_bits (now {self.scale_bits}), "
                f"lower clip (now {self.clip}) or max_weight (now {self.max_weight}), or use fewer clients."
            )

    def encode(self, x: np.ndarray, weight: float = 1.0, stream: KeyStream | None = None) -> EncodedVector:
        """Encode ``weight * clip(x)``; rounding randomness comes from ``stream`` (a CSPRNG)."""
        if x.ndim != 1:
            raise ValueError("encode expects a 1-D vector")
        if not (0 <= weight <= self.max_weight):
            raise ConfigurationError(f"weight {weight} outside [0, max_weight={self.max_weight}]")
        y = np.asarray(x, dtype=np.float64).copy()
        if not np.isfinite(y).all():
            raise ValueError("cannot encode NaN or Inf entries")
        clipped = int(np.count_nonzero(np.abs(y) > self.clip))
        np.clip(y, -self.clip, self.clip, out=y)
        y *= weight * 2.0**self.scale_bits
        rng = stream if stream is not None else KeyStream.fresh()
        y += rng.uniform_float(y.shape[0])
        np.floor(y, out=y)
        return EncodedVector(values=self._to_ring(y.astype(np.int64)), clipped=clipped)

    def encode_fast(
        self, x: np.ndarray, weight: float = 1.0, rounding_seed: bytes | None = None
    ) -> EncodedVector:
        """Encode ``weight * clip(x)`` with :class:`ChunkQuantizer` (32-bit rounding uniforms).

        ``rounding_seed`` (32 bytes) makes the result reproducible: entry ``i``
        uses the ``i``-th little-endian uint32 of the AES-256-CTR stream of that
        seed, exactly as the SecAgg client does. ``None`` draws a fresh seed from
        :func:`os.urandom`.
        """
        if x.ndim != 1:
            raise ValueError("encode expects a 1-D vector")
        seed = rounding_seed if rounding_seed is not None else os.urandom(SEED_BYTES)
        return _fast_encode(self, x, weight, seed)

    def encode_integers(self, ints: np.ndarray) -> np.ndarray:
        """Two's-complement map already-integer values (e.g. integer DP noise) into the ring."""
        return self._to_ring(np.asarray(ints, dtype=np.int64))

    def _to_ring(self, ints: np.ndarray) -> np.ndarray:
        ring = ints.view(np.uint64)
        if self.modulus_bits < 64:
            ring = ring & np.uint64((1 << self.modulus_bits) - 1)
        return ring.astype(self.dtype)

    def add(self, acc: np.ndarray, other: np.ndarray) -> np.ndarray:
        """In-place ring addition ``acc += other (mod 2^b)``."""
        acc += other
        if self.modulus_bits not in (32, 64):
            acc &= self.dtype((1 << self.modulus_bits) - 1)
        return acc

    def to_signed(self, total: np.ndarray) -> np.ndarray:
        """Map ring elements back to signed int64 (two's complement in b bits)."""
        t = np.asarray(total).astype(np.uint64)
        if self.modulus_bits < 64:
            t &= np.uint64((1 << self.modulus_bits) - 1)
            signed = t.astype(np.int64)
            signed[signed >= (1 << (self.modulus_bits - 1))] -= 1 << self.modulus_bits
            return signed
        return t.view(np.int64)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """Decode a ring sum of encoded vectors to float64 (``sum w_i clip(x_i)``)."""
        return self.to_signed(total).astype(np.float64) * 2.0**-self.scale_bits


#: Random bits consumed per entry by :class:`ChunkQuantizer` (one little-endian uint32).
ROUNDING_BITS = 32
_INV_2_32 = 2.0**-32


class ChunkQuantizer:
    """Clip, scale and stochastically round float chunks into ring integers, in place.

    One instance per (encoder, weight); buffers are allocated once for chunks
    of up to ``chunk`` entries and reused, so the per-chunk work is five NumPy
    passes over cache-resident memory and no allocation. Not thread-safe: give
    each thread its own instance.

    Clipping after scaling is bit-identical to :meth:`FixedPointEncoder.encode`
    order (clip, then scale): rounding is monotone, so ``fl(x*s)`` is clamped
    exactly at ``fl(c*s)``.
    """

    def __init__(self, encoder: FixedPointEncoder, weight: float, chunk: int) -> None:
        if not (math.isfinite(weight) and 0 <= weight <= encoder.max_weight):
            raise ConfigurationError(f"weight {weight} outside [0, max_weight={encoder.max_weight}]")
        if chunk < 1:
            raise ValueError("chunk must be positive")
        self.encoder = encoder
        self._scale = float(weight) * 2.0**encoder.scale_bits
        self._limit = encoder.clip * self._scale
        self._y = np.empty(chunk, dtype=np.float64)
        self._u = np.empty(chunk, dtype=np.float64)

    def count_clipped(self, x: np.ndarray) -> int:
        """Entries of ``x`` with ``|x| > clip``; raises ``ValueError`` on NaN/Inf.

        Two reductions answer the common case (nothing to clip, all finite)
        without a temporary array.
        """
        if x.shape[0] == 0:
            return 0
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("cannot encode NaN or Inf entries")
        c = self.encoder.clip
        if -c <= lo and hi <= c:
            return 0
        if x.dtype == np.float32:
            # For float32 x, ``x > c`` (real comparison) iff ``x > c32`` where c32 is
            # the largest float32 <= c: no float64 copy of the vector needed.
            c32 = np.float32(c)
            if float(c32) > c:
                c32 = np.nextafter(c32, np.float32(-np.inf))
            return int(np.count_nonzero(x > c32) + np.count_nonzero(x < -c32))
        x64 = np.asarray(x, dtype=np.float64)
        return int(np.count_nonzero(x64 > c) + np.count_nonzero(x64 < -c))

    def quantize_into(self, x: np.ndarray, rand: np.ndarray, out: np.ndarray, *, clip: bool) -> None:
        """``out[i] = floor(clip(x[i]) * w * 2^f + rand[i] / 2^32)`` as signed integers.

        ``rand`` is a uint32 chunk of CSPRNG output; ``out`` is an int32 (b <= 32)
        or int64 (b > 32) view of the ring buffer: two's complement does the
        wrap into ``Z_{2^32}`` / ``Z_{2^64}``; callers mask to ``b`` bits.
        """
        n = x.shape[0]
        y = self._y[:n]
        u = self._u[:n]
        np.multiply(x, self._scale, out=y, dtype=np.float64)
        if clip:
            np.clip(y, -self._limit, self._limit, out=y)
        np.multiply(rand, _INV_2_32, out=u, dtype=np.float64)
        y += u
        np.floor(y, out=y)
        np.copyto(out, y, casting="unsafe")


def _fast_encode(
    encoder: FixedPointEncoder, x: np.ndarray, weight: float, rounding_seed: bytes, chunk: int = 16384
) -> EncodedVector:
    q = ChunkQuantizer(encoder, weight, chunk)
    clipped = q.count_clipped(x)
    d = x.shape[0]
    out = np.empty(d, dtype=encoder.dtype)
    signed = out.view(np.int32 if encoder.dtype == np.uint32 else np.int64)
    rand = np.empty(chunk, dtype=np.uint32)
    zeros = bytes(4 * chunk)
    enc = ctr_encryptor(rounding_seed)
    for lo in range(0, d, chunk):
        hi = min(d, lo + chunk)
        r = rand[: hi - lo]
        enc.update_into(zeros[: 4 * (hi - lo)], byte_view(r))
        q.quantize_into(x[lo:hi], r, signed[lo:hi], clip=clipped > 0)
    if encoder.modulus_bits not in (32, 64):
        out &= encoder.dtype((1 << encoder.modulus_bits) - 1)
    return EncodedVector(values=out, clipped=clipped)
