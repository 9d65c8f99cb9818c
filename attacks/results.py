"""What an attack returns: one :class:`Reconstruction` per target, in an :class:`AttackResult`.

Results are explicit about failure. ``status`` says whether anything could be
inverted at all (``nothing-to-invert`` for ciphertexts and masked vectors,
``unresolvable`` when a batch holds more tokens than the method can separate,
``not-applicable`` when the view lacks the tensors the attack reads), and
``notes`` say why, so a zero in a table is never a silent failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .views import Target

Status = Literal["recovered", "partial", "nothing-to-invert", "unresolvable", "not-applicable"]
Diagnostic = float | int | str | bool


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered from one target (a client's update or an aggregate).

    Attributes:
        target: ``"client 3"`` or ``"aggregate"``.
        clients: the clients whose data the target mixes.
        status: see the module docstring.
        sequences: recovered token sequences, in no particular order.
        texts: the decoded private text of each sequence (public template stripped).
        exact: per sequence, whether the attack *claims* it exact (e.g. DAGER:
            every token passed every span test).
        tokens: a recovered bag of tokens (order unknown), for token-level attacks.
        labels: recovered labels / next tokens.
        features: recovered input vectors of linear layers, by layer name.
        notes: human-readable reasons and caveats.
        diagnostics: numbers the attack measured on the way (ranks, thresholds, ...).
        seconds: wall time spent on this target.
    """

    target: str
    clients: tuple[int, ...]
    status: Status
    sequences: tuple[tuple[int, ...], ...] = ()
    texts: tuple[str, ...] = ()
    exact: tuple[bool, ...] = ()
    tokens: tuple[int, ...] = ()
    labels: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    diagnostics: Mapping[str, Diagnostic] = field(default_factory=dict)
    features: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "diagnostics", MappingProxyType(dict(self.diagnostics)))
        object.__setattr__(self, "features", MappingProxyType({k: tuple(v) for k, v in self.features.items()}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "clients": list(self.clients),
            "status": self.status,
            "texts": list(self.texts),
            "sequences": [list(s) for s in self.sequences],
            "exact": list(self.exact),
            "tokens": list(self.tokens),
            "labels": list(self.labels),
            "notes": list(self.notes),
            "diagnostics": dict(self.diagnostics),
            "features": {k: list(v) for k, v in self.features.items()},
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class AttackResult:
    """All reconstructions of one attack on one :class:`~securefed.attacks.views.ServerView`."""

    attack: str
    round_index: int
    protocol: str
    view_kind: str
    reconstructions: tuple[Reconstruction, ...]
    seconds: float
    notes: tuple[str, ...] = ()
    options: Mapping[str, Diagnostic | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "round": self.round_index,
            "protocol": self.protocol,
            "view_kind": self.view_kind,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "options": dict(self.options),
            "reconstructions": [r.to_dict() for r in self.reconstructions],
        }


def reconstruction(target: Target, status: Status, **fields: Any) -> Reconstruction:
    """A :class:`Reconstruction` of ``target`` (label and clients filled in)."""
    return Reconstruction(target=target.label, clients=target.clients, status=status, **fields)
