"""DP noise and sampling randomness from a CSPRNG, without torchcsprng.

Opacus's ``secure_mode`` needs ``torchcsprng``, which does not install with
current torch (opacus #504, csprng #130). Here secure mode draws every random
number DP depends on (the Gaussian noise of DP-SGD and of DP-FedAvg, and the
Poisson sampling of examples and clients) from
:class:`securefed.protocols.csprng.KeyStream`: AES-256 in counter mode over a
256-bit seed from :func:`os.urandom`. Uniforms with 53 random bits become
N(0, 1) by the Box-Muller transform.

Floating-point caveat. A float Gaussian sampler outputs a discretised,
non-uniformly spaced approximation of N(0, sigma^2), and the low-order bits
of ``value + noise`` can reveal ``value`` (Mironov, CCS 2012, for Laplace;
Jin et al., "Are we there yet? Timing and floating-point attacks on
differential privacy systems", IEEE S&P 2022, for Gaussians incl. Opacus).
Following Holohan and Braghin ("Secure random sampling in differential
privacy", ESORICS 2021), which Opacus's own secure mode also uses, each noise
value is the sum of ``2 * hardening`` independent draws scaled by
``1/sqrt(2 * hardening)``: the attack's search space grows from 2^53 to about
2^(53 (2n - 1)). This is a mitigation, not a proof: the exact remedy is integer
noise (discrete Gaussian or Skellam), planned with distributed DP.

What secure mode costs: ``2 * hardening`` Gaussian draws per noised
coordinate, generated on the CPU in NumPy (about 4 x 8 bytes of AES-CTR
keystream per coordinate). ``benchmarks/dp.py`` measures it per step.

:class:`FastNoise` (``secure_mode = false``) uses torch's default generator,
seeded from :func:`os.urandom`; it is *not* cryptographically secure and the
privacy report says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from securefed.protocols.csprng import KeyStream


@runtime_checkable
class NoiseSource(Protocol):
    """Where DP randomness comes from: Gaussian noise and uniforms for sampling."""

    @property
    def secure(self) -> bool:
        """True when draws come from a CSPRNG."""
        ...

    def gaussian(
        self,
        shape: Sequence[int],
        std: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A tensor of i.i.d. N(0, std^2) draws."""
        ...

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms on [0, 1)."""
        ...


def bernoulli(source: NoiseSource, n: int, p: float) -> np.ndarray:
    """``n`` independent Bernoulli(p) booleans (Poisson sampling), from ``source``'s uniforms."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return source.uniform(n) < p


class SecureNoise:
    """CSPRNG-backed noise: AES-256-CTR keystream, Box-Muller, sum-of-2n hardening.

    Args:
        stream: the keystream; a fresh one seeded from :func:`os.urandom` if None.
            Pass a seeded stream only in tests: a known seed is a known noise.
        hardening: n of Holohan and Braghin's defence (2n draws per value); 1
            disables it (one draw per value).
    """

    def __init__(self, stream: KeyStream | None = None, *, hardening: int = 2) -> None:
        if isinstance(hardening, bool) or not isinstance(hardening, int) or hardening < 1:
            raise ValueError(f"hardening must be an integer >= 1, got {hardening!r}")
        self._stream = stream if stream is not None else KeyStream.fresh()
        self.hardening = hardening

    @property
    def secure(self) -> bool:
        return True

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` float64 N(0, 1) draws, each the scaled sum of ``2 * hardening`` Box-Muller draws."""
        k = 2 * self.hardening
        if k == 1:  # pragma: no cover - hardening >= 1 makes k >= 2
            return self._stream.standard_normal(n)
        draws = self._stream.standard_normal(n * k).reshape(k, n)
        return draws.sum(axis=0) * (1.0 / math.sqrt(k))

    def gaussian(
        self,
        shape: Sequence[int],
        std: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        n = math.prod(shape)
        z = self.standard_normal(n) * std if std > 0 else np.zeros(n)
        return torch.from_numpy(z).reshape(tuple(shape)).to(dtype=dtype, device=device)

    def uniform(self, n: int) -> np.ndarray:
        return self._stream.uniform_float(n)


class FastNoise:
    """torch's generator seeded from the OS CSPRNG. Fast, but NOT cryptographically secure."""

    def __init__(self, seed: int | None = None) -> None:
        self._gen = torch.Generator()
        self._gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))

    @property
    def secure(self) -> bool:
        return False

    def gaussian(
        self,
        shape: Sequence[int],
        std: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        z = torch.randn(tuple(shape), generator=self._gen, dtype=torch.float64) * std
        return z.to(dtype=dtype, device=device)

    def uniform(self, n: int) -> np.ndarray:
        return torch.rand(n, generator=self._gen, dtype=torch.float64).numpy()


def noise_source(secure_mode: bool) -> NoiseSource:
    """The configured source: :class:`SecureNoise` in secure mode, else :class:`FastNoise`."""
    return SecureNoise() if secure_mode else FastNoise()
