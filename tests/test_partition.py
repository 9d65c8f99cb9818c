"""Partition properties (hypothesis): coverage, disjointness, sizes, IID limit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.assets.data import Example
from securefed.errors import ConfigError, DataError
from securefed.fl.partition import SCHEMES, partition


def _examples(n: int, n_labels: int, n_groups: int) -> list[Example]:
    return [Example(text=f"t{i}", label=i % n_labels, group=f"g{i % n_groups}") for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(20, 400),
    k=st.integers(1, 12),
    scheme=st.sampled_from(SCHEMES),
    alpha=st.floats(0.3, 100.0),
    seed=st.integers(0, 2**16),
)
def test_every_example_in_exactly_one_client(n: int, k: int, scheme: str, alpha: float, seed: int) -> None:
    ex = _examples(n, 3, 40)
    try:
        p = partition(ex, k, scheme, alpha=alpha, seed=seed, min_size=1)
    except DataError:
        assert scheme in ("dirichlet", "quantity", "natural")  # only skewed schemes may fail to fill every client
        return
    flat = [i for ix in p.indices for i in ix]
    assert sorted(flat) == list(range(n))
    assert sum(p.sizes()) == n and p.n_clients == k
    assert min(p.sizes()) >= 1
    hist = p.label_histograms(ex, 3)
    assert [sum(h) for h in hist] == p.sizes()


def test_partition_is_seeded() -> None:
    ex = _examples(300, 2, 10)
    assert partition(ex, 5, "dirichlet", seed=1) == partition(ex, 5, "dirichlet", seed=1)
    assert partition(ex, 5, "dirichlet", seed=1) != partition(ex, 5, "dirichlet", seed=2)


def _label_skew(alpha: float) -> float:
    ex = _examples(4000, 2, 10)
    p = partition(ex, 8, "dirichlet", alpha=alpha, seed=0)
    h = np.array(p.label_histograms(ex, 2), dtype=float)
    frac = h[:, 1] / h.sum(1)
    return float(np.abs(frac - 0.5).mean())


def test_large_alpha_approaches_iid_and_small_alpha_skews() -> None:
    assert _label_skew(1000.0) < 0.03
    assert _label_skew(0.1) > 0.25


def test_natural_partition_keeps_groups_together() -> None:
    ex = _examples(200, 2, 17)
    p = partition(ex, 4, "natural", seed=0)
    owner = {}
    for c, ix in enumerate(p.indices):
        for i in ix:
            g = ex[i].group
            assert owner.setdefault(g, c) == c


def test_bad_partitions() -> None:
    with pytest.raises(ConfigError, match="partition.scheme"):
        partition(_examples(10, 2, 2), 2, "random")
    with pytest.raises(DataError, match="cannot give"):
        partition(_examples(3, 2, 2), 5, "iid")
    with pytest.raises(DataError, match="labelled"):
        partition([Example("x")] * 10, 2, "dirichlet")
