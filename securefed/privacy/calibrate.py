"""Calibration: the noise multiplier that reaches a target epsilon, and how far a budget goes.

:func:`calibrate_noise_multiplier` drives ``dp_accounting``'s
``calibrate_dp_mechanism`` (Brent's method with a guarantee that the returned
parameter never exceeds the target) with any of our accountants, then checks
the result once more with the exact accountant the run reports with. For PLD
the search uses a 10x coarser loss discretisation, which is still a
pessimistic upper bound, so the search is ~10x faster and the final check
still holds at the fine one.
"""

from __future__ import annotations

import math
from typing import Any

from dp_accounting import dp_event as dpe
from dp_accounting import mechanism_calibration as mc

from .accountants import ACCOUNTANTS, Accountant, NeighbouringRelation, PldAccountant
from .errors import CalibrationError
from .events import DpEvent, SelfComposedEvent, dp_sgd_event

MIN_NOISE_MULTIPLIER = 0.3
MAX_NOISE_MULTIPLIER = 100.0


class _Probe:
    """Duck-types the part of ``dp_accounting.PrivacyAccountant`` that calibration calls."""

    def __init__(self, accountant: Accountant) -> None:
        self._acc = accountant

    @property
    def ledger(self) -> dpe.DpEvent:
        return dpe.NoOpDpEvent() if not self._acc.history else dpe.UnsupportedDpEvent()

    def compose(self, event: DpEvent) -> _Probe:
        self._acc.compose(event)
        return self

    def get_epsilon(self, delta: float) -> float:
        eps = self._acc.epsilon(delta)
        return eps if math.isfinite(eps) else 1e300


def _search_accountant(acc: Accountant) -> Accountant:
    if isinstance(acc, PldAccountant):
        return PldAccountant(acc.relation, value_discretization_interval=min(0.1, 10 * acc.value_discretization_interval))
    return acc.fresh()


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    *,
    sampling_probability: float,
    steps: int,
    accountant: str = "pld",
    relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
    min_noise_multiplier: float = MIN_NOISE_MULTIPLIER,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    tol: float = 1e-3,
) -> float:
    """Smallest sigma (within ``tol``) whose ``steps`` Poisson-sampled Gaussian releases
    at rate ``sampling_probability`` stay within ``(target_epsilon, delta)``.

    Used for both levels: DP-SGD (q = expected batch / client examples, steps =
    local steps x rounds) and DP-FedAvg (q = expected clients / clients, steps
    = rounds).

    Raises:
        CalibrationError: even ``max_noise_multiplier`` overshoots the target
            (the target is unreachable for this many steps at this rate).
        ValueError: an argument is out of range.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sampling_probability <= 1:
        raise ValueError(f"sampling_probability must be in (0, 1], got {sampling_probability}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    final = ACCOUNTANTS.create(accountant, relation)
    search = _search_accountant(final)

    def event(sigma: float) -> DpEvent:
        return dp_sgd_event(sampling_probability, sigma, steps)

    def eps_at(acc: Accountant, sigma: float) -> float:
        return acc.fresh().compose(event(sigma)).epsilon(delta)

    if eps_at(final, max_noise_multiplier) > target_epsilon:
        raise CalibrationError(
            f"target epsilon {target_epsilon} at delta {delta:g} is unreachable over {steps} steps at sampling "
            f"rate {sampling_probability:g}: even noise multiplier {max_noise_multiplier} gives "
            f"{eps_at(final, max_noise_multiplier):.4g}. Raise the target epsilon, or lower the number of "
            "rounds / local steps or the sampling rate."
        )
    if eps_at(search, min_noise_multiplier) <= target_epsilon:
        sigma = min_noise_multiplier
    else:
        sigma = float(
            mc.calibrate_dp_mechanism(
                lambda: _Probe(search.fresh()),
                event,
                target_epsilon,
                delta,
                bracket_interval=mc.ExplicitBracketInterval(min_noise_multiplier, max_noise_multiplier),
                tol=tol,
            )
        )
    # The coarse search accountant bounds the fine one from above, but check, and step up if needed.
    for _ in range(200):
        if eps_at(final, sigma) <= target_epsilon:
            return sigma
        sigma = min(max_noise_multiplier, sigma * (1 + tol) + tol)
    raise CalibrationError(f"calibration did not converge for target epsilon {target_epsilon}")  # pragma: no cover


def rounds_within_budget(
    per_round: DpEvent,
    budget: float,
    delta: float,
    *,
    accountant: str = "pld",
    relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
    max_rounds: int = 100_000,
    spent: tuple[DpEvent, ...] = (),
) -> int:
    """How many more rounds of ``per_round`` fit in ``budget`` after ``spent`` (bisection on the count)."""

    def eps(n: int) -> float:
        acc = ACCOUNTANTS.create(accountant, relation)
        for e in spent:
            acc.compose(e)
        if n:
            acc.compose(SelfComposedEvent(per_round, n))
        return acc.epsilon(delta)

    if eps(0) > budget:
        return 0
    lo, hi = 0, 1
    while hi <= max_rounds and eps(hi) <= budget:
        lo, hi = hi, hi * 2
    if hi > max_rounds:
        return max_rounds if eps(max_rounds) <= budget else _bisect_rounds(eps, lo, max_rounds, budget)
    return _bisect_rounds(eps, lo, hi, budget)


def _bisect_rounds(eps: Any, lo: int, hi: int, budget: float) -> int:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
