"""Neighbour graphs and the parameter finder for SecAgg / SecAgg+.

SecAgg (Bonawitz et al., CCS 2017) has every client mask with and
secret-share to every other client: the complete graph. SecAgg+ (Bell,
Bonawitz, Gascon, Lepoint, Raykova, CCS 2020) replaces it by a sparse random
``k``-regular graph, which cuts client cost from ``O(n)`` to ``O(k)``. We use a
*Harary-type* graph: the server draws a uniformly random ring order of the
sampled clients (a 256-bit seed it sends to everyone, expanded with the
AES-CTR :class:`~securefed.protocols.csprng.KeyStream` and unbiased
Fisher-Yates), and each client is joined to the ``k/2`` clients on either side
of it. Every client recomputes the graph from the seed, so the server cannot
hand different clients different graphs.

A client's *share holders* are its closed neighbourhood ``N[i]`` (its ``k``
neighbours and itself): ``k + 1`` holders, any ``t`` of which reconstruct its
self-mask seed or its masking key. :func:`find_parameters` picks ``k`` and
``t`` from the number of clients ``n``, the expected dropout rate ``delta``,
the tolerated fraction of corrupt clients ``gamma``, the statistical security
``sigma`` (40 bits) and the failure probability ``2^-eta`` (``eta = 20``). The
derivation is written out in ``docs/secure-aggregation.md``; in short, with
``A = ceil(gamma n)`` corrupt and ``D = ceil(delta n)`` dropped clients
(rounded up: fcp rounds down, which assumes no dropout at all in a round of
6 clients at 10%):

1. *Connectivity* (privacy of the sum): removing ``A + D`` clients can split a
   Harary ring only if two disjoint runs of ``k/2`` consecutive positions are
   all removed. With the random ring order,
   ``P <= n (n - k - 1) / 2 * C(A + D, k) / C(n, k)``, required below
   ``2^-(sigma + 1)``.
2. *No reconstruction by the adversary*: an honest client's corrupt neighbours
   ``X ~ Hypergeometric(n - 1, A, k)``. With ``x*`` the smallest value with
   ``n * P[X > x*] <= 2^-(sigma + 1)``: an honest-but-curious server needs
   ``t >= x* + 1``; a semi-malicious server, which can ask some honest
   neighbours for self-mask shares and others for key shares, needs
   ``2t - (k + 1) >= x* + 1`` (the honest holders answer one kind each).
3. *Correctness*: a client's dropped neighbours
   ``Z ~ Hypergeometric(n - 1, D, k)`` must leave ``t`` holders:
   ``n * P[k - Z < t] <= 2^-eta``.

The finder returns the smallest even ``k`` for which some ``t`` satisfies all
three, with the smallest such ``t`` (best dropout tolerance, cheapest
reconstruction). When no sparse graph works (small ``n``), it falls back to the
complete graph, where the same conditions become ``t > A`` (curious),
``t > (n + A) / 2`` (semi-malicious) and ``t <= n - D``.

Fcp's ``graph_parameter_finder`` (peers.md §2.8) follows the same plan; the
probabilities here are hypergeometric tails summed term by term in log space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from ..csprng import KeyStream
from ..errors import ConfigurationError

SECURITY_BITS = 40
CORRECTNESS_BITS = 20


@dataclass(frozen=True)
class ThreatModel:
    """What the parameters must withstand.

    Attributes:
        dropout_rate: expected fraction of clients that drop during a round.
        corrupt_fraction: fraction of clients that may collude with the server.
        semi_malicious: the server may lie about who dropped (authenticated variant).
        security_bits: statistical security ``sigma``.
        correctness_bits: the round fails with probability at most ``2^-eta``.
    """

    dropout_rate: float = 0.1
    corrupt_fraction: float = 0.0
    semi_malicious: bool = False
    security_bits: int = SECURITY_BITS
    correctness_bits: int = CORRECTNESS_BITS

    def __post_init__(self) -> None:
        if not 0 <= self.dropout_rate < 1:
            raise ConfigurationError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0 <= self.corrupt_fraction < 1:
            raise ConfigurationError(f"corrupt_fraction must be in [0, 1), got {self.corrupt_fraction}")
        if not 1 <= self.security_bits <= 256:
            raise ConfigurationError(f"security_bits must be in 1..256, got {self.security_bits}")
        if not 1 <= self.correctness_bits <= 256:
            raise ConfigurationError(f"correctness_bits must be in 1..256, got {self.correctness_bits}")

    def corrupt(self, n: int) -> int:
        """Corrupt clients assumed among ``n``: rounded up (conservative for security)."""
        return math.ceil(self.corrupt_fraction * n - 1e-9)

    def dropped(self, n: int) -> int:
        """Dropouts assumed among ``n``: rounded up (conservative for small rounds)."""
        return math.ceil(self.dropout_rate * n - 1e-9)


@dataclass(frozen=True)
class GraphParameters:
    """A chosen graph and threshold for ``n`` clients.

    ``k`` counts neighbours (not the client itself); ``complete`` means
    ``k = n - 1``. ``threshold`` is out of the ``k + 1`` share holders.
    """

    n: int
    k: int
    threshold: int
    complete: bool

    @property
    def holders(self) -> int:
        return self.k + 1


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _tails_above(population: int, successes: int, draws: int) -> list[float]:
    """``out[x + 1] = P[X > x]`` for ``x = -1 .. draws``, ``X ~ Hypergeometric(population, successes, draws)``.

    Terms are computed in log space (``lgamma``) and summed from the top, so
    tiny tails keep their relative precision; O(draws) per call.
    """
    lo = max(0, draws - (population - successes))
    hi = min(successes, draws)
    denom = _log_comb(population, draws)
    pmf = [0.0] * (draws + 1)
    for x in range(lo, hi + 1):
        pmf[x] = math.exp(_log_comb(successes, x) + _log_comb(population - successes, draws - x) - denom)
    out = [0.0] * (draws + 2)  # out[j] = P[X >= j] = P[X > j - 1]
    acc = 0.0
    for x in range(draws, -1, -1):
        acc += pmf[x]
        out[x] = acc
    return out


def _disconnect_probability(n: int, k: int, removed: int) -> float:
    if removed < k:
        return 0.0
    log_pairs = math.log(n) + math.log(max(n - k - 1, 1)) - math.log(2)
    return math.exp(log_pairs + _log_comb(removed, k) - _log_comb(n, k))


def _threshold_range(n: int, k: int, model: ThreatModel) -> tuple[int, int]:
    """``(t_min, t_max)`` for a Harary graph of degree ``k`` (empty if ``t_min > t_max``)."""
    a, dr = model.corrupt(n), model.dropped(n)
    sec = 2.0 ** -(model.security_bits + 1) / n
    adv = _tails_above(n - 1, a, k)  # adv[j] = P[corrupt neighbours >= j]
    x_star = next(x for x in range(-1, k + 1) if adv[x + 1] <= sec)
    if model.semi_malicious:
        t_min = math.ceil((x_star + k + 2) / 2)
    else:
        t_min = x_star + 1
    t_min = max(t_min, 2)
    fail = 2.0 ** -model.correctness_bits / n
    drop = _tails_above(n - 1, dr, k)  # drop[j] = P[dropped neighbours >= j]
    # largest t with P[dropped > k - t] = drop[k - t + 1] <= fail
    t_max = next((t for t in range(k + 1, 1, -1) if drop[k - t + 1] <= fail), 0)
    return t_min, t_max


def complete_threshold_range(n: int, model: ThreatModel) -> tuple[int, int]:
    a, dr = model.corrupt(n), model.dropped(n)
    t_min = (n + a) // 2 + 1 if model.semi_malicious else a + 1
    return max(t_min, 2), n - dr


def find_parameters(n: int, model: ThreatModel, *, sparse: bool = True) -> GraphParameters:
    """The cheapest graph and threshold meeting ``model`` for ``n`` clients.

    Args:
        n: number of sampled clients (at least 2).
        model: the threat model.
        sparse: search Harary graphs first (SecAgg+); ``False`` forces the
            complete graph (SecAgg).

    Raises:
        ConfigurationError: no threshold satisfies the model; the message
            names the knobs (dropout_rate, corrupt_fraction, number of clients).
    """
    if n < 2:
        raise ConfigurationError(f"secure aggregation needs at least 2 clients, got {n}")
    if sparse:
        removed = model.corrupt(n) + model.dropped(n)
        for k in range(2, n - 1, 2):
            if _disconnect_probability(n, k, removed) > 2.0 ** -(model.security_bits + 1):
                continue
            t_min, t_max = _threshold_range(n, k, model)
            if t_min <= t_max:
                return GraphParameters(n=n, k=k, threshold=t_min, complete=False)
    t_min, t_max = complete_threshold_range(n, model)
    if t_min > t_max:
        raise ConfigurationError(
            f"no threshold works for {n} clients with dropout_rate={model.dropout_rate} and "
            f"corrupt_fraction={model.corrupt_fraction} (need t >= {t_min} for security but t <= {t_max} "
            "to survive dropouts): lower dropout_rate or corrupt_fraction, or sample more clients"
        )
    return GraphParameters(n=n, k=n - 1, threshold=t_min, complete=True)


def check_parameters(
    n: int, model: ThreatModel, *, k: int | None, threshold: int | None, sparse: bool
) -> GraphParameters:
    """Validate user-chosen ``k`` / ``threshold`` (``None`` = let the finder choose).

    Security is enforced (a threshold the adversary could reach is refused);
    a threshold above the correctness bound is allowed, it only makes
    aborts more likely.
    """
    if not sparse:
        if k is not None:
            raise ConfigurationError("k applies to the sparse (harary) graph only; remove it or set graph='harary'")
        if threshold is None:
            return find_parameters(n, model, sparse=False)
        t_min, _ = complete_threshold_range(n, model)
        _check_threshold(threshold, t_min, n, "complete graph")
        return GraphParameters(n=n, k=n - 1, threshold=threshold, complete=True)
    if k is None:
        found = find_parameters(n, model, sparse=True)
        if threshold is None:
            return found
        k = found.k
    if k < 2 or k % 2:
        raise ConfigurationError(f"k must be an even number >= 2 (neighbours per client), got {k}")
    if k >= n - 1:
        t_min, t_max = complete_threshold_range(n, model)
        complete = True
        k = n - 1
    else:
        t_min, t_max = _threshold_range(n, k, model)
        complete = False
    if threshold is None:
        if t_min > t_max:
            raise ConfigurationError(
                f"k={k} cannot meet the threat model for {n} clients (threshold would need to be in "
                f"[{t_min}, {t_max}]): raise k, lower dropout_rate or corrupt_fraction, or leave k unset"
            )
        threshold = t_min
    _check_threshold(threshold, t_min, k + 1, f"k={k}")
    return GraphParameters(n=n, k=k, threshold=threshold, complete=complete)


def _check_threshold(t: int, t_min: int, holders: int, what: str) -> None:
    if not 2 <= t <= holders:
        raise ConfigurationError(f"threshold must be in 2..{holders} ({what}), got {t}")
    if t < t_min:
        raise ConfigurationError(
            f"threshold={t} is below {t_min}, the smallest value that keeps shares out of the adversary's "
            f"reach for this threat model ({what}): raise threshold, or lower corrupt_fraction"
        )


class NeighbourGraph:
    """The graph of one round over the sampled client ids.

    Args:
        clients: the sampled client ids (any order; sorted internally).
        k: neighbours per client; ``k >= n - 1`` gives the complete graph.
        seed: 32 bytes from the server, expanded into the ring order.
    """

    def __init__(self, clients: Sequence[int], k: int, seed: bytes) -> None:
        ids = tuple(sorted(clients))
        if len(set(ids)) != len(ids):
            raise ConfigurationError("client ids must be distinct")
        self.clients = ids
        self.n = len(ids)
        self.complete = k >= self.n - 1
        self.k = self.n - 1 if self.complete else k
        if not self.complete and (k < 2 or k % 2):
            raise ConfigurationError(f"k must be even and >= 2, got {k}")
        self._seed = seed

    @property
    def seed(self) -> bytes:
        return self._seed

    @cached_property
    def order(self) -> tuple[int, ...]:
        """The ring order: a uniformly random permutation of the ids (Fisher-Yates)."""
        ids = list(self.clients)
        stream = KeyStream(self._seed)
        for i in range(len(ids) - 1, 0, -1):
            j = _uniform_below(stream, i + 1)
            ids[i], ids[j] = ids[j], ids[i]
        return tuple(ids)

    @cached_property
    def _neighbours(self) -> dict[int, frozenset[int]]:
        if self.complete:
            everyone = frozenset(self.clients)
            return {c: everyone - {c} for c in self.clients}
        order, n, half = self.order, self.n, self.k // 2
        out = {}
        for p, c in enumerate(order):
            out[c] = frozenset(order[(p + off) % n] for off in range(-half, half + 1) if off)
        return out

    def neighbours(self, client: int) -> frozenset[int]:
        """Open neighbourhood ``N(i)`` (never contains ``client``)."""
        return self._neighbours[client]

    def holders(self, client: int) -> frozenset[int]:
        """Closed neighbourhood ``N[i]``: the holders of ``client``'s shares."""
        return self._neighbours[client] | {client}


def _uniform_below(stream: KeyStream, bound: int) -> int:
    """An integer uniform on ``[0, bound)`` by rejection sampling 64-bit draws."""
    limit = (1 << 64) - ((1 << 64) % bound)
    while True:
        v = int(stream.uniform_uint(1, 64)[0])
        if v < limit:
            return v % bound
