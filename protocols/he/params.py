"""Encryption parameters chosen for what aggregation needs: additions only.

Federated averaging under homomorphic encryption never multiplies two
ciphertexts and never rescales, so it needs **one data prime**: the
coefficient modulus is ``[q0, p]`` with a 60-bit data prime ``q0`` and a
special prime ``p`` that SEAL keeps for key generation (and which makes
public-key encryption *quieter*: SEAL encrypts at the key level and divides
by ``p``, see below). A fresh or summed ciphertext lives modulo ``q0`` alone:
``2 * N * 8`` bytes for ``N/2`` CKKS values (32 B/value) or ``N`` BFV values
(16 B/value). General-purpose chains such as NVFlare's ``[60, 40, 40]`` carry
one or two primes that addition never uses (57.6 B/value, performance-limits.md
§2.4).

Why 60 bits and not the smallest prime that fits: a ciphertext coefficient is
stored in a 64-bit word whatever the prime; SEAL's zstd compression recovers
some bytes for smaller primes (50-bit: 28.9 instead of 32.2 B/value), but we
measured server-side deserialization at 2.3x the cost, so the largest prime is
the better trade. Every bit of ``q0`` then goes to precision and capacity: this
module picks the *largest* CKKS scale / BFV fixed-point resolution that cannot
overflow for ``max_clients`` summands, and refuses (``ConfigurationError``)
when that still misses the precision the caller asked for.

**Security.** ``N`` and the total modulus size must respect the 128-bit
classical bounds of the Homomorphic Encryption Standard (Albrecht et al.,
2018; SEAL's ``CoeffModulus::MaxBitCount``): 109 bits at N=4096, 218 at 8192.
``[60, 40]`` = 100 bits fits both; SEAL itself also refuses insecure sets.

**CKKS error model** (checked against measurements in ``tests/test_he_params.py``).
A decrypted slot carries ``sum_j e_j * zeta^j / Delta`` for the coefficient
error ``e``; its real part has variance ``v * N / 2`` (in units of ``1/Delta``)
where ``v`` is the per-coefficient error variance of one fresh ciphertext:

* symmetric (secret-key) encryption: ``v = Var(e) + 1/12`` with SEAL's
  centred binomial noise (42 coins, variance 10.5) plus encoding round-off;
* public-key encryption: SEAL encrypts at the key level and divides by the
  special prime, leaving the rounding ``r0 + r1*s`` (ternary ``s``):
  ``v = (2 + 2N/3) / 12`` (the key-level noise shrinks by ``p``).

A sum of ``n`` independent ciphertexts has ``n`` times that variance. For
symmetric encryption the error is Gaussian and the bound is
``z * sqrt(n * v * N / 2) / Delta`` with ``z = 9`` (tail ~1e-19 per value). For
public-key encryption the dominant term ``r1 * s`` is a product of two complex
Gaussians in the slot domain, so its real part is Laplace-distributed (we
measured kurtosis 6) and heavier-tailed: the bound uses the Laplace tail
instead (:func:`ckks_error_bound`). A double-precision term covers the FFT of
encoding/decoding.

**BFV noise model** (worst case, no probability). SEAL scales a plaintext as
``round(q*m/t)``, so after ``n`` additions the error is at most
``n * (B_fresh + 1/2)``, and decryption is exact iff that stays below
``q0 / (2t)``. ``B_fresh`` is 21 for symmetric encryption (the CBD bound) and
``(N+1)/2 + 1`` for public-key encryption (the rounding after dividing by the
special prime) plus the shrunk key-level noise. The plaintext modulus ``t`` is
the smallest NTT-friendly prime (``t = 1 mod 2N``, needed for batching) above
``2^b``, where ``b`` bits hold the signed sum of ``n`` quantized values
(:class:`~securefed.protocols.encoding.FixedPointEncoder` proves the latter).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from functools import cached_property

import tenseal as ts

from ..encoding import FixedPointEncoder
from ..errors import ConfigurationError

SCHEMES = ("ckks", "bfv")

#: Largest total coefficient-modulus size (bits) for 128-bit classical security
#: with a ternary secret (HE Standard table; SEAL ``CoeffModulus::MaxBitCount``).
MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: The one data prime: SEAL's largest prime size (and a 64-bit word either way).
DATA_PRIME_BITS = 60
#: The key-level ("special") prime; addition never touches it.
SPECIAL_PRIME_BITS = 40
#: SEAL's default noise: centred binomial with 42 coin flips.
CBD_VARIANCE = 10.5
CBD_MAX = 21
#: Gaussian tail multiplier of the CKKS error bound.
CKKS_Z = 9.0
#: Largest plaintext modulus SEAL accepts (bits).
MAX_PLAIN_BITS = 60
#: BFV: largest encoded magnitude (bits). The encoder rounds ``floor(y + u)`` in
#: float64; below 2^44 the float spacing is at most 2^-8, so one entry's
#: rounding error stays below ``1 + 2^-7`` units (see :meth:`HEParams.error_bound`).
MAX_ENCODED_BITS = 44
BFV_ROUNDING_SLACK = 1.0 + 2.0**-7


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (first 12 prime bases; Sorenson & Webster 2016)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime_above(lower: int, poly_modulus_degree: int) -> int:
    """Smallest prime ``t > lower`` with ``t = 1 (mod 2N)``: what BFV batching needs."""
    m = 2 * poly_modulus_degree
    t = ((lower - 1) // m + 1) * m + 1
    while not is_prime(t):
        t += m
    return t


def ckks_coefficient_variance(poly_modulus_degree: int, symmetric: bool) -> float:
    """Per-coefficient error variance of one fresh CKKS ciphertext (see the module docstring)."""
    n = poly_modulus_degree
    if symmetric:
        return CBD_VARIANCE + 1.0 / 12.0
    key_level = (4.0 * n / 3.0 + 1.0) * CBD_VARIANCE / float(2**SPECIAL_PRIME_BITS) ** 2
    return (2.0 + 2.0 * n / 3.0) / 12.0 + key_level


#: Largest number of values a bound is meant to cover, and its failure probability.
BOUND_VALUES = 2**30
BOUND_FAILURE = 2.0**-40


def ckks_error_bound(poly_modulus_degree: int, symmetric: bool, scale_bits: int, n: int, magnitude: float) -> float:
    """Bound on ``max |decrypted sum - true sum|`` for ``n`` ciphertexts of values below ``magnitude``.

    Symmetric encryption: the slot error is Gaussian (a sum of ``N`` small
    independent terms), bounded at ``z = 9`` standard deviations. Public-key
    encryption: the dominant term ``r1 * s`` is a *product* in the slot domain,
    ``s(zeta) * R(zeta)`` with both factors complex Gaussian, whose real part is
    Laplace-distributed with scale ``b = sqrt(E|s|^2 E|R|^2) / 2`` (measured
    kurtosis 6, not 3); it is bounded by ``b * ln(BOUND_VALUES / BOUND_FAILURE)``.
    Plus a double-precision term for the FFT in encoding and decoding.
    """
    N = poly_modulus_degree  # noqa: N806 (the paper's name)
    fft = max(1.0, n * magnitude) * 2.0**-44
    if symmetric:
        var = ckks_coefficient_variance(N, True)
        return CKKS_Z * math.sqrt(n * var * N / 2.0) * 2.0**-scale_bits + fft
    # r0 (and the encoding round-off): Gaussian, variance n * N * (2/12) / 2 for the real part.
    gaussian = CKKS_Z * math.sqrt(n * N / 12.0)
    # r1 * s: E|s(zeta)|^2 = 2N/3 (ternary secret), E|R(zeta)|^2 = n N / 12 (uniform rounding).
    laplace = 0.5 * math.sqrt((2.0 * N / 3.0) * (n * N / 12.0)) * math.log(BOUND_VALUES / BOUND_FAILURE)
    key_level = CKKS_Z * math.sqrt(n * (ckks_coefficient_variance(N, False) - (2.0 + 2.0 * N / 3.0) / 12.0) * N / 2)
    return (gaussian + laplace + key_level) * 2.0**-scale_bits + fft


def bfv_fresh_noise_bound(poly_modulus_degree: int, symmetric: bool) -> float:
    """Worst-case infinity norm of the error of one fresh BFV ciphertext (see the module docstring)."""
    if symmetric:
        return float(CBD_MAX)
    n = poly_modulus_degree
    key_level = (2.0 * n * CBD_MAX + CBD_MAX) / 2.0 ** (SPECIAL_PRIME_BITS - 1)
    return (n + 1) / 2.0 + 1.0 + key_level


@dataclass(frozen=True)
class HEParams:
    """One scheme's parameters, chosen by :func:`select_params` (public: every party may know them).

    Attributes:
        scheme: ``"ckks"`` or ``"bfv"``.
        poly_modulus_degree: ``N``.
        coeff_mod_bit_sizes: ``(data prime, special prime)`` bit sizes.
        symmetric: clients encrypt with the secret key (client-held keys) or
            the public key (key authority).
        max_clients: the largest sum the parameters are proven for.
        clip: per-entry bound clients clip to before weighting.
        max_weight: the largest client weight.
        scale_bits: CKKS ``log2 Delta``; BFV fractional bits ``f`` of the fixed-point encoding.
        plain_modulus: BFV ``t`` (0 for CKKS).
        plain_bits: BFV: the encoder's ring bits ``b`` (``2^b < t``); 0 for CKKS.
        precision: the requested bound on ``max |decrypted - true|`` of a ``max_clients`` sum.
    """

    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    symmetric: bool
    max_clients: int
    clip: float
    max_weight: float
    scale_bits: int
    plain_modulus: int = 0
    plain_bits: int = 0
    precision: float = field(default=0.0)

    @property
    def slots(self) -> int:
        """Values per ciphertext: N/2 complex slots for CKKS (real parts used), N for BFV."""
        return self.poly_modulus_degree // 2 if self.scheme == "ckks" else self.poly_modulus_degree

    @property
    def scale(self) -> float:
        return float(2.0**self.scale_bits) if self.scheme == "ckks" else 1.0

    def n_chunks(self, length: int) -> int:
        return -(-length // self.slots)

    def chunk_lengths(self, length: int) -> list[int]:
        k = self.n_chunks(length)
        return [self.slots] * (k - 1) + [length - self.slots * (k - 1)] if k else []

    @property
    def max_chunk_bytes(self) -> int:
        """Upper bound on one serialized ciphertext: two polynomials mod the data prime, plus framing."""
        return 2 * self.poly_modulus_degree * 8 + 4096

    @property
    def magnitude(self) -> float:
        """Largest absolute value of one client's plaintext slot (data: clip*w; weight slot: w)."""
        return max(self.clip, 1.0) * self.max_weight

    def error_bound(self, n: int) -> float:
        """A-priori bound on ``max |decrypted sum - sum of w*clip(x)|`` for ``n`` contributors.

        CKKS: noise, except with negligible probability. BFV: the stochastic
        rounding of each client (< 1 unit of ``2^-f`` per entry), deterministically;
        the homomorphic sum itself is exact. The stochastic rounding happens in
        float64, so a value near ``2^44`` can land up to ``2^-8`` units beyond
        the unit interval: hence the slack factor ``1 + 2^-7``.
        """
        if self.scheme == "ckks":
            return ckks_error_bound(self.poly_modulus_degree, self.symmetric, self.scale_bits, n, self.magnitude)
        return n * BFV_ROUNDING_SLACK * 2.0**-self.scale_bits

    def data_encoder(self) -> FixedPointEncoder:
        """BFV: the fixed-point encoder of ``w * clip(x)`` (shared with SecAgg)."""
        self._need_bfv()
        return FixedPointEncoder(self.clip, self.scale_bits, self.plain_bits, self.max_weight)

    def weight_encoder(self) -> FixedPointEncoder:
        """BFV: the encoder of the weight itself (clip = max_weight, so nothing is clipped)."""
        self._need_bfv()
        return FixedPointEncoder(self.max_weight, self.scale_bits, self.plain_bits, 1.0)

    def _need_bfv(self) -> None:
        if self.scheme != "bfv":
            raise ConfigurationError("fixed-point encoders belong to BFV parameters")

    def new_context(self, *, symmetric: bool | None = None) -> ts.Context:
        """A fresh TenSEAL context with a new secret key (and public key if asymmetric)."""
        sym = self.symmetric if symmetric is None else symmetric
        enc = ts.ENCRYPTION_TYPE.SYMMETRIC if sym else ts.ENCRYPTION_TYPE.ASYMMETRIC
        if self.scheme == "ckks":
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS, self.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes), encryption_type=enc, n_threads=1,
            )
            ctx.global_scale = self.scale
        else:
            ctx = ts.context(
                ts.SCHEME_TYPE.BFV, self.poly_modulus_degree, plain_modulus=self.plain_modulus,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes), encryption_type=enc, n_threads=1,
            )
        return ctx

    @cached_property
    def parms_id(self) -> tuple[int, ...]:
        """SEAL's hash of the data-level parameters: what every valid ciphertext must carry."""
        ctx = self.new_context(symmetric=True)
        return tuple(ctx.data.seal_context().first_parms_id())

    @cached_property
    def fingerprint(self) -> bytes:
        """16 bytes naming these parameters in every message (catches misconfigured peers early)."""
        desc = struct.pack(
            ">6sIBdddIQI", self.scheme.encode().ljust(6, b"\0"), self.poly_modulus_degree, int(self.symmetric),
            self.clip, self.max_weight, self.precision, self.scale_bits, self.plain_modulus, self.max_clients,
        ) + bytes(self.coeff_mod_bit_sizes)
        return hashlib.sha256(b"securefed/he/params/v1|" + desc).digest()[:16]


