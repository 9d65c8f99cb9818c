"""The sans-I/O aggregation interface every aggregator implements.

An aggregation protocol is a set of *parties* (the server, the sampled clients,
and for some protocols a separate key authority) that exchange byte messages.
No party touches a socket, a clock or a thread: a party consumes one
:class:`Message` and returns the messages it wants sent. A *transport* (the
in-process driver in :mod:`securefed.fl.transport`, or a network one) is the
only code that moves bytes; it also simulates client dropouts.

Rounds proceed in *stages*. The transport:

1. calls :meth:`ServerParty.start` and delivers what it returns;
2. delivers every queued message to its recipient, queueing the replies, until
   the queue is empty (all traffic goes through the server, as in a real
   deployment: clients never address each other directly);
3. calls :meth:`ServerParty.end_stage`, which returns the messages that open the
   next stage (or nothing once :attr:`ServerParty.finished` is true);
4. repeats until the server is finished, then reads
   :meth:`AggregationRound.result`.

A client that drops out at stage ``s`` neither receives nor sends any message
of stage ``s`` or later; each aggregator lists its stages in order in
:attr:`Aggregator.stages`.

What the server could read after the round is captured by
:meth:`ServerParty.observation`, which the attack layer turns into a
``ServerView``. Protocols know nothing about the federated loop or attacks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final

import numpy as np

from .errors import ConfigurationError, RemoteProtocolError

#: Party id of the aggregation server. Client ids are non-negative integers.
SERVER: Final = -1
#: Party id of a separate decryptor / key authority (HE ``key-authority`` role).
AUTHORITY: Final = -2


@dataclass(frozen=True)
class Message:
    """One message between two parties. ``payload`` is untrusted bytes."""

    sender: int
    recipient: int
    stage: str
    payload: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.payload, bytes):
            raise TypeError("Message.payload must be bytes")


@dataclass(frozen=True)
class ClientInput:
    """What one client contributes to a round.

    ``vector`` is the flat float32 update (already clipped or noised by the
    caller if DP asks for it). ``weight`` is the client's aggregation weight
    (e.g. its example count for weighted FedAvg, 1.0 for unweighted or DP).
    """

    vector: np.ndarray
    weight: float = 1.0

    def __post_init__(self) -> None:
        v = self.vector
        if not isinstance(v, np.ndarray) or v.ndim != 1:
            raise TypeError("ClientInput.vector must be a 1-D numpy array")
        if not np.isfinite(v).all():
            bad = int((~np.isfinite(v)).sum())
            raise ValueError(f"ClientInput.vector has {bad} NaN/Inf entries; refuse to aggregate it")
        if not (np.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"ClientInput.weight must be finite and >= 0, got {self.weight}")


@dataclass(frozen=True)
class AggregateResult:
    """The output of one aggregation round.

    Attributes:
        total: the sum of ``weight * vector`` over :attr:`contributors` (float64).
        total_weight: the sum of the contributors' weights.
        contributors: ids of the clients whose inputs are in the sum.
        measurements: protocol metrics (clipped entries, precision, ...), JSON-able.
    """

    total: np.ndarray
    total_weight: float
    contributors: tuple[int, ...]
    measurements: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerObservation:
    """Everything the aggregation server holds once a round is over.

    Exactly one of the per-client fields is populated, depending on the
    protocol: plaintext servers read ``individual_updates``; masking servers
    hold ``masked_updates`` (uniformly random on their own); HE servers hold
    ``ciphertexts``. ``aggregate`` is the sum the server learns (``None`` when
    it learns no plaintext at all, as with client-held HE keys).
    ``transcript`` is every message the server received, in order.
    """

    protocol: str
    contributors: tuple[int, ...]
    aggregate: np.ndarray | None
    total_weight: float | None
    individual_updates: Mapping[int, np.ndarray] | None = None
    individual_weights: Mapping[int, float] | None = None
    masked_updates: Mapping[int, np.ndarray] | None = None
    ciphertexts: Mapping[int, bytes] | None = None
    transcript: tuple[Message, ...] = ()


class Party(ABC):
    """A sans-I/O protocol participant."""

    party_id: int

    @abstractmethod
    def receive(self, message: Message) -> list[Message]:
        """Consume one message; return the messages to send in response.

        Raises:
            RemoteProtocolError: the message is invalid; the party's state is unchanged.
        """


class ServerParty(Party):
    """The aggregation server side of one round."""

    @abstractmethod
    def start(self) -> list[Message]:
        """Open the first stage."""

    @abstractmethod
    def end_stage(self) -> list[Message]:
        """Close the current stage (all surviving traffic delivered); open the next.

        Raises:
            RoundAbortedError: too few parties survive to continue.
        """

    @property
    @abstractmethod
    def stage(self) -> str:
        """The current stage's name."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """True once the round has produced its result."""

    @abstractmethod
    def observation(self) -> ServerObservation:
        """What this server holds (for the attack layer's ``ServerView``)."""


class AggregationRound(ABC):
    """The parties of one round, and where to read the result from."""

    server: ServerParty
    clients: Mapping[int, Party]
    #: Extra parties such as a key authority, keyed by their (negative) ids.
    others: Mapping[int, Party]

    def party(self, party_id: int) -> Party:
        if party_id == SERVER:
            return self.server
        if party_id in self.clients:
            return self.clients[party_id]
        if party_id in self.others:
            return self.others[party_id]
        raise RemoteProtocolError(f"message addressed to unknown party {party_id}")

    @abstractmethod
    def result(self) -> AggregateResult:
        """The round's output, read from the party that holds it.

        For plaintext and masking protocols that is the server. For HE with
        client-held keys it is the decrypting client: the server never sees it.

        Raises:
            RoundAbortedError: the round did not complete.
        """


class Aggregator(ABC):
    """A factory of aggregation rounds; one instance per run."""

    #: Registered name (the ``aggregation`` value in a run config).
    name: ClassVar[str]
    #: Stage names in protocol order (dropout simulation refers to these).
    stages: ClassVar[tuple[str, ...]]

    @abstractmethod
    def new_round(self, round_index: int, inputs: Mapping[int, ClientInput]) -> AggregationRound:
        """Create the parties of one round over the given clients' inputs."""


AggregatorFactory = Callable[..., Aggregator]


class AggregatorRegistry:
    """Name -> factory. An object, so tests can build their own."""

    def __init__(self) -> None:
        self._factories: dict[str, AggregatorFactory] = {}

    def register(self, name: str, factory: AggregatorFactory, *, replace: bool = False) -> None:
        if name in self._factories and not replace:
            raise ConfigurationError(f"aggregator {name!r} is already registered")
        self._factories[name] = factory

    def create(self, name: str, **options: object) -> Aggregator:
        try:
            factory = self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "none"
            raise ConfigurationError(f"unknown aggregation {name!r}; choose one of: {known}") from None
        return factory(**options)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._factories))


#: The default registry; each aggregator module registers itself on import
#: (see :mod:`securefed.protocols`).
AGGREGATORS = AggregatorRegistry()
