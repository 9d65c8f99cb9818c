"""The budget guard: refuse a round that would pass ``dp.budget`` before any noise is drawn.

The guard composes what was already spent (from the ledger) with what the next
round *plans* to release, per level:

* sample level: each sampled client's own history plus its planned DP-SGD
  steps, at that client's sampling rate; the level's epsilon is the maximum
  over clients (the guarantee every client's examples get);
* user level: the server's rounds so far plus the next one.

If any projection passes its budget the guard raises
:class:`BudgetExceededError` and the caller must not train, noise or send
anything for that round. Because the check runs on the plan (an upper bound
of what the round can release) it can never be passed by a round that then
releases more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .accountants import ACCOUNTANTS, NeighbouringRelation
from .calibrate import rounds_within_budget
from .errors import BudgetExceededError
from .events import DpEvent


@dataclass(frozen=True)
class LevelEpsilon:
    """Epsilon of one level at its delta: the maximum over subjects, and each subject's."""

    level: str
    delta: float
    epsilon: float
    per_subject: Mapping[str, float] = field(default_factory=dict)

    @property
    def worst_subject(self) -> str | None:
        return max(self.per_subject, key=lambda k: self.per_subject[k]) if self.per_subject else None


def level_epsilon(
    level: str,
    history: Mapping[str, Sequence[DpEvent]],
    delta: float,
    *,
    accountant: str,
    relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
) -> LevelEpsilon:
    """Epsilon of every subject's history, and the maximum (0 when nothing was released)."""
    per: dict[str, float] = {}
    for subject, events in history.items():
        acc = ACCOUNTANTS.create(accountant, relation)
        for e in events:
            acc.compose(e)
        per[subject] = acc.epsilon(delta)
    return LevelEpsilon(level, delta, max(per.values(), default=0.0), per)


class BudgetGuard:
    """Checks planned releases against ``dp.budget``.

    Args:
        accountant: registered accountant name (the run's).
        delta_sample, delta_user: each level's delta (None when the level is off).
        sample_budget, user_budget: epsilon caps (None: no cap at that level).
    """

    def __init__(
        self,
        *,
        accountant: str,
        delta_sample: float | None,
        delta_user: float | None,
        sample_budget: float | None,
        user_budget: float | None,
    ) -> None:
        for name, value in (("sample", sample_budget), ("user", user_budget)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} budget must be a finite epsilon > 0, got {value}")
        self.accountant = accountant
        self.delta_sample = delta_sample
        self.delta_user = delta_user
        self.sample_budget = sample_budget
        self.user_budget = user_budget

    def project(
        self,
        level: str,
        history: Mapping[str, Sequence[DpEvent]],
        planned: Mapping[str, DpEvent],
    ) -> LevelEpsilon:
        """Epsilon of the planned subjects after the planned releases."""
        delta = self.delta_sample if level == "sample" else self.delta_user
        if delta is None:
            raise ValueError(f"the {level} level is off but a {level}-level release was planned")
        merged = {s: [*history.get(s, ()), e] for s, e in planned.items()}
        return level_epsilon(level, merged, delta, accountant=self.accountant)

    def check(
        self,
        *,
        sample_history: Mapping[str, Sequence[DpEvent]],
        user_history: Sequence[DpEvent],
        planned_sample: Mapping[str, DpEvent],
        planned_user: DpEvent | None,
    ) -> tuple[LevelEpsilon | None, LevelEpsilon | None]:
        """Project both levels; raise before anything is released if a budget would be passed.

        Returns:
            the projected (sample, user) epsilons of this round's plan (None for an unplanned level).

        Raises:
            BudgetExceededError: naming the level, the projected and budgeted epsilon, and what to change.
        """
        sample = self.project("sample", sample_history, planned_sample) if planned_sample else None
        user = self.project("user", {"server": user_history}, {"server": planned_user}) if planned_user else None
        if sample is not None and self.sample_budget is not None and sample.epsilon > self.sample_budget:
            over = sorted(s for s, e in sample.per_subject.items() if e > self.sample_budget)
            raise BudgetExceededError(
                f"round refused before any noise was drawn: sample-level epsilon of client(s) {over[:5]} would "
                f"reach {sample.epsilon:.4g} > dp.budget.sample_epsilon = {self.sample_budget:g} "
                f"(delta {sample.delta:g}, {self.accountant}). Raise the budget, add noise, train fewer local "
                "steps, or leave those clients out.",
                level="sample",
                projected=sample.epsilon,
                budget=self.sample_budget,
            )
        if user is not None and planned_user is not None and self.user_budget is not None and user.epsilon > self.user_budget:
            assert self.delta_user is not None
            left = rounds_within_budget(
                planned_user, self.user_budget, self.delta_user, accountant=self.accountant,
                spent=tuple(user_history), max_rounds=10_000,
            )
            raise BudgetExceededError(
                f"round refused before any noise was drawn: user-level epsilon would reach {user.epsilon:.4g} > "
                f"dp.budget.user_epsilon = {self.user_budget:g} after {len(user_history)} rounds "
                f"(delta {user.delta:g}, {self.accountant}); {left} more such rounds fit. Stop the run, raise "
                "the budget, or add noise.",
                level="user",
                projected=user.epsilon,
                budget=self.user_budget,
            )
        return sample, user
