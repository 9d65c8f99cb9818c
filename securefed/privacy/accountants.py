"""Accountants: from a history of DP events to epsilon(delta).

No accountant is hand-rolled here. Each wraps a maintained implementation:

* ``pld``: privacy loss distributions from Google's ``dp_accounting``
  (Koskela et al. 2020; Doroshenko et al. 2022). Tight up to a pessimistic
  discretisation of the loss (``value_discretization_interval``), always an
  upper bound. The default.
* ``rdp``: Renyi DP from ``dp_accounting`` (Mironov 2017; Mironov, Talwar,
  Zhang 2019 for the sampled Gaussian). Looser (8-30% higher epsilon at typical
  settings), but fast and robust.
* ``prv``: Opacus's privacy random variable accountant (Gopi, Lee, Wutschitz,
  NeurIPS 2021), which only knows Poisson-subsampled Gaussians; other events
  raise :class:`UnsupportedEventError`.

An accountant is *replayable*: it keeps the ordered list of events it was
given and recomputes from that list, so restoring it from the ledger is just
composing the stored events again, and two accountants given the same events
agree exactly.

Neighbouring relation. Poisson sampling is analysed under add-or-remove-one
(a dataset with or without one unit): that is what ``dp_accounting`` and
Opacus support for sampled Gaussians, and what DP-SGD (unit = one example) and
DP-FedAvg with Poisson client sampling (unit = all data of one client) use.
Replace-one is available for unsampled events only (a replace-one guarantee
follows from add-or-remove with twice the group size; see the docs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from typing import ClassVar

from dp_accounting import privacy_accountant as dpa
from dp_accounting.pld import pld_privacy_accountant as pld
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from securefed.errors import ConfigError

from .errors import UnsupportedEventError
from .events import (
    ComposedEvent,
    DpEvent,
    GaussianEvent,
    NonPrivateEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    compose,
)

_MEMO: dict[tuple[object, ...], float] = {}
_MEMO_SIZE = 4096


class NeighbouringRelation(StrEnum):
    """Which pairs of datasets a guarantee compares."""

    ADD_OR_REMOVE_ONE = "add_or_remove_one"
    REPLACE_ONE = "replace_one"

    def to_dp_accounting(self) -> dpa.NeighboringRelation:
        return {
            NeighbouringRelation.ADD_OR_REMOVE_ONE: dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
            NeighbouringRelation.REPLACE_ONE: dpa.NeighboringRelation.REPLACE_ONE,
        }[self]


class Accountant(ABC):
    """A replayable accountant over :class:`~securefed.privacy.events.DpEvent` histories."""

    name: ClassVar[str]

    def __init__(self, relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE) -> None:
        self.relation = NeighbouringRelation(relation)
        self._history: list[DpEvent] = []
        self._cache: dict[float, float] = {}

    @property
    def history(self) -> tuple[DpEvent, ...]:
        return tuple(self._history)

    def fresh(self) -> Accountant:
        """An empty accountant of the same kind and relation."""
        return type(self)(self.relation)

    def compose(self, event: DpEvent) -> Accountant:
        """Append ``event`` (checked first: an unsupported event leaves the history unchanged)."""
        self.check(event)
        self._history.append(event)
        self._cache.clear()
        return self

    def check(self, event: DpEvent) -> None:
        """Raise :class:`UnsupportedEventError` unless this accountant can compose ``event``."""
        reason = self._unsupported(event)
        if reason is not None:
            raise UnsupportedEventError(f"the {self.name!r} accountant cannot compose this event: {reason}")

    def supports(self, event: DpEvent) -> bool:
        return self._unsupported(event) is None

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything composed so far (0 if nothing; inf if non-private).

        Results are memoised process-wide on (accountant, options, relation,
        composed history, delta): events are immutable, so clients with the
        same participation history share one computation.
        """
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if delta not in self._cache:
            event = compose(self._history)
            key = (type(self).__name__, self._options(), self.relation, event, delta)
            if key not in _MEMO:
                if len(_MEMO) >= _MEMO_SIZE:
                    _MEMO.pop(next(iter(_MEMO)))
                _MEMO[key] = self._epsilon(event, delta)
            self._cache[delta] = _MEMO[key]
        return self._cache[delta]

    def _options(self) -> tuple[float, ...]:
        return ()

    @abstractmethod
    def _unsupported(self, event: DpEvent) -> str | None:
        """None if supported, else the reason."""

    @abstractmethod
    def _epsilon(self, event: DpEvent, delta: float) -> float: ...


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence back-end chatter that is not an error.

    dp_accounting's RDP logs (via absl) each order it drops when a series fails
    to converge at small noise, and Opacus warns when the optimal RDP order sits
    at the edge of its grid; both still return valid upper bounds.
    """
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message="Optimal order is the")
            yield
    finally:
        absl.setLevel(level)


class _DpAccountingAccountant(Accountant):
    """Shared code of the two ``dp_accounting`` back-ends."""

    def _make(self) -> dpa.PrivacyAccountant:
        raise NotImplementedError

    def _unsupported(self, event: DpEvent) -> str | None:
        try:
            converted = event.to_dp_accounting()
        except UnsupportedEventError as err:
            return str(err)
        if not self._make().supports(converted):
            return f"{type(event).__name__} under {self.relation.value} is not supported by dp_accounting's {self.name}"
        return None

    def _epsilon(self, event: DpEvent, delta: float) -> float:
        if isinstance(event, NoOpEvent):
            return 0.0
        acc = self._make()
        with _quiet():
            acc.compose(event.to_dp_accounting())
            return float(acc.get_epsilon(delta))

    def delta(self, epsilon: float) -> float:
        """Delta at ``epsilon`` (dp_accounting back-ends only)."""
        acc = self._make()
        ev = compose(self._history)
        with _quiet():
            if not isinstance(ev, NoOpEvent):
                acc.compose(ev.to_dp_accounting())
            return float(acc.get_delta(epsilon))


class PldAccountant(_DpAccountingAccountant):
    name = "pld"

    def __init__(
        self,
        relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
        *,
        value_discretization_interval: float = 1e-4,
    ) -> None:
        super().__init__(relation)
        if not 0 < value_discretization_interval <= 0.1:
            raise ConfigError("value_discretization_interval must be in (0, 0.1]", key="dp.accountant")
        self.value_discretization_interval = value_discretization_interval

    def fresh(self) -> PldAccountant:
        return PldAccountant(self.relation, value_discretization_interval=self.value_discretization_interval)

    def _options(self) -> tuple[float, ...]:
        return (self.value_discretization_interval,)

    def _make(self) -> dpa.PrivacyAccountant:
        return pld.PLDAccountant(self.relation.to_dp_accounting(), self.value_discretization_interval)


class RdpAccountant(_DpAccountingAccountant):
    name = "rdp"

    def _make(self) -> dpa.PrivacyAccountant:
        return rdp.RdpAccountant(neighboring_relation=self.relation.to_dp_accounting())


def _prv_triples(event: DpEvent, count: int, out: list[tuple[float, float, int]]) -> str | None:
    """Flatten ``event`` into Opacus PRV history triples (sigma, q, steps); or the reason it can't."""
    if isinstance(event, NoOpEvent):
        return None
    if isinstance(event, SelfComposedEvent):
        return _prv_triples(event.event, count * event.count, out)
    if isinstance(event, ComposedEvent):
        for e in event.events:
            reason = _prv_triples(e, count, out)
            if reason:
                return reason
        return None
    if isinstance(event, GaussianEvent):
        out.append((event.noise_multiplier, 1.0, count))
        return None
    if isinstance(event, PoissonSampledEvent) and isinstance(event.event, GaussianEvent):
        if event.sampling_probability > 0:
            out.append((event.event.noise_multiplier, event.sampling_probability, count))
        return None
    if isinstance(event, NonPrivateEvent):
        return "a non-private release (epsilon is infinite); use pld or rdp"
    return f"Opacus PRV handles only Poisson-subsampled Gaussians, not {type(event).__name__}"


