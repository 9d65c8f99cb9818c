"""User-level DP-FedAvg: clipping, the server noise's standard deviation, the fixed denominator,
adaptive clipping and its charged count noise.

The noise test uses a fixed CSPRNG seed: with zero updates the release is pure
noise N(0, (z S / m)^2) per coordinate; over d = 200,000 coordinates the sample
variance has relative standard error sqrt(2/d) = 0.3%, so a 2% tolerance is
~6.5 standard errors, while a noise off by a factor sqrt(2) (e.g. added per
client, or divided by the realised instead of the expected count) fails it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from securefed.errors import ConfigError
from securefed.privacy.accountants import epsilon_of
from securefed.privacy.config import UserDPConfig
from securefed.privacy.events import GaussianEvent, PoissonSampledEvent
from securefed.privacy.secure_noise import SecureNoise
from securefed.privacy.user_level import (
    DPFedAvg,
    clip_update,
    poisson_sample_clients,
    update_noise_multiplier,
)
from securefed.protocols.base import AggregateResult
from securefed.protocols.csprng import KeyStream

SEED = bytes(range(1, 33))


def aggregate(fed: DPFedAvg, updates: list[np.ndarray]) -> AggregateResult:
    inputs = [fed.client_input(u) for u in updates]
    total = np.sum([i.vector.astype(np.float64) for i in inputs], axis=0)
    return AggregateResult(total=total, total_weight=float(len(inputs)), contributors=tuple(range(len(inputs))))


def test_clip_update() -> None:
    v = np.array([3.0, 4.0], dtype=np.float32)
    c = clip_update(v, 1.0)
    assert c.clipped and c.norm == pytest.approx(5.0)
    np.testing.assert_allclose(c.vector, [0.6, 0.8], rtol=1e-6)
    small = clip_update(v, 10.0)
    assert not small.clipped and np.array_equal(small.vector, v)
    with pytest.raises(ValueError):
        clip_update(np.array([np.nan], dtype=np.float32), 1.0)
    with pytest.raises(ValueError):
        clip_update(v, 0.0)


def test_server_noise_std_is_z_s_over_m() -> None:
    z, S, m, d = 1.3, 0.7, 8.0, 200_000
    fed = DPFedAvg(UserDPConfig(enabled=True, clip=S, noise_multiplier=z), noise_multiplier=z,
                   num_clients=40, expected_clients=m, noise=SecureNoise(KeyStream(SEED)))
    rel = fed.release(aggregate(fed, [np.zeros(d, np.float32)] * 5), d)
    x = rel.average.astype(np.float64)
    assert rel.noise_std == pytest.approx(z * S)
    assert x.std() == pytest.approx(z * S / m, rel=0.02)
    assert abs(x.mean()) < 5 * z * S / m / math.sqrt(d)
    assert stats.kstest(x / (z * S / m), "norm").pvalue > 1e-3
    assert rel.event == PoissonSampledEvent(0.2, GaussianEvent(z))


def test_fixed_denominator_average() -> None:
    """Mean of the release = (sum of clipped updates) / expected m, whoever showed up."""
    d, m = 50_000, 10.0
    fed = DPFedAvg(UserDPConfig(enabled=True, clip=1.0, noise_multiplier=0.5), noise_multiplier=0.5,
                   num_clients=100, expected_clients=m, noise=SecureNoise(KeyStream(SEED)))
    rng = np.random.default_rng(0)  # test inputs only
    ups = [rng.normal(size=d).astype(np.float32) for _ in range(3)]  # 3 of the expected 10 came
    rel = fed.release(aggregate(fed, ups), d)
    clipped_sum = sum(clip_update(u, 1.0).vector.astype(np.float64) for u in ups)
    resid = rel.average - clipped_sum / m
    assert resid.std() == pytest.approx(0.5 / m, rel=0.03)  # only noise left
    assert abs(resid.mean()) < 5 * 0.5 / m / math.sqrt(d)
    assert rel.contributors == 3


def test_adaptive_clipping_charges_count_noise() -> None:
    z, sigma_b = 1.0, 2.0
    zd = update_noise_multiplier(z, sigma_b)
    assert zd ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)  # the two releases compose to Gaussian(z)
    assert zd > z
    with pytest.raises(ConfigError, match="count_noise_multiplier"):
        update_noise_multiplier(1.0, 0.4)
    cfg = UserDPConfig(enabled=True, clip=1.0, noise_multiplier=z, clipping="adaptive", count_noise_multiplier=sigma_b)
    fed = DPFedAvg(cfg, noise_multiplier=z, num_clients=10, expected_clients=10, noise=SecureNoise(KeyStream(SEED)))
    assert fed.payload_dim(7) == 8
    ci = fed.client_input(np.full(7, 10.0, np.float32))
    assert ci.vector.shape == (8,) and ci.vector[-1] == -0.5  # clipped -> b_i - 1/2 = -1/2
    assert fed.round_event() == PoissonSampledEvent(1.0, GaussianEvent(z))


def test_adaptive_clip_moves_towards_the_quantile() -> None:
    """All updates far above S: the clip must grow; all far below: it must shrink (noise is small)."""
    cfg = UserDPConfig(enabled=True, clip=1.0, noise_multiplier=0.5, clipping="adaptive",
                       count_noise_multiplier=0.5, clip_learning_rate=0.2, target_quantile=0.5)
    for scale, grows in ((100.0, True), (0.001, False)):
        fed = DPFedAvg(cfg, noise_multiplier=0.5, num_clients=200, expected_clients=200,
                       noise=SecureNoise(KeyStream(SEED)))
        ups = [np.full(4, scale, np.float32) for _ in range(200)]
        for _ in range(5):
            rel = fed.release(aggregate(fed, ups), 4)
            fed.advance(rel)
        assert (fed.clip > 1.0) == grows
        # b ~ 0 (all clipped) -> S * exp(0.2 * 0.5) per round; b ~ 1 -> S * exp(-0.1)
        assert fed.clip == pytest.approx(math.exp((0.1 if grows else -0.1) * 5), rel=0.05)


def test_poisson_client_sampling_rate_and_amplification() -> None:
    src = SecureNoise(KeyStream(SEED))
    ids = list(range(1000))
    counts = [len(poisson_sample_clients(ids, 0.05, src)) for _ in range(40)]
    assert np.mean(counts) == pytest.approx(50, rel=0.1)
    # sampling amplifies: the same z over the same rounds costs less at q = 0.05 than at q = 1
    z = 1.0
    low = epsilon_of([PoissonSampledEvent(0.05, GaussianEvent(z))] * 50, 1e-5)
    high = epsilon_of([PoissonSampledEvent(1.0, GaussianEvent(z))] * 50, 1e-5)
    assert low < high / 3


def test_dpfedavg_refuses_bad_setups() -> None:
    on = UserDPConfig(enabled=True, noise_multiplier=1.0)
    src = SecureNoise(KeyStream(SEED))
    with pytest.raises(ConfigError):
        DPFedAvg(UserDPConfig(), noise_multiplier=1.0, num_clients=4, expected_clients=4, noise=src)
    with pytest.raises(ConfigError):
        DPFedAvg(on, noise_multiplier=0.0, num_clients=4, expected_clients=4, noise=src)
    with pytest.raises(ConfigError):
        DPFedAvg(on, noise_multiplier=1.0, num_clients=4, expected_clients=5, noise=src)
    fed = DPFedAvg(on, noise_multiplier=1.0, num_clients=4, expected_clients=4, noise=src)
    bad = AggregateResult(total=np.zeros(3), total_weight=7.0, contributors=(0, 1))
    with pytest.raises(ValueError, match="unit client weights"):
        fed.release(bad, 3)
    with pytest.raises(ValueError, match="entries"):
        fed.release(AggregateResult(total=np.zeros(4), total_weight=2.0, contributors=(0, 1)), 3)
