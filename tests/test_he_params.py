"""Parameter selection for addition-only HE: primes, capacity, and the noise models against SEAL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.protocols.errors import ConfigurationError
from securefed.protocols.he import params as P


def _trial_division(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, math.isqrt(n) + 1))


def test_is_prime_matches_trial_division_below_20000() -> None:
    assert [n for n in range(20000) if P.is_prime(n)] == [n for n in range(20000) if _trial_division(n)]


def test_is_prime_known_answers() -> None:
    # Mersenne primes M61 and M89 (OEIS A000043); Fermat F5 = 641 * 6700417 (Euler);
    # 1032193 = 126 * 8192 + 1 is the BFV plain modulus of the TenSEAL tutorials.
    assert P.is_prime(2**61 - 1) and P.is_prime(2**89 - 1) and P.is_prime(1032193)
    assert not P.is_prime(2**32 + 1) and not P.is_prime(2**61 + 1)
    # Strong pseudoprime to bases 2..37 would fool a short base list; 3215031751 fools 2,3,5,7.
    assert not P.is_prime(3215031751)


@settings(max_examples=40, deadline=None)
@given(lower=st.integers(2, 200_000), log_n=st.sampled_from([10, 11, 12]))
def test_batching_prime_is_the_smallest_above(lower: int, log_n: int) -> None:
    n = 2**log_n
    t = P.batching_prime_above(lower, n)
    assert t > lower and t % (2 * n) == 1 and _trial_division(t)
    assert not any(_trial_division(c) for c in range(lower + 1, t) if c % (2 * n) == 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("max_clients,clip,max_weight", [(10, 1.0, 1.0), (100, 0.5, 1.0), (1000, 1.0, 50.0)])
def test_ckks_scale_is_the_largest_that_cannot_overflow(symmetric: bool, max_clients: int, clip: float,
                                                        max_weight: float) -> None:
    p = P.select_ckks(max_clients=max_clients, clip=clip, max_weight=max_weight, precision=1e-3, symmetric=symmetric)
    bound = max_clients * max(clip, 1.0) * max_weight
    assert bound * 2.0**p.scale_bits <= 2.0**57 < bound * 2.0 ** (p.scale_bits + 1)
    assert p.coeff_mod_bit_sizes == (60, 40) and sum(p.coeff_mod_bit_sizes) <= P.MAX_COEFF_BITS[p.poly_modulus_degree]
    assert p.error_bound(max_clients) <= 1e-3


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("max_clients,clip,max_weight", [(10, 1.0, 1.0), (100, 0.25, 1.0), (500, 1.0, 100.0)])
def test_bfv_plaintext_modulus_respects_noise_and_capacity(symmetric: bool, max_clients: int, clip: float,
                                                           max_weight: float) -> None:
    p = P.select_bfv(max_clients=max_clients, clip=clip, max_weight=max_weight, precision=1e-2, symmetric=symmetric)
    t, n = p.plain_modulus, p.poly_modulus_degree
    assert P.is_prime(t) and t % (2 * n) == 1 and t > 2**p.plain_bits
    fresh = P.bfv_fresh_noise_bound(n, symmetric)
    assert max_clients * (fresh + 0.5) < 2.0**59 / (2 * t)  # exact decryption, worst case
    p.data_encoder().check_capacity(max_clients)
    p.weight_encoder().check_capacity(max_clients)
    assert max(clip, 1.0) * max_weight * 2.0**p.scale_bits <= 2.0**P.MAX_ENCODED_BITS
    if max(clip, 1.0) * max_weight * 2.0 ** (p.scale_bits + 1) <= 2.0**P.MAX_ENCODED_BITS:
        with pytest.raises(ConfigurationError):  # one more fractional bit would not fit
            P.FixedPointEncoder(clip, p.scale_bits + 1, p.plain_bits, max_weight).check_capacity(max_clients)
            P.FixedPointEncoder(max_weight, p.scale_bits + 1, p.plain_bits, 1.0).check_capacity(max_clients)


def test_impossible_requests_name_the_knobs() -> None:
    with pytest.raises(ConfigurationError, match="precision"):
        P.select_ckks(max_clients=100, clip=1.0, max_weight=1.0, precision=1e-15, symmetric=False)
    with pytest.raises(ConfigurationError, match="precision"):
        P.select_bfv(max_clients=1000, clip=1.0, max_weight=1000.0, precision=1e-9, symmetric=False)
    with pytest.raises(ConfigurationError, match="poly_modulus_degree"):
        P.select_ckks(max_clients=10, clip=1.0, max_weight=1.0, precision=1e-3, symmetric=True,
                      poly_modulus_degree=2048)
    for bad in ({"clip": 0.0}, {"max_weight": -1.0}, {"precision": float("nan")}, {"max_clients": 0}):
        kw: dict = {"max_clients": 10, "clip": 1.0, "max_weight": 1.0, "precision": 1e-3, "symmetric": True, **bad}
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            P.select_ckks(**kw)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n_poly", [4096, 8192])
def test_ckks_error_model_matches_seal(symmetric: bool, n_poly: int) -> None:
    """The measured error of a 20-client sum has the modelled spread and stays below the bound."""
    p = P.select_ckks(max_clients=20, clip=1.0, max_weight=1.0, precision=1e-3, symmetric=symmetric,
                      poly_modulus_degree=n_poly)
    # Use a moderate scale so the noise, not double precision, dominates.
    scale_bits = 30
    ctx = p.new_context()
    rng = np.random.default_rng(7)
    xs = rng.uniform(-1, 1, size=(20, p.slots))
    acc = ts.ckks_vector(ctx, xs[0].tolist(), scale=2.0**scale_bits)
    for x in xs[1:]:
        acc.add_(ts.ckks_vector(ctx, x.tolist(), scale=2.0**scale_bits))
    err = np.asarray(acc.decrypt()) - xs.sum(axis=0)
    predicted_std = math.sqrt(20 * P.ckks_coefficient_variance(n_poly, symmetric) * n_poly / 2) * 2.0**-scale_bits
    assert 0.8 < float(np.std(err)) / predicted_std < 1.25
    # Shape: Gaussian (kurtosis 3) for secret-key encryption; Laplace (kurtosis 6) for public-key
    # encryption, whose error r1 * s is a product of two Gaussians in the slot domain.
    kurtosis = float(np.mean(err**4) / np.var(err) ** 2)
    # (40 trials per case: 2.73-3.24 and 4.56-8.68; the windows below leave room on both sides.)
    assert (2.4 < kurtosis < 3.7) if symmetric else kurtosis > 4.0
    assert float(np.max(np.abs(err))) <= P.ckks_error_bound(n_poly, symmetric, scale_bits, 20, 1.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_bfv_worst_case_sum_decrypts_exactly(symmetric: bool) -> None:
    """Adding one ciphertext to itself n times aligns its noise (the worst case); still exact."""
    n = 64
    p = P.select_bfv(max_clients=n, clip=1.0, max_weight=1.0, precision=1.0, symmetric=symmetric)
    ctx = p.new_context()
    limit = (p.plain_modulus - 1) // 2 // n
    vals = np.random.default_rng(3).integers(-limit, limit + 1, p.slots)
    one = ts.bfv_vector(ctx, vals.tolist())
    acc = one.copy()
    for _ in range(n - 1):
        acc.add_(one)
    assert np.array_equal(np.asarray(acc.decrypt(), dtype=np.int64), n * vals)
    dec = ts._ts_cpp.Decryptor(ctx.data.seal_context(), ctx.secret_key().data)
    assert dec.invariant_noise_budget(acc.data.ciphertext()[0]) > 0
    # And SEAL's own noise measurement of a fresh ciphertext stays below the modelled worst case.
    fresh_budget = dec.invariant_noise_budget(one.data.ciphertext()[0])
    noise_upper = 2.0 ** (60 - math.log2(p.plain_modulus) - 1 - fresh_budget)
    assert noise_upper <= 2 * P.bfv_fresh_noise_bound(p.poly_modulus_degree, symmetric)


def test_fingerprint_separates_parameter_sets() -> None:
    a = P.select_ckks(max_clients=10, clip=1.0, max_weight=1.0, precision=1e-3, symmetric=True)
    b = P.select_ckks(max_clients=11, clip=1.0, max_weight=1.0, precision=1e-3, symmetric=True)
    c = P.select_bfv(max_clients=10, clip=1.0, max_weight=1.0, precision=1e-3, symmetric=True)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == P.select_ckks(max_clients=10, clip=1.0, max_weight=1.0, precision=1e-3,
                                          symmetric=True).fingerprint