class PrvAccountant(Accountant):
    name = "prv"

    def __init__(
        self,
        relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
        *,
        eps_error: float = 0.01,
    ) -> None:
        super().__init__(relation)
        self.eps_error = eps_error

    def fresh(self) -> PrvAccountant:
        return PrvAccountant(self.relation, eps_error=self.eps_error)

    def _options(self) -> tuple[float, ...]:
        return (self.eps_error,)

    def _unsupported(self, event: DpEvent) -> str | None:
        if self.relation is not NeighbouringRelation.ADD_OR_REMOVE_ONE:
            return "Opacus PRV is defined for add-or-remove-one neighbours only"
        return _prv_triples(event, 1, [])

    def _epsilon(self, event: DpEvent, delta: float) -> float:
        from opacus.accountants import PRVAccountant as OpacusPRV

        triples: list[tuple[float, float, int]] = []
        reason = _prv_triples(event, 1, triples)
        if reason:
            raise UnsupportedEventError(reason)
        if not triples:
            return 0.0
        acc = OpacusPRV()
        acc.history = triples
        with _quiet():
            # (log(1 - q) at q = 1 also warns inside Opacus; the result is still finite and correct.)
            return float(acc.get_epsilon(delta, eps_error=self.eps_error))


AccountantFactory = Callable[..., Accountant]


class AccountantRegistry:
    """Name -> accountant factory. An object, so tests can build their own."""

    def __init__(self) -> None:
        self._factories: dict[str, AccountantFactory] = {}

    def register(self, name: str, factory: AccountantFactory, *, replace: bool = False) -> None:
        if name in self._factories and not replace:
            raise ConfigError(f"accountant {name!r} is already registered", key="dp.accountant")
        self._factories[name] = factory

    def create(
        self,
        name: str,
        relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
        **options: float,
    ) -> Accountant:
        try:
            factory = self._factories[name]
        except KeyError:
            raise ConfigError(
                f"unknown accountant {name!r}; choose one of {sorted(self._factories)}", key="dp.accountant"
            ) from None
        return factory(relation, **options)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._factories))


ACCOUNTANTS = AccountantRegistry()
ACCOUNTANTS.register("pld", PldAccountant)
ACCOUNTANTS.register("rdp", RdpAccountant)
ACCOUNTANTS.register("prv", PrvAccountant)


def epsilon_of(
    events: Sequence[DpEvent],
    delta: float,
    *,
    accountant: str = "pld",
    relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
) -> float:
    """Epsilon at ``delta`` of composing ``events`` with a fresh accountant."""
    acc = ACCOUNTANTS.create(accountant, relation)
    for e in events:
        acc.compose(e)
    eps = acc.epsilon(delta)
    return eps if math.isfinite(eps) else math.inf
