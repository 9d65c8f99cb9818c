"""Plaintext aggregation: the baseline every other aggregator is tested against.

The server asks each sampled client for its update and adds them. It therefore
*sees every individual update*, which is what gradient inversion exploits
(attacks-and-auditing.md §1); :meth:`PlaintextServer.observation` records them.

Two stages: ``request`` (server -> client) and ``upload`` (client -> server).
Uploads use the strict framing of :mod:`securefed.protocols.wire`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

import numpy as np

from .base import (
    AGGREGATORS,
    SERVER,
    AggregateResult,
    AggregationRound,
    Aggregator,
    ClientInput,
    Message,
    Party,
    ServerObservation,
    ServerParty,
)
from .errors import DecodeError, LocalProtocolError, RoundAbortedError, UnexpectedMessageError
from .wire import Reader, Writer, pack, unpack

PROTOCOL_ID = 1


class Kind(IntEnum):
    REQUEST = 1
    UPLOAD = 2


STAGES = ("request", "upload")


def encode_request(round_index: int, dim: int) -> bytes:
    return pack(PROTOCOL_ID, Kind.REQUEST, Writer().u64(round_index).u64(dim).getvalue())


def decode_request(data: bytes) -> tuple[int, int]:
    r = Reader(unpack(data, protocol=PROTOCOL_ID, kinds=frozenset({Kind.REQUEST})).body)
    out = (r.u64(), r.u64())
    r.done()
    return out


def encode_upload(round_index: int, vector: np.ndarray, weight: float) -> bytes:
    w = Writer().u64(round_index).f64(weight).array(np.asarray(vector, dtype=np.float32))
    return pack(PROTOCOL_ID, Kind.UPLOAD, w.getvalue())


def decode_upload(data: bytes, *, dim: int) -> tuple[int, np.ndarray, float]:
    r = Reader(unpack(data, protocol=PROTOCOL_ID, kinds=frozenset({Kind.UPLOAD}), max_bytes=64 + 4 * dim).body)
    round_index, weight = r.u64(), r.f64()
    vec = r.array(dtype="<f4", length=dim)
    r.done()
    if not np.isfinite(vec).all():
        raise DecodeError("upload contains NaN or Inf")
    if not (np.isfinite(weight) and weight >= 0):
        raise DecodeError(f"upload weight {weight} is not a finite non-negative number")
    return round_index, vec, weight


class PlaintextClient(Party):
    def __init__(self, client_id: int, round_index: int, data: ClientInput) -> None:
        self.party_id = client_id
        self._round = round_index
        self._input = data
        self._sent = False

    def receive(self, message: Message) -> list[Message]:
        if message.sender != SERVER or message.stage != "request" or self._sent:
            raise UnexpectedMessageError(f"client {self.party_id}: unexpected {message.stage!r} message")
        round_index, dim = decode_request(message.payload)
        if round_index != self._round or dim != self._input.vector.shape[0]:
            raise UnexpectedMessageError("request for another round or dimension")
        self._sent = True
        payload = encode_upload(self._round, self._input.vector, self._input.weight)
        return [Message(self.party_id, SERVER, "upload", payload)]


class PlaintextServer(ServerParty):
    party_id = SERVER

    def __init__(self, round_index: int, client_ids: tuple[int, ...], dim: int) -> None:
        self._round = round_index
        self._clients = client_ids
        self._dim = dim
        self._stage = "idle"
        self._updates: dict[int, np.ndarray] = {}
        self._weights: dict[int, float] = {}
        self._transcript: list[Message] = []
        self._result: AggregateResult | None = None

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def finished(self) -> bool:
        return self._result is not None

    def start(self) -> list[Message]:
        if self._stage != "idle":
            raise LocalProtocolError("round already started")
        self._stage = "upload"
        req = encode_request(self._round, self._dim)
        return [Message(SERVER, c, "request", req) for c in self._clients]

    def receive(self, message: Message) -> list[Message]:
        if self._stage != "upload" or message.stage != "upload":
            raise UnexpectedMessageError(f"server: {message.stage!r} message in stage {self._stage!r}")
        sender = message.sender
        if sender not in self._clients:
            raise UnexpectedMessageError(f"upload from unknown client {sender}", sender=sender)
        if sender in self._updates:
            raise UnexpectedMessageError(f"second upload from client {sender}", sender=sender)
        round_index, vec, weight = decode_upload(message.payload, dim=self._dim)
        if round_index != self._round:
            raise UnexpectedMessageError(f"upload for round {round_index} in round {self._round}", sender=sender)
        self._transcript.append(message)
        self._updates[sender] = vec
        self._weights[sender] = weight
        return []

    def end_stage(self) -> list[Message]:
        if self._stage != "upload":
            raise LocalProtocolError(f"no stage to end in {self._stage!r}")
        if not self._updates:
            self._stage = "aborted"
            raise RoundAbortedError("no client uploaded an update")
        ids = tuple(sorted(self._updates))
        total = np.zeros(self._dim, dtype=np.float64)
        for c in ids:
            total += self._weights[c] * self._updates[c].astype(np.float64)
        self._result = AggregateResult(
            total=total, total_weight=float(sum(self._weights[c] for c in ids)), contributors=ids
        )
        self._stage = "done"
        return []

    def result(self) -> AggregateResult:
        if self._result is None:
            raise RoundAbortedError(f"round not finished (stage {self._stage!r})")
        return self._result

    def observation(self) -> ServerObservation:
        res = self._result
        return ServerObservation(
            protocol=PlaintextAggregator.name,
            contributors=res.contributors if res else (),
            aggregate=res.total if res else None,
            total_weight=res.total_weight if res else None,
            individual_updates=dict(self._updates),
            individual_weights=dict(self._weights),
            transcript=tuple(self._transcript),
        )


class _PlaintextRound(AggregationRound):
    def __init__(self, round_index: int, inputs: Mapping[int, ClientInput]) -> None:
        dims = {v.vector.shape[0] for v in inputs.values()}
        if len(dims) != 1:
            raise LocalProtocolError(f"client inputs have different lengths: {sorted(dims)}")
        ids = tuple(sorted(inputs))
        self.server = PlaintextServer(round_index, ids, dims.pop())
        self.clients = {c: PlaintextClient(c, round_index, inputs[c]) for c in ids}
        self.others = {}

    def result(self) -> AggregateResult:
        assert isinstance(self.server, PlaintextServer)
        return self.server.result()


class PlaintextAggregator(Aggregator):
    """Sum of plaintext updates. The server sees each one."""

    name = "plaintext"
    stages = STAGES

    def new_round(self, round_index: int, inputs: Mapping[int, ClientInput]) -> AggregationRound:
        if not inputs:
            raise LocalProtocolError("a round needs at least one client input")
        return _PlaintextRound(round_index, inputs)


AGGREGATORS.register(PlaintextAggregator.name, PlaintextAggregator)
