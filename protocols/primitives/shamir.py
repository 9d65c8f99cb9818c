"""Shamir t-of-n secret sharing of 256-bit secrets over a 257-bit prime field.

A secret ``s`` (32 bytes, read as a big-endian integer below ``2^256``) is the
constant term of a random polynomial ``f`` of degree ``t - 1`` over
``GF(p)``; party ``x`` receives ``f(x)``. Any ``t`` shares determine ``f(0)``
by Lagrange interpolation; ``t - 1`` shares are independent of ``s``
(Shamir, CACM 1979). The field must hold every 256-bit secret, so ``p`` is
``2^256 + 297``, the smallest prime above ``2^256`` (primality is checked in
``tests/test_primitives.py`` by an independent Miller-Rabin test and by
``sympy``).

Coefficients come from :func:`secrets.randbelow`; nothing here uses
:mod:`random` or NumPy. Reconstruction of a value that is not a valid 256-bit
secret (some share was tampered with) raises
:class:`~securefed.protocols.errors.IntegrityError`; callers that hold a
commitment to the secret (the SecAgg server does, see
:mod:`securefed.protocols.secagg.server`) check it as well, since a tampered
share usually still reconstructs to *some* value below ``2^256`` with
probability about one half.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

from ..errors import ConfigurationError, DecodeError, IntegrityError

#: The field modulus: the smallest prime larger than 2^256.
PRIME = 2**256 + 297
#: Bytes of one secret.
SECRET_BYTES = 32
#: Bytes of one serialised share (an element of GF(PRIME), big-endian).
SHARE_BYTES = 33


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ConfigurationError("Shamir evaluation points must be distinct")
    for x in xs:
        if not 0 < x < PRIME:
            raise ConfigurationError(f"Shamir evaluation point {x} must be in 1..p-1 (0 is the secret)")


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Share ``secret`` so that any ``threshold`` of the points ``xs`` recover it.

    Args:
        secret: exactly 32 bytes.
        threshold: ``t`` (at least 2: with ``t = 1`` every share *is* the secret).
        xs: distinct non-zero evaluation points, one per share holder.

    Returns:
        ``{x: f(x)}`` for every ``x`` in ``xs``.
    """
    return split_many([secret], threshold, xs)[0]


def split_many(secrets_: Sequence[bytes], threshold: int, xs: Sequence[int]) -> list[dict[int, int]]:
    """:func:`split` for several secrets over the same points (one pass over ``xs``)."""
    if not 2 <= threshold <= len(xs):
        raise ConfigurationError(
            f"Shamir threshold must be in 2..{len(xs)} (the number of share holders), got {threshold}"
        )
    _check_points(xs)
    polys: list[list[int]] = []
    for s in secrets_:
        if not isinstance(s, bytes) or len(s) != SECRET_BYTES:
            raise ConfigurationError(f"a Shamir secret must be exactly {SECRET_BYTES} bytes")
        coeffs = [int.from_bytes(s, "big")]
        coeffs.extend(secrets.randbelow(PRIME) for _ in range(threshold - 1))
        polys.append(coeffs)
    out: list[dict[int, int]] = [{} for _ in polys]
    for x in xs:
        for poly, dest in zip(polys, out, strict=True):
            acc = 0
            for c in reversed(poly):  # Horner
                acc = (acc * x + c) % PRIME
            dest[x] = acc
    return out


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients ``l_j`` with ``f(0) = sum_j l_j f(x_j)`` for any ``deg f < len(xs)``.

    Cached: with the complete graph every reconstruction of a round uses the
    same responders, so the ``O(t^2)`` work is done once.
    """
    _check_points(xs)
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: Mapping[int, int], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares ``{x: f(x)}``.

    Uses the ``threshold`` shares with the smallest ``x`` (deterministic, so
    coefficient caching works).

    Raises:
        ConfigurationError: fewer than ``threshold`` shares, or bad points.
        DecodeError: a share value outside the field.
        IntegrityError: the interpolated value is not a 256-bit secret, i.e.
            at least one share was altered.
    """
    if threshold < 2:
        raise ConfigurationError("Shamir threshold must be at least 2")
    if len(shares) < threshold:
        raise ConfigurationError(f"need {threshold} shares to reconstruct, have {len(shares)}")
    xs = tuple(sorted(shares)[:threshold])
    for x in xs:
        if not 0 <= shares[x] < PRIME:
            raise DecodeError(f"share for point {x} is not a field element")
    coeffs = lagrange_at_zero(xs)
    value = sum(c * shares[x] for c, x in zip(coeffs, xs, strict=True)) % PRIME
    if value >= 1 << (8 * SECRET_BYTES):
        raise IntegrityError("Shamir shares are inconsistent: the interpolated secret is out of range")
    return value.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(value: int) -> bytes:
    if not 0 <= value < PRIME:
        raise ValueError("share is not a field element")
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    """Parse a serialised share strictly (exact length, value below the prime)."""
    if len(raw) != SHARE_BYTES:
        raise DecodeError(f"a share must be {SHARE_BYTES} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise DecodeError("share is not a field element (>= p)")
    return value
