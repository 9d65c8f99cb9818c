"""User-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018), with adaptive clipping
(Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021).

One round, as in the paper's DP-FedAvg with the fixed-denominator estimator:

1. the server samples clients by Poisson sampling at rate q = m / N
   (:func:`poisson_sample_clients`), so privacy amplification by sampling applies;
2. each sampled client clips its update to L2 norm S (:meth:`DPFedAvg.client_input`);
3. the server sums the clipped updates (in plaintext or under secure
   aggregation), adds Gaussian noise N(0, (z S)^2 I) *once*, and divides by the
   *expected* number of clients m, not by the number that showed up: the
   sensitivity of the average is then S / m whatever the sample
   (:meth:`DPFedAvg.release`).

The unit of privacy is a user (all of one client's data); the neighbouring
relation is add-or-remove-one user, the one Poisson sampling is analysed
under. Each round is one ``PoissonSampled(q, Gaussian(z))`` event.

Adaptive clipping. S follows the ``gamma`` quantile of update norms: each
client also sends ``b_i - 1/2`` where ``b_i = 1[||delta_i|| <= S]``; the server
adds N(0, sigma_b^2) to that sum, estimates the unclipped fraction
``b = sum / m + 1/2`` and sets ``S <- S * exp(-eta_C (b - gamma))``. The count
is a second Gaussian release with sensitivity 1/2, i.e. noise multiplier
``2 sigma_b``. Two Gaussian releases on the same sample compose exactly to one
Gaussian with ``z^-2 = z_delta^-2 + (2 sigma_b)^-2``; following the paper
(Theorem 1) we keep the configured z as the *total* and noise the update with
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, so the count's privacy cost is
charged to the budget and the recorded event is still ``Gaussian(z)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from securefed.errors import ConfigError
from securefed.protocols.base import AggregateResult, ClientInput

from .config import UserDPConfig
from .events import DpEvent, GaussianEvent, PoissonSampledEvent
from .secure_noise import NoiseSource, bernoulli


@dataclass(frozen=True)
class ClippedUpdate:
    vector: np.ndarray
    norm: float
    clipped: bool


def clip_update(vector: np.ndarray, clip: float) -> ClippedUpdate:
    """Scale ``vector`` to L2 norm at most ``clip`` (float64 norm, float32 result)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be > 0, got {clip}")
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1 or not np.isfinite(v).all():
        raise ValueError("an update must be a finite 1-D vector")
    norm = float(np.linalg.norm(v.astype(np.float64)))
    if norm <= clip:
        return ClippedUpdate(v.copy(), norm, False)
    return ClippedUpdate((v * np.float32(clip / norm)).astype(np.float32), norm, True)


def poisson_sample_clients(client_ids: Sequence[int], rate: float, noise: NoiseSource) -> tuple[int, ...]:
    """Each client joins independently with probability ``rate`` (draws from ``noise``)."""
    if not 0 < rate <= 1:
        raise ValueError(f"client sampling rate must be in (0, 1], got {rate}")
    keep = bernoulli(noise, len(client_ids), rate)
    return tuple(int(c) for c, k in zip(client_ids, keep, strict=True) if k)


def update_noise_multiplier(total: float, count_noise: float) -> float:
    """z_delta of Andrew et al. (Theorem 1): what is left for the update once the count is paid for.

    Raises:
        ConfigError: the count noise is too small to leave any budget for the update.
    """
    rest = total**-2 - (2.0 * count_noise) ** -2
    if rest <= 0:
        raise ConfigError(
            f"count noise sigma_b = {count_noise:g} is too small for noise multiplier z = {total:g}: "
            f"adaptive clipping needs 2 sigma_b > z; raise dp.user.count_noise_multiplier or z",
            key="dp.user.count_noise_multiplier",
        )
    return float(rest**-0.5)


@dataclass(frozen=True)
class UserRelease:
    """What the server releases after one round of DP-FedAvg.

    Attributes:
        average: the noised fixed-denominator average of clipped updates (float32).
        clip: S used this round; ``next_clip``: S for the next round (== clip when fixed).
        noise_std: std of the noise added to the update sum (z_delta * S).
        unclipped_fraction: the noised estimate b (adaptive only).
        contributors: how many updates were in the sum.
        event: the round's DP event for the ledger.
    """

    average: np.ndarray
    clip: float
    next_clip: float
    noise_std: float
    update_noise_multiplier: float
    count_noise_multiplier: float | None
    unclipped_fraction: float | None
    contributors: int
    event: DpEvent

    def info(self) -> dict[str, float | int | None]:
        return {
            "clip": self.clip,
            "next_clip": self.next_clip,
            "noise_std": self.noise_std,
            "update_noise_multiplier": self.update_noise_multiplier,
            "count_noise_multiplier": self.count_noise_multiplier,
            "unclipped_fraction": self.unclipped_fraction,
            "contributors": self.contributors,
        }


