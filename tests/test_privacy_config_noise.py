"""The [dp] config's validation, and the CSPRNG noise of secure mode.

Distribution tests use a fixed 256-bit seed (KeyStream is deterministic given
its seed), so they are reproducible; each checks a property a broken sampler
would fail: the N(0, 1) CDF (Kolmogorov-Smirnov), the first four moments, the
uniform CDF, Bernoulli frequencies, and independence from torch's global RNG.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from securefed.errors import ConfigError
from securefed.privacy.config import (
    BudgetConfig,
    DPConfig,
    PrivacyWarning,
    SampleDPConfig,
    UserDPConfig,
)
from securefed.privacy.errors import CalibrationError
from securefed.privacy.secure_noise import FastNoise, SecureNoise, bernoulli, noise_source
from securefed.privacy.session import PrivacySession, RunShape
from securefed.protocols.csprng import KeyStream

SEED = bytes(range(32))


# -- config ------------------------------------------------------------------------------------


def test_defaults_are_off() -> None:
    cfg = DPConfig()
    assert not cfg.enabled and not cfg.sample.enabled and not cfg.user.enabled
    assert cfg.sample.secure_mode and cfg.accountant == "pld"


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: SampleDPConfig(enabled=True, noise_multiplier=-1.0), "dp.sample.noise_multiplier"),
        (lambda: SampleDPConfig(enabled=True, noise_multiplier=0.0), "dp.sample.noise_multiplier"),
        (lambda: SampleDPConfig(enabled=True, noise_multiplier=1.0, clip=0.0), "dp.sample.clip"),
        (lambda: SampleDPConfig(enabled=True, noise_multiplier=1.0, clip=-2.0), "dp.sample.clip"),
        (lambda: SampleDPConfig(enabled=True, noise_multiplier=float("nan")), "dp.sample.noise_multiplier"),
        (lambda: SampleDPConfig(enabled=True), "dp.sample.noise_multiplier"),
        (lambda: SampleDPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=3.0), "dp.sample.noise_multiplier"),
        (lambda: SampleDPConfig(enabled=True, target_epsilon=0.0), "dp.sample.target_epsilon"),
        (lambda: SampleDPConfig(noise_multiplier=1.0), "dp.sample.noise_multiplier"),
        (lambda: SampleDPConfig(enabled=True, noise_multiplier=1.0, mode="ew"), "dp.sample.mode"),  # type: ignore[arg-type]
        (lambda: UserDPConfig(enabled=True, noise_multiplier=1.0, clip=0.0), "dp.user.clip"),
        (lambda: UserDPConfig(enabled=True, noise_multiplier=1.0, target_quantile=1.0), "dp.user.target_quantile"),
        (lambda: UserDPConfig(enabled=True, noise_multiplier=1.0, count_noise_multiplier=1.0), "dp.user.count_noise_multiplier"),
        (lambda: UserDPConfig(enabled=True, noise_multiplier=1.0, clipping="median"), "dp.user.clipping"),  # type: ignore[arg-type]
        (lambda: BudgetConfig(user_epsilon=-1.0), "dp.budget.user_epsilon"),
        (lambda: DPConfig(delta=1.0), "dp.delta"),
        (lambda: DPConfig(delta=0.0), "dp.delta"),
        (lambda: DPConfig(delta=2.0), "dp.delta"),
        (lambda: DPConfig(accountant="moments"), "dp.accountant"),  # type: ignore[arg-type]
        (lambda: DPConfig(budget=BudgetConfig(sample_epsilon=3.0)), "dp.budget.sample_epsilon"),
        (
            lambda: DPConfig(sample=SampleDPConfig(enabled=True, target_epsilon=5.0), budget=BudgetConfig(sample_epsilon=3.0)),
            "dp.sample.target_epsilon",
        ),
    ],
)
def test_bad_values_name_their_key(build, key: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.key == key
    assert key in str(info.value)


def test_delta_defaults_and_warns_at_one_over_n() -> None:
    cfg = DPConfig(sample=SampleDPConfig(enabled=True, noise_multiplier=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.resolve_delta(1000, level="sample") == 1e-5
        assert cfg.resolve_delta(4, level="user") == 1e-5
    loose = DPConfig(sample=SampleDPConfig(enabled=True, noise_multiplier=1.0), delta=0.01)
    with pytest.warns(PrivacyWarning, match="1/n"):
        loose.resolve_delta(200, level="sample")


def test_config_round_trip_and_fingerprint() -> None:
    cfg = DPConfig(
        sample=SampleDPConfig(enabled=True, noise_multiplier=1.1, clip=0.5, mode="ghost"),
        user=UserDPConfig(enabled=True, target_epsilon=4.0, clipping="adaptive", count_noise_multiplier=3.0),
        budget=BudgetConfig(sample_epsilon=8.0, user_epsilon=6.0),
        delta=1e-6,
    )
    assert DPConfig.from_dict(cfg.to_dict()) == cfg
    assert DPConfig.from_dict(cfg.to_dict()).fingerprint() == cfg.fingerprint()
    other = DPConfig(sample=SampleDPConfig(enabled=True, noise_multiplier=1.2, clip=0.5, mode="ghost"))
    assert other.fingerprint() != cfg.fingerprint()


def test_target_unreachable_within_rounds_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = DPConfig(user=UserDPConfig(enabled=True, target_epsilon=0.01))
    shape = RunShape(client_sizes=(100,) * 4, rounds=5000, expected_clients=4)
    with pytest.raises(CalibrationError, match="unreachable over 5000 steps"):
        PrivacySession.open(tmp_path, cfg, shape=shape, run_id="x")


def test_adaptive_count_noise_too_small_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = DPConfig(user=UserDPConfig(enabled=True, noise_multiplier=1.0, clipping="adaptive"))
    shape = RunShape(client_sizes=(100,) * 4, rounds=5, expected_clients=4)  # sigma_b = 4/20 = 0.2 < z/2
    with pytest.raises(ConfigError, match="count_noise_multiplier"):
        PrivacySession.open(tmp_path, cfg, shape=shape, run_id="x")


# -- secure noise ------------------------------------------------------------------------------


def test_secure_gaussian_matches_standard_normal() -> None:
    src = SecureNoise(KeyStream(SEED))
    z = src.gaussian((200_000,), 1.0, dtype=torch.float64).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)


@pytest.mark.parametrize("hardening", [1, 2, 3])
def test_hardening_keeps_the_variance(hardening: int) -> None:
    z = SecureNoise(KeyStream(SEED), hardening=hardening).gaussian((100_000,), 2.5, dtype=torch.float64).numpy()
    assert stats.kstest(z / 2.5, "norm").pvalue > 1e-3
    assert abs(z.std() / 2.5 - 1) < 0.02


def test_secure_uniform_and_bernoulli() -> None:
    src = SecureNoise(KeyStream(SEED))
    u = src.uniform(100_000)
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    b = bernoulli(src, 100_000, 0.03)
    p = b.mean()
    assert abs(p - 0.03) < 5 * math.sqrt(0.03 * 0.97 / 100_000)


def test_secure_noise_is_independent_of_torch_rng_and_fresh_each_time() -> None:
    torch.manual_seed(0)
    a = SecureNoise().gaussian((64,), 1.0)
    torch.manual_seed(0)
    b = SecureNoise().gaussian((64,), 1.0)
    assert not torch.equal(a, b)  # fresh os.urandom seeds, untouched by torch.manual_seed
    s1 = SecureNoise(KeyStream(SEED)).gaussian((64,), 1.0)
    s2 = SecureNoise(KeyStream(SEED)).gaussian((64,), 1.0)
    assert torch.equal(s1, s2)  # deterministic given the seed (what tests rely on)
    assert noise_source(True).secure and not noise_source(False).secure


def test_noise_dtype_shape_and_bad_std() -> None:
    src = SecureNoise(KeyStream(SEED))
    t = src.gaussian((3, 5), 0.1, dtype=torch.float32)
    assert t.shape == (3, 5) and t.dtype == torch.float32
    assert torch.count_nonzero(src.gaussian((4,), 0.0)) == 0
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError):
            src.gaussian((2,), bad)
        with pytest.raises(ValueError):
            FastNoise(0).gaussian((2,), bad)
    with pytest.raises(ValueError):
        SecureNoise(hardening=0)
    with pytest.raises(ValueError):
        bernoulli(src, 3, 1.5)
    assert np.all(bernoulli(src, 50, 1.0)) and not np.any(bernoulli(src, 50, 0.0))