def _check_common(max_clients: int, clip: float, max_weight: float, precision: float, poly_modulus_degree: int) -> None:
    if poly_modulus_degree not in MAX_COEFF_BITS:
        raise ConfigurationError(
            f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS)}, got {poly_modulus_degree}"
        )
    if sum((DATA_PRIME_BITS, SPECIAL_PRIME_BITS)) > MAX_COEFF_BITS[poly_modulus_degree]:
        raise ConfigurationError(f"poly_modulus_degree {poly_modulus_degree} is too small for a 60-bit data prime")
    if max_clients < 1:
        raise ConfigurationError(f"max_clients must be >= 1, got {max_clients}")
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigurationError(f"clip must be a positive finite number, got {clip}")
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ConfigurationError(f"max_weight must be a positive finite number, got {max_weight}")
    if not (math.isfinite(precision) and precision > 0):
        raise ConfigurationError(f"precision must be a positive finite number, got {precision}")


def select_ckks(
    *, max_clients: int, clip: float, max_weight: float, precision: float, symmetric: bool,
    poly_modulus_degree: int = 8192,
) -> HEParams:
    """CKKS with one 60-bit data prime and the largest scale that cannot overflow.

    The sum of ``max_clients`` slots is below ``B = max_clients * max(clip, 1) * max_weight``
    in absolute value; ``B * Delta <= 2^57`` keeps it (and the noise) under
    ``q0 / 2 >= 2^58``, so ``log2 Delta = floor(57 - log2 B)``.

    Raises:
        ConfigurationError: no scale both fits and meets ``precision``.
    """
    _check_common(max_clients, clip, max_weight, precision, poly_modulus_degree)
    bound_b = max_clients * max(clip, 1.0) * max_weight
    scale_bits = math.floor(DATA_PRIME_BITS - 3 - math.log2(bound_b))
    if scale_bits < 10:
        raise ConfigurationError(
            f"a sum of {max_clients} values of magnitude {max(clip, 1.0) * max_weight} leaves only "
            f"{scale_bits} bits of CKKS scale; lower max_clients, clip or max_weight"
        )
    params = HEParams(
        "ckks", poly_modulus_degree, (DATA_PRIME_BITS, SPECIAL_PRIME_BITS), symmetric,
        max_clients, float(clip), float(max_weight), scale_bits, precision=float(precision),
    )
    bound = params.error_bound(max_clients)
    if bound > precision:
        raise ConfigurationError(
            f"CKKS reaches at best {bound:.3g} absolute error on a sum of {max_clients} clients "
            f"(scale 2^{scale_bits}), above precision={precision:g}; raise precision, or lower "
            "max_clients, clip or max_weight"
        )
    return params


