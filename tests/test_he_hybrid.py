"""Hybrid BFV + pairwise masks: exact sums, individually uniform plaintexts, abort on dropout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import securefed.protocols.he.client as client_mod
from securefed.fl.transport import run_round
from securefed.protocols import ClientInput
from securefed.protocols.csprng import KeyStream
from securefed.protocols.errors import ConfigurationError, RoundAbortedError
from securefed.protocols.he import BFVAggregator, CKKSAggregator
from securefed.protocols.he import messages as m
from securefed.protocols.he.codec import decrypt_chunks, load_chunks
from securefed.protocols.he.hybrid import apply_mask, pairwise_mask, uniform_mod
from securefed.protocols.primitives import kex


def test_uniform_mod_is_uniform_and_deterministic() -> None:
    seed = bytes(range(32))
    a = uniform_mod(KeyStream(seed), 70_000, 7)
    assert np.array_equal(a, uniform_mod(KeyStream(seed), 70_000, 7))
    assert a.min() >= 0 and a.max() <= 6
    assert stats.chisquare(np.bincount(a, minlength=7)).pvalue > 1e-6
    big = uniform_mod(KeyStream.fresh(), 50_000, 2**40 + 15)  # just above a power of two: rejection matters
    assert big.max() < 2**40 + 15 and stats.kstest(big / (2**40 + 15), "uniform").pvalue > 1e-6


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 7), t=st.sampled_from([65537, 1032193, 2**45 + 2**14 * 31 + 1]), length=st.integers(1, 300))
def test_masks_cancel_modulo_t(n: int, t: int, length: int) -> None:
    keys = [kex.generate_keypair() for _ in range(n)]
    ids = list(range(10, 10 + n))
    total = np.zeros(length, dtype=np.int64)
    for i, (sk, _) in zip(ids, keys, strict=True):
        peers = [(j, pk) for j, (_, pk) in zip(ids, keys, strict=True) if j != i]
        total = np.mod(total + pairwise_mask(sk, i, peers, 3, t, length), t)
    assert not total.any()
    x = np.arange(length, dtype=np.int64) - length // 2
    masked = apply_mask(x, pairwise_mask(keys[0][0], ids[0], [(ids[1], keys[1][1])], 3, t, length), t)
    assert np.all(np.abs(masked) <= t // 2)


def _inputs(rng: np.random.Generator, ids: list[int], d: int) -> dict[int, ClientInput]:
    return {c: ClientInput(rng.normal(0, 0.2, d).astype(np.float32), float(rng.uniform(0.3, 1.0))) for c in ids}


@pytest.mark.parametrize("mode", ["client-held", "key-authority"])
def test_hybrid_sum_exact_and_individual_plaintexts_masked(mode: str) -> None:
    rng = np.random.default_rng(21)
    encoded: dict[int, np.ndarray] = {}
    real = client_mod.plaintext_slots

    agg = BFVAggregator(key_mode=mode, max_clients=8, min_clients=3, pairwise_masks=True)
    d, ids = 5000, [0, 1, 2, 3]
    rnd = agg.new_round(0, _inputs(rng, ids, d))
    with pytest.MonkeyPatch.context() as mp:
        def record(params, vector, weight):  # type: ignore[no-untyped-def]
            ints, clipped = real(params, vector, weight)
            encoded[len(encoded)] = ints.copy()
            return ints, clipped

        mp.setattr(client_mod, "plaintext_slots", record)
        out = run_round(rnd, agg.stages)
    res, p = out.result, agg.params
    want = np.sum(list(encoded.values()), axis=0)
    assert res.contributors == tuple(ids) and res.measurements["pairwise_masks"] == 1
    assert np.array_equal(res.total * 2.0**p.scale_bits, want[:-1].astype(np.float64))
    assert res.total_weight * 2.0**p.scale_bits == float(want[-1])
    # A key holder colluding with the server decrypts client 0's upload: uniform noise mod t.
    holder = agg._state.authority if mode == "key-authority" else agg._state.clients[1]
    lim = agg.settings.limits(d)
    ct = out.observation.ciphertexts[0]
    single = decrypt_chunks(load_chunks(holder.context(), p, m.Upload.decode(ct, lim).chunks, d + 1), p)
    t = p.plain_modulus
    u = np.mod(single, t) / t
    assert stats.kstest(u, "uniform").pvalue > 1e-6
    assert not any(np.array_equal(single, e) for e in encoded.values())
    assert np.max(np.abs(single)) > 2**p.plain_bits // 4  # far outside any honest update's range


def test_without_masks_a_key_holder_reads_individual_updates() -> None:
    """The control for the test above: same collusion, no masks, the update is in the clear."""
    rng = np.random.default_rng(22)
    agg = BFVAggregator(max_clients=8, min_clients=2)
    d = 300
    inputs = _inputs(rng, [0, 1, 2], d)
    out = run_round(agg.new_round(0, inputs), agg.stages)
    p, lim = agg.params, agg.settings.limits(d)
    ct = out.observation.ciphertexts[0]
    single = decrypt_chunks(load_chunks(agg._state.clients[1].context(), p, m.Upload.decode(ct, lim).chunks, d + 1), p)
    x = inputs[0]
    assert np.max(np.abs(single[:-1] * 2.0**-p.scale_bits - x.weight * x.vector.astype(np.float64))) <= 2.0 ** -(p.scale_bits - 1)


def test_hybrid_aborts_when_a_masked_client_drops() -> None:
    rng = np.random.default_rng(23)
    agg = BFVAggregator(max_clients=8, min_clients=2, pairwise_masks=True)
    with pytest.raises(RoundAbortedError, match="masks cannot cancel"):
        run_round(agg.new_round(0, _inputs(rng, [0, 1, 2], 50)), agg.stages, {2: "upload"})
    # A client that drops before masking is simply not a participant.
    out = run_round(agg.new_round(1, _inputs(rng, [0, 1, 2], 50)), agg.stages, {2: "setup"})
    assert out.result.contributors == (0, 1)


def test_masks_need_bfv() -> None:
    with pytest.raises(ConfigurationError, match="pairwise_masks"):
        CKKSAggregator(pairwise_masks=True)
    with pytest.raises(ConfigurationError, match="pairwise_masks"):
        BFVAggregator(pairwise_masks="yes")
