"""Immutable DP events: what was released, as data.

An event describes a mechanism, not its privacy cost: "a Poisson sample at
rate q, then a Gaussian sum with noise multiplier sigma, 120 times". The cost
is computed by an accountant (:mod:`securefed.privacy.accountants`), which may
be swapped without touching what was recorded. This is the design of Google's
``dp_accounting`` (``dp_event.py``); our events convert to theirs with
:meth:`DpEvent.to_dp_accounting`.

We keep our own small vocabulary instead of storing ``dp_accounting`` objects
because the ledger must outlive library versions: events serialise to strict,
versioned JSON (:func:`event_to_json` / :func:`event_from_json`), never pickle,
and the decoder refuses unknown kinds, unknown or missing fields, deep nesting
and oversized input.

Compatibility contract (as in ``dp_accounting``): a kind is never removed and
the meaning of a field never changes; new fields are optional.

Discrete Gaussian and Skellam events exist so that distributed DP under secure
aggregation (a later issue) records into the same ledger; no accountant here
composes them yet, and they raise :class:`UnsupportedEventError` instead of
being silently ignored.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from dp_accounting import dp_event as dpe

from .errors import EventDecodeError, UnsupportedEventError

EVENT_SCHEMA_VERSION = 1
MAX_EVENT_JSON_BYTES = 1 << 20
MAX_EVENT_DEPTH = 16
MAX_COMPOSED_EVENTS = 100_000


class DpEvent(ABC):
    """Base class; subclasses are frozen dataclasses registered by ``kind``."""

    kind: ClassVar[str]

    @abstractmethod
    def to_data(self) -> dict[str, Any]:
        """JSON-able dict with a ``kind`` key."""

    @abstractmethod
    def to_dp_accounting(self) -> dpe.DpEvent:
        """The equivalent ``dp_accounting`` event.

        Raises:
            UnsupportedEventError: no ``dp_accounting`` accountant handles this kind.
        """


def _check_prob(q: float, name: str) -> None:
    if not (isinstance(q, int | float) and not isinstance(q, bool) and 0.0 <= q <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {q!r}")


def _check_nonneg(x: float, name: str) -> None:
    if not (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")


@dataclass(frozen=True)
class NoOpEvent(DpEvent):
    """Nothing released (e.g. a client sampled but silent before training)."""

    kind: ClassVar[str] = "noop"

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def to_dp_accounting(self) -> dpe.DpEvent:
        return dpe.NoOpDpEvent()


@dataclass(frozen=True)
class NonPrivateEvent(DpEvent):
    """Data released without a DP guarantee: epsilon becomes infinite."""

    kind: ClassVar[str] = "non_private"

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def to_dp_accounting(self) -> dpe.DpEvent:
        return dpe.NonPrivateDpEvent()


@dataclass(frozen=True)
class GaussianEvent(DpEvent):
    """The Gaussian mechanism: a sum of L2-bounded (norm C) contributions plus N(0, (sigma C)^2 I)."""

    noise_multiplier: float
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _check_nonneg(self.noise_multiplier, "noise_multiplier")
        if self.noise_multiplier == 0:
            raise ValueError("a Gaussian event needs noise_multiplier > 0; record a NonPrivateEvent instead")

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind, "noise_multiplier": float(self.noise_multiplier)}

    def to_dp_accounting(self) -> dpe.DpEvent:
        return dpe.GaussianDpEvent(float(self.noise_multiplier))


@dataclass(frozen=True)
class PoissonSampledEvent(DpEvent):
    """Each unit (example or client) joins independently with probability q, then ``event`` runs."""

    sampling_probability: float
    event: DpEvent
    kind: ClassVar[str] = "poisson_sampled"

    def __post_init__(self) -> None:
        _check_prob(self.sampling_probability, "sampling_probability")
        if not isinstance(self.event, DpEvent):
            raise TypeError("PoissonSampledEvent.event must be a DpEvent")

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind, "sampling_probability": float(self.sampling_probability), "event": self.event.to_data()}

    def to_dp_accounting(self) -> dpe.DpEvent:
        return dpe.PoissonSampledDpEvent(float(self.sampling_probability), self.event.to_dp_accounting())


@dataclass(frozen=True)
class SelfComposedEvent(DpEvent):
    """``event`` applied ``count`` times (adaptively)."""

    event: DpEvent
    count: int
    kind: ClassVar[str] = "self_composed"

    def __post_init__(self) -> None:
        if not isinstance(self.event, DpEvent):
            raise TypeError("SelfComposedEvent.event must be a DpEvent")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be an integer >= 1, got {self.count!r}")

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": int(self.count), "event": self.event.to_data()}

    def to_dp_accounting(self) -> dpe.DpEvent:
        return dpe.SelfComposedDpEvent(self.event.to_dp_accounting(), int(self.count))


@dataclass(frozen=True)
class ComposedEvent(DpEvent):
    """A sequence of (possibly different) events, applied adaptively."""

    events: tuple[DpEvent, ...]
    kind: ClassVar[str] = "composed"

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple) or not all(isinstance(e, DpEvent) for e in self.events):
            raise TypeError("ComposedEvent.events must be a tuple of DpEvent")

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind, "events": [e.to_data() for e in self.events]}

    def to_dp_accounting(self) -> dpe.DpEvent:
        return dpe.ComposedDpEvent([e.to_dp_accounting() for e in self.events])


@dataclass(frozen=True)
class DiscreteGaussianEvent(DpEvent):
    """Discrete Gaussian noise N_Z(0, sigma^2) on an integer sum (Canonne, Kamath, Steinke 2020).

    Recorded by distributed DP; not composable by the accountants here yet.
    """

    sigma: float
    l2_sensitivity: float
    kind: ClassVar[str] = "discrete_gaussian"

    def __post_init__(self) -> None:
        _check_nonneg(self.sigma, "sigma")
        _check_nonneg(self.l2_sensitivity, "l2_sensitivity")

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind, "sigma": float(self.sigma), "l2_sensitivity": float(self.l2_sensitivity)}

    def to_dp_accounting(self) -> dpe.DpEvent:
        raise UnsupportedEventError(
            "discrete Gaussian events cannot be composed by dp-accounting 0.6's accountants yet; "
            "account them with a zCDP bound once distributed DP lands"
        )


@dataclass(frozen=True)
class SkellamEvent(DpEvent):
    """Skellam noise on an integer sum (Agarwal, Kairouz, Liu, NeurIPS 2021); recorded, not yet composable."""

    mu: float
    l1_sensitivity: float
    l2_sensitivity: float
    kind: ClassVar[str] = "skellam"

    def __post_init__(self) -> None:
        for name in ("mu", "l1_sensitivity", "l2_sensitivity"):
            _check_nonneg(getattr(self, name), name)

    def to_data(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mu": float(self.mu),
            "l1_sensitivity": float(self.l1_sensitivity),
            "l2_sensitivity": float(self.l2_sensitivity),
        }

    def to_dp_accounting(self) -> dpe.DpEvent:
        raise UnsupportedEventError(
            "Skellam events have no accountant in dp-accounting 0.6; they are recorded for a later accountant"
        )


# ---------------------------------------------------------------------------------------------
# Strict JSON codec


def _num(d: dict[str, Any], key: str) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise EventDecodeError(f"event field {key!r} must be a number, got {type(v).__name__}")
    return float(v)


def _decode(d: Any, depth: int) -> DpEvent:
    if depth > MAX_EVENT_DEPTH:
        raise EventDecodeError(f"event nesting deeper than {MAX_EVENT_DEPTH}")
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise EventDecodeError("an event must be a JSON object with a string 'kind'")
    kind = d["kind"]
    spec = _FIELDS.get(kind)
    if spec is None:
        raise EventDecodeError(f"unknown event kind {kind!r}; known: {sorted(_FIELDS)}")
    if set(d) != {"kind", *spec}:
        raise EventDecodeError(f"event {kind!r} has fields {sorted(set(d) - {'kind'})}, expected {sorted(spec)}")
    try:
        return _BUILD[kind](d, depth)
    except (ValueError, TypeError) as err:
        raise EventDecodeError(f"invalid {kind!r} event: {err}") from None


def _count(d: dict[str, Any]) -> int:
    v = d["count"]
    if isinstance(v, bool) or not isinstance(v, int):
        raise EventDecodeError("event field 'count' must be an integer")
    return v


def _events(d: dict[str, Any], depth: int) -> tuple[DpEvent, ...]:
    v = d["events"]
    if not isinstance(v, list) or len(v) > MAX_COMPOSED_EVENTS:
        raise EventDecodeError(f"'events' must be a list of at most {MAX_COMPOSED_EVENTS} events")
    return tuple(_decode(e, depth + 1) for e in v)


_FIELDS: dict[str, tuple[str, ...]] = {
    "noop": (),
    "non_private": (),
    "gaussian": ("noise_multiplier",),
    "poisson_sampled": ("sampling_probability", "event"),
    "self_composed": ("count", "event"),
    "composed": ("events",),
    "discrete_gaussian": ("sigma", "l2_sensitivity"),
    "skellam": ("mu", "l1_sensitivity", "l2_sensitivity"),
}
_BUILD: dict[str, Callable[[dict[str, Any], int], DpEvent]] = {
    "noop": lambda d, k: NoOpEvent(),
    "non_private": lambda d, k: NonPrivateEvent(),
    "gaussian": lambda d, k: GaussianEvent(_num(d, "noise_multiplier")),
    "poisson_sampled": lambda d, k: PoissonSampledEvent(_num(d, "sampling_probability"), _decode(d["event"], k + 1)),
    "self_composed": lambda d, k: SelfComposedEvent(_decode(d["event"], k + 1), _count(d)),
    "composed": lambda d, k: ComposedEvent(_events(d, k)),
    "discrete_gaussian": lambda d, k: DiscreteGaussianEvent(_num(d, "sigma"), _num(d, "l2_sensitivity")),
    "skellam": lambda d, k: SkellamEvent(_num(d, "mu"), _num(d, "l1_sensitivity"), _num(d, "l2_sensitivity")),
}


def event_to_json(event: DpEvent) -> str:
    """Canonical, versioned JSON text of ``event`` (stable across runs: sorted keys)."""
    return json.dumps({"v": EVENT_SCHEMA_VERSION, "event": event.to_data()}, sort_keys=True, separators=(",", ":"))


def event_from_json(text: str | bytes) -> DpEvent:
    """Parse :func:`event_to_json` output; strict.

    Raises:
        EventDecodeError: wrong version, unknown kind or field, invalid value,
            nesting deeper than ``MAX_EVENT_DEPTH``, or more than ``MAX_EVENT_JSON_BYTES``.
    """
    if len(text) > MAX_EVENT_JSON_BYTES:
        raise EventDecodeError(f"event JSON larger than {MAX_EVENT_JSON_BYTES} bytes")
    try:
        outer = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise EventDecodeError(f"event is not valid JSON: {err}") from None
    if not isinstance(outer, dict) or set(outer) != {"v", "event"}:
        raise EventDecodeError("event envelope must be an object with exactly 'v' and 'event'")
    if outer["v"] != EVENT_SCHEMA_VERSION:
        raise EventDecodeError(f"event schema version {outer['v']!r}; this securefed reads {EVENT_SCHEMA_VERSION}")
    return _decode(outer["event"], 0)


def dp_sgd_event(sampling_probability: float, noise_multiplier: float, steps: int) -> DpEvent:
    """``steps`` Poisson-subsampled Gaussian steps: one client's DP-SGD (or rounds of DP-FedAvg)."""
    if steps == 0:
        return NoOpEvent()
    return SelfComposedEvent(PoissonSampledEvent(sampling_probability, GaussianEvent(noise_multiplier)), steps)


def compose(events: Sequence[DpEvent]) -> DpEvent:
    """Compose a history, merging runs of equal events into one :class:`SelfComposedEvent`.

    Merging is exact (a self-composition *is* the repeated event) and lets the
    PLD accountant self-convolve in log time instead of convolving each step.
    """
    runs: list[tuple[DpEvent, int]] = []
    for e in events:
        if isinstance(e, NoOpEvent):
            continue
        base, n = (e.event, e.count) if isinstance(e, SelfComposedEvent) else (e, 1)
        if runs and runs[-1][0] == base:
            runs[-1] = (base, runs[-1][1] + n)
        else:
            runs.append((base, n))
    parts: list[DpEvent] = [b if n == 1 else SelfComposedEvent(b, n) for b, n in runs]
    if not parts:
        return NoOpEvent()
    return parts[0] if len(parts) == 1 else ComposedEvent(tuple(parts))
