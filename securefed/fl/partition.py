"""Seeded partitioning of a training set across clients.

* ``iid``: a seeded permutation cut into near-equal parts.
* ``dirichlet``: label skew; for each label, client shares ~ Dir(alpha)
  (Hsu et al. 2019). Small alpha gives each client few labels; alpha -> inf
  approaches IID. Draws are repeated (seeded) until every client has at least
  ``min_size`` examples.
* ``quantity``: client sizes ~ Dir(alpha) over an IID shuffle (quantity skew).
* ``natural``: by the examples' ``group`` (e.g. the movie), groups dealt to
  clients round-robin after a seeded shuffle.

Every example lands in exactly one client. Partition order is not a secret,
so NumPy's seeded generator is the right tool here (reproducibility), not a CSPRNG.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from securefed.assets.data import Example
from securefed.errors import ConfigError, DataError

SCHEMES = ("iid", "dirichlet", "quantity", "natural")


@dataclass(frozen=True)
class Partition:
    """Client id -> indices into the training set."""

    indices: tuple[tuple[int, ...], ...]

    @property
    def n_clients(self) -> int:
        return len(self.indices)

    def sizes(self) -> list[int]:
        return [len(ix) for ix in self.indices]

    def label_histograms(self, examples: Sequence[Example], n_labels: int) -> list[list[int]]:
        out = []
        for ix in self.indices:
            h = [0] * n_labels
            for i in ix:
                lab = examples[i].label
                if lab is not None:
                    h[lab] += 1
            out.append(h)
        return out


def partition(
    examples: Sequence[Example],
    n_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> Partition:
    """Split ``examples`` over ``n_clients`` clients.

    Raises:
        ConfigError: unknown scheme or invalid parameters.
        DataError: the data cannot give every client ``min_size`` examples.
    """
    n = len(examples)
    if n_clients < 1:
        raise ConfigError(f"need at least one client, got {n_clients}", key="partition.clients")
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; choose one of {SCHEMES}", key="partition.scheme")
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}", key="partition.alpha")
    if n < n_clients * min_size:
        raise DataError(f"{n} examples cannot give {n_clients} clients {min_size} example(s) each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        if scheme == "iid":
            parts = np.array_split(rng.permutation(n), n_clients)
        elif scheme == "quantity":
            props = rng.dirichlet([alpha] * n_clients)
            cuts = (np.cumsum(props)[:-1] * n).astype(int)
            parts = np.split(rng.permutation(n), cuts)
        elif scheme == "dirichlet":
            parts = _dirichlet(examples, n_clients, alpha, rng)
        else:
            parts = _natural(examples, n_clients, rng)
        if min(len(p) for p in parts) >= min_size:
            return Partition(tuple(tuple(int(i) for i in sorted(p)) for p in parts))
        if scheme in ("iid", "natural"):
            break
    raise DataError(
        f"{scheme} partition could not give every one of {n_clients} clients >= {min_size} examples "
        f"(alpha={alpha}); raise partition.alpha, lower partition.clients, or lower partition.min_size"
    )


def _dirichlet(examples: Sequence[Example], k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        if e.label is None:
            raise DataError("dirichlet label skew needs labelled examples; use iid, quantity or natural")
        by_label[e.label].append(i)
    buckets: list[list[int]] = [[] for _ in range(k)]
    for lab in sorted(by_label):
        ix = rng.permutation(by_label[lab])
        props = rng.dirichlet([alpha] * k)
        cuts = (np.cumsum(props)[:-1] * len(ix)).astype(int)
        for c, chunk in enumerate(np.split(ix, cuts)):
            buckets[c].extend(int(i) for i in chunk)
    return [np.array(b, dtype=np.int64) for b in buckets]


def _natural(examples: Sequence[Example], k: int, rng: np.random.Generator) -> list[np.ndarray]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[e.group if e.group is not None else f"#{i}"].append(i)
    names = sorted(groups)
    buckets: list[list[int]] = [[] for _ in range(k)]
    for j, gi in enumerate(rng.permutation(len(names))):
        buckets[j % k].extend(groups[names[gi]])
    return [np.array(b, dtype=np.int64) for b in buckets]
