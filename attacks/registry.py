"""Attack registry: name -> attack class, each taking only a :class:`ServerView`.

Every attack subclasses :class:`Attack`, declares its paper (``citation``) and
threat model, and a frozen ``Options`` dataclass that validates its knobs.
:meth:`Attack.run` is the one entry point: it refuses anything but a
``ServerView`` (a :class:`~securefed.attacks.errors.NotAServerViewError`, a
``TypeError``), reports ciphertext-only views as ``nothing-to-invert`` instead
of crashing, and calls :meth:`Attack.invert` on each vector worth inverting.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import AttackConfigError, NotAServerViewError
from .results import AttackResult, Reconstruction
from .target import ModelLoader, TargetModel
from .views import AuxiliaryData, ServerView, Target, ViewKind


@dataclass(frozen=True)
class NoOptions:
    """An attack without options."""


class AttackContext:
    """What :meth:`Attack.invert` may read: the view, declared aux data, the public model."""

    def __init__(self, view: ServerView, aux: AuxiliaryData, loader: ModelLoader | None) -> None:
        self.view = view
        self.aux = aux
        self._loader = loader
        self._target: TargetModel | None = None

    @property
    def public(self) -> Any:
        return self.view.public

    def model(self) -> TargetModel:
        """The public model with the global adapter applied (loaded once, on first use)."""
        if self._target is None:
            self._target = TargetModel.load(self.view.public, self._loader)
        return self._target


class Attack(ABC):
    """A gradient-inversion attack on what the server holds."""

    name: ClassVar[str]
    citation: ClassVar[str]
    threat_model: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, **options: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise AttackConfigError(
                f"unknown option {unknown[0]!r} for attack {self.name!r}; known: {sorted(fields) or 'none'}",
                key=f"attack.{unknown[0]}",
            )
        self.options = self.Options(**options)

    def run(
        self,
        view: ServerView,
        aux: AuxiliaryData | None = None,
        *,
        loader: ModelLoader | None = None,
        targets: str = "all",
    ) -> AttackResult:
        """Invert every target of ``view`` (clients' updates and/or the aggregate).

        Raises:
            NotAServerViewError: ``view`` is not a ``ServerView`` (e.g. a client's
                private state or a raw vector), or ``aux`` is not ``AuxiliaryData``.
            ViewMismatchError: the view's adapter spec does not fit the model.
        """
        if not isinstance(view, ServerView):
            raise NotAServerViewError(
                f"attack {self.name!r} accepts only a ServerView (what the server holds), "
                f"got {type(view).__name__}; build one with ServerView.from_observation()"
            )
        if aux is not None and not isinstance(aux, AuxiliaryData):
            raise NotAServerViewError(
                f"auxiliary data must be declared as AuxiliaryData, got {type(aux).__name__}"
            )
        t0 = time.perf_counter()
        ctx = AttackContext(view, aux or AuxiliaryData(), loader)
        notes: list[str] = []
        recs: list[Reconstruction] = []
        if view.kind is ViewKind.MASKED and targets == "clients":
            notes.append("masked vectors are uniformly random on their own: only the sum can be attacked")
        todo = view.targets(targets)
        if not todo:
            reason = {
                ViewKind.CIPHERTEXT: "the server holds only ciphertexts and no decrypted sum: nothing to invert",
                ViewKind.MASKED: "the server holds only masked vectors: nothing to invert",
            }.get(view.kind, f"the view has no {targets} vector to invert")
            recs.append(
                Reconstruction(target=targets, clients=view.contributors, status="nothing-to-invert", notes=(reason,))
            )
        for target in todo:
            t1 = time.perf_counter()
            rec = self.invert(target, ctx)
            recs.append(dataclasses.replace(rec, seconds=time.perf_counter() - t1))
        return AttackResult(
            attack=self.name,
            round_index=view.round_index,
            protocol=view.protocol,
            view_kind=view.kind.value,
            reconstructions=tuple(recs),
            seconds=time.perf_counter() - t0,
            notes=tuple(notes),
            options={k: v for k, v in dataclasses.asdict(self.options).items() if isinstance(v, str | int | float | bool) or v is None},
        )

    @abstractmethod
    def invert(self, target: Target, ctx: AttackContext) -> Reconstruction:
        """Recover what ``target`` reveals. Never raises for 'too hard': returns a status."""


class AttackRegistry:
    """Name -> attack class. An object, so tests can build their own."""

    def __init__(self) -> None:
        self._attacks: dict[str, type[Attack]] = {}

    def register(self, cls: type[Attack], *, replace: bool = False) -> type[Attack]:
        if cls.name in self._attacks and not replace:
            raise AttackConfigError(f"attack {cls.name!r} is already registered", key="attack.name")
        self._attacks[cls.name] = cls
        return cls

    def create(self, name: str, **options: Any) -> Attack:
        try:
            cls = self._attacks[name]
        except KeyError:
            known = ", ".join(sorted(self._attacks)) or "none"
            raise AttackConfigError(f"unknown attack {name!r}; choose one of: {known}", key="attack.name") from None
        return cls(**options)

    def get(self, name: str) -> type[Attack]:
        if name not in self._attacks:
            self.create(name)  # raises the helpful error
        return self._attacks[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._attacks))


#: The default registry; attack modules register themselves on import.
ATTACKS = AttackRegistry()


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add ``cls`` to :data:`ATTACKS`."""
    return ATTACKS.register(cls)