class DPFedAvg:
    """Client-side clipping and server-side noising of one run.

    Args:
        config: the ``dp.user`` table (enabled).
        noise_multiplier: the resolved total z (given or calibrated from the target).
        num_clients: N, the population the rate q = m / N refers to.
        expected_clients: m, the expected clients per round (the fixed denominator).
        noise: where the server noise comes from (the CSPRNG in secure mode).
        clip: the current S (restore it from the ledger on resume; defaults to ``config.clip``).
    """

    def __init__(
        self,
        config: UserDPConfig,
        *,
        noise_multiplier: float,
        num_clients: int,
        expected_clients: float,
        noise: NoiseSource,
        clip: float | None = None,
    ) -> None:
        if not config.enabled:
            raise ConfigError("DPFedAvg needs dp.user.enabled = true", key="dp.user.enabled")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ConfigError(f"noise multiplier must be > 0, got {noise_multiplier}", key="dp.user.noise_multiplier")
        if num_clients < 1 or not 0 < expected_clients <= num_clients:
            raise ConfigError(
                f"expected clients per round must be in (0, {num_clients}], got {expected_clients}",
                key="fl.clients_per_round",
            )
        self.config = config
        self.noise_multiplier = float(noise_multiplier)
        self.num_clients = num_clients
        self.expected_clients = float(expected_clients)
        self.noise = noise
        self.clip = float(clip if clip is not None else config.clip)
        self.adaptive = config.clipping == "adaptive"
        if self.adaptive:
            sigma_b = config.count_noise_multiplier
            self.count_noise = float(sigma_b if sigma_b is not None else self.expected_clients / 20.0)
            self.update_noise = update_noise_multiplier(self.noise_multiplier, self.count_noise)
        else:
            self.count_noise = 0.0
            self.update_noise = self.noise_multiplier

    @property
    def sampling_probability(self) -> float:
        return self.expected_clients / self.num_clients

    def round_event(self) -> DpEvent:
        """One round's release: Poisson(q) sample, then a Gaussian with total multiplier z."""
        return PoissonSampledEvent(self.sampling_probability, GaussianEvent(self.noise_multiplier))

    def payload_dim(self, dim: int) -> int:
        """Length of what clients send: the update, plus the clipping bit when adaptive."""
        return dim + 1 if self.adaptive else dim

    def client_input(self, update: np.ndarray) -> ClientInput:
        """Clip a client's update for the aggregator (weight 1: every user counts the same)."""
        c = clip_update(update, self.clip)
        if not self.adaptive:
            return ClientInput(vector=c.vector, weight=1.0)
        bit = np.float32(0.5 if not c.clipped else -0.5)  # b_i - 1/2
        return ClientInput(vector=np.concatenate([c.vector, [bit]]).astype(np.float32), weight=1.0)

    def release(self, result: AggregateResult, dim: int) -> UserRelease:
        """Add the server noise once to the sum of clipped updates and average over m.

        Call only after the round's planned event passed the budget guard and
        was recorded: this is where the noise is drawn.
        """
        total = np.asarray(result.total, dtype=np.float64)
        if total.shape != (self.payload_dim(dim),):
            raise ValueError(f"aggregate has {total.shape[0]} entries, expected {self.payload_dim(dim)}")
        if result.contributors and abs(result.total_weight - len(result.contributors)) > 1e-6:
            raise ValueError("DP-FedAvg needs unit client weights; build inputs with client_input()")
        std = self.update_noise * self.clip
        z = self.noise.gaussian((dim,), std, dtype=torch.float64).numpy()
        average = ((total[:dim] + z) / self.expected_clients).astype(np.float32)
        fraction: float | None = None
        next_clip = self.clip
        if self.adaptive:
            noisy_count = float(total[dim]) + float(self.noise.gaussian((1,), self.count_noise, dtype=torch.float64)[0])
            fraction = noisy_count / self.expected_clients + 0.5
            next_clip = self.clip * math.exp(-self.config.clip_learning_rate * (fraction - self.config.target_quantile))
        return UserRelease(
            average=average,
            clip=self.clip,
            next_clip=next_clip,
            noise_std=std,
            update_noise_multiplier=self.update_noise,
            count_noise_multiplier=self.count_noise if self.adaptive else None,
            unclipped_fraction=fraction,
            contributors=len(result.contributors),
            event=self.round_event(),
        )

    def advance(self, release: UserRelease) -> None:
        """Adopt the next round's clip (after the release was recorded)."""
        self.clip = release.next_clip
