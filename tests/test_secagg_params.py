"""Neighbour graphs and the SecAgg+ parameter finder, checked with scipy's hypergeometric law."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from securefed.protocols.errors import ConfigurationError
from securefed.protocols.secagg.params import (
    NeighbourGraph,
    ThreatModel,
    check_parameters,
    find_parameters,
)


def _seed(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


@pytest.mark.parametrize(("n", "k"), [(5, 2), (10, 4), (31, 6), (40, 38), (12, 20)])
def test_graph_is_regular_symmetric_and_deterministic(n: int, k: int) -> None:
    ids = [3 * i + 1 for i in range(n)]
    g = NeighbourGraph(ids, k, _seed(1))
    deg = min(k, n - 1)
    for c in ids:
        nb = g.neighbours(c)
        assert c not in nb and len(nb) == deg
        assert g.holders(c) == nb | {c}
        assert all(c in g.neighbours(j) for j in nb)
    again = NeighbourGraph(list(reversed(ids)), k, _seed(1))
    assert all(again.neighbours(c) == g.neighbours(c) for c in ids)
    if k < n - 1:
        assert sorted(g.order) == sorted(ids)
        assert NeighbourGraph(ids, k, _seed(2)).order != g.order


def test_ring_order_is_a_uniform_permutation() -> None:
    counts: dict[tuple[int, ...], int] = {}
    trials = 4800
    for i in range(trials):
        order = NeighbourGraph(range(4), 2, _seed(i)).order
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 24
    chi2 = stats.chisquare(list(counts.values()))
    assert chi2.pvalue > 1e-4


def _bounds_hold(n: int, model: ThreatModel, k: int, t: int) -> tuple[bool, bool, bool]:
    a = math.ceil(model.corrupt_fraction * n - 1e-9)
    dr = math.ceil(model.dropout_rate * n - 1e-9)
    sec = 2.0 ** -(model.security_bits + 1)
    removed = a + dr
    disc = 0.0 if removed < k else n * (n - k - 1) / 2 * stats.hypergeom.pmf(k, n, removed, k)
    reach = 2 * t - k - 1 if model.semi_malicious else t
    adv = n * stats.hypergeom.sf(reach - 1, n - 1, a, k)  # P[X >= reach]
    fail = n * stats.hypergeom.sf(k - t, n - 1, dr, k)  # P[dropped neighbours > k - t]
    slack = 1 + 1e-6
    return disc <= sec * slack, adv <= sec * slack, fail <= 2.0 ** -model.correctness_bits * slack


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(5, 600),
    dropout=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3]),
    corrupt=st.sampled_from([0.0, 0.02, 0.05, 0.1]),
    semi=st.booleans(),
)
def test_finder_meets_every_bound_and_is_minimal(n: int, dropout: float, corrupt: float, semi: bool) -> None:
    model = ThreatModel(dropout, corrupt, semi)
    try:
        p = find_parameters(n, model)
    except ConfigurationError as err:
        assert "dropout_rate" in str(err) and "corrupt_fraction" in str(err)
        return
    assert 2 <= p.threshold <= p.k + 1
    if p.complete:
        a = math.ceil(corrupt * n - 1e-9)
        assert p.k == n - 1
        assert p.threshold > ((n + a) / 2 if semi else a)
        assert p.threshold <= n - math.ceil(dropout * n - 1e-9)
        return
    assert p.k % 2 == 0
    assert all(_bounds_hold(n, model, p.k, p.threshold))
    # t is the smallest secure threshold, k the smallest workable degree
    if p.threshold > 2:
        assert not _bounds_hold(n, model, p.k, p.threshold - 1)[1]
    if p.k > 2:
        k2 = p.k - 2
        assert not any(all(_bounds_hold(n, model, k2, t)) for t in range(2, k2 + 2))


def test_explicit_parameters_are_validated() -> None:
    model = ThreatModel(0.1, 0.0, False)
    assert check_parameters(100, model, k=10, threshold=None, sparse=True).k == 10
    with pytest.raises(ConfigurationError, match="even"):
        check_parameters(100, model, k=7, threshold=None, sparse=True)
    with pytest.raises(ConfigurationError, match="threshold"):
        check_parameters(100, model, k=10, threshold=12, sparse=True)
    semi = ThreatModel(0.1, 0.05, True)
    with pytest.raises(ConfigurationError, match="below"):
        check_parameters(100, semi, k=10, threshold=3, sparse=True)
    big_k = check_parameters(8, model, k=10, threshold=None, sparse=True)
    assert big_k.complete and big_k.k == 7
    with pytest.raises(ConfigurationError, match="dropout_rate|corrupt_fraction"):
        find_parameters(4, ThreatModel(0.5, 0.4, True))
    with pytest.raises(ConfigurationError):
        ThreatModel(1.0)
    with pytest.raises(ConfigurationError):
        find_parameters(1, model)
