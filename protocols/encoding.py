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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .csprng import KeyStream
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