def select_bfv(
    *, max_clients: int, clip: float, max_weight: float, precision: float, symmetric: bool,
    poly_modulus_degree: int = 8192,
) -> HEParams:
    """BFV with one 60-bit data prime, the largest plaintext modulus the noise allows, and the
    finest fixed-point resolution that modulus can hold for ``max_clients`` summands.

    Raises:
        ConfigurationError: the noise or capacity budget cannot meet ``precision``.
    """
    _check_common(max_clients, clip, max_weight, precision, poly_modulus_degree)
    fresh = bfv_fresh_noise_bound(poly_modulus_degree, symmetric)
    # Exact decryption iff n * (B_fresh + 1/2) < q0 / (2t), with q0 >= 2^59.
    t_max = math.floor(2.0 ** (DATA_PRIME_BITS - 1) / (2.0 * max_clients * (fresh + 0.5))) - 1
    best: tuple[int, int, int] | None = None  # (scale_bits, plain_bits, t)
    for plain_bits in range(min(MAX_PLAIN_BITS - 1, t_max.bit_length()), 1, -1):
        t = batching_prime_above(2**plain_bits, poly_modulus_degree)
        if t > t_max or t.bit_length() > MAX_PLAIN_BITS:
            continue
        for f in range(52, -1, -1):
            if max(clip, 1.0) * max_weight * 2.0**f > 2.0**MAX_ENCODED_BITS:
                continue
            try:
                FixedPointEncoder(clip, f, plain_bits, max_weight).check_capacity(max_clients)
                FixedPointEncoder(max_weight, f, plain_bits, 1.0).check_capacity(max_clients)
            except ConfigurationError:
                continue
            best = (f, plain_bits, t)
            break
        if best is not None:
            break
    if best is None:
        raise ConfigurationError(
            f"BFV noise allows no plaintext modulus for {max_clients} clients at N={poly_modulus_degree}; "
            "lower max_clients"
        )
    f, plain_bits, t = best
    params = HEParams(
        "bfv", poly_modulus_degree, (DATA_PRIME_BITS, SPECIAL_PRIME_BITS), symmetric, max_clients,
        float(clip), float(max_weight), f, plain_modulus=t, plain_bits=plain_bits, precision=float(precision),
    )
    bound = params.error_bound(max_clients)
    if bound > precision:
        raise ConfigurationError(
            f"BFV quantization reaches at best {bound:.3g} absolute error on a sum of {max_clients} clients "
            f"({f} fractional bits, t of {t.bit_length()} bits), above precision={precision:g}; raise "
            "precision, or lower max_clients, clip or max_weight (or use client-held keys: symmetric "
            "encryption leaves more noise budget)"
        )
    return params


def select_params(scheme: str, **kwargs: object) -> HEParams:
    """Dispatch to :func:`select_ckks` or :func:`select_bfv`."""
    if scheme == "ckks":
        return select_ckks(**kwargs)  # type: ignore[arg-type]
    if scheme == "bfv":
        return select_bfv(**kwargs)  # type: ignore[arg-type]
    raise ConfigurationError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
