"""In-process transport: the only code that moves protocol messages.

:func:`run_round` drives one :class:`~securefed.protocols.base.AggregationRound`
to completion in memory, counting bytes per party and simulating client
dropouts at a named protocol stage (a dropped client neither receives nor sends
anything of that stage or later, like a device that lost its connection).

A remote peer's protocol violation (:class:`RemoteProtocolError`) from a client
excludes that client from the rest of the round, as a real server would do to a
peer that sent garbage; the protocol then treats it like a dropout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from securefed.protocols.base import (
    SERVER,
    AggregateResult,
    AggregationRound,
    Message,
    ServerObservation,
)
from securefed.protocols.errors import LocalProtocolError, RemoteProtocolError

#: Stage name meaning "dropped before the protocol started" (never trained or uploaded).
BEFORE_START = "start"


@dataclass
class Traffic:
    """Bytes moved in one round, per client, in each direction."""

    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    messages: int = 0

    def record(self, msg: Message) -> None:
        self.messages += 1
        if msg.recipient == SERVER and msg.sender >= 0:
            self.up[msg.sender] = self.up.get(msg.sender, 0) + len(msg.payload)
        elif msg.sender == SERVER and msg.recipient >= 0:
            self.down[msg.recipient] = self.down.get(msg.recipient, 0) + len(msg.payload)


@dataclass(frozen=True)
class RoundOutcome:
    result: AggregateResult
    observation: ServerObservation
    traffic: Traffic
    dropped: Mapping[int, str]
    excluded: Mapping[int, str]


def run_round(
    rnd: AggregationRound,
    stages: tuple[str, ...],
    dropouts: Mapping[int, str] | None = None,
    *,
    max_messages: int = 10_000_000,
) -> RoundOutcome:
    """Deliver every message of ``rnd`` until the server finishes.

    Args:
        rnd: the round's parties.
        stages: the aggregator's stage names, in protocol order.
        dropouts: client id -> stage name at which that client goes silent.
        max_messages: a bound that turns a protocol bug into an error, not a hang.

    Raises:
        RoundAbortedError: the protocol could not complete (e.g. too few survivors).
        LocalProtocolError: a dropout names an unknown stage.
    """
    order = {name: i for i, name in enumerate(stages)}
    drop_at: dict[int, int] = {}
    for cid, stage in (dropouts or {}).items():
        if stage == BEFORE_START:
            drop_at[cid] = -1
        elif stage in order:
            drop_at[cid] = order[stage]
        else:
            raise LocalProtocolError(f"dropout stage {stage!r} is not one of {(BEFORE_START, *stages)}")
    excluded: dict[int, str] = {}

    def silent(party: int, stage: str) -> bool:
        if party < 0:
            return False
        if party in excluded:
            return True
        at = drop_at.get(party)
        return at is not None and order.get(stage, len(order)) >= at

    traffic = Traffic()
    queue: deque[Message] = deque(rnd.server.start())
    delivered = 0
    while True:
        while queue:
            msg = queue.popleft()
            delivered += 1
            if delivered > max_messages:
                raise LocalProtocolError(f"more than {max_messages} messages in one round: protocol loop?")
            if silent(msg.sender, msg.stage) or silent(msg.recipient, msg.stage):
                continue
            traffic.record(msg)
            try:
                replies = rnd.party(msg.recipient).receive(msg)
            except RemoteProtocolError as err:
                culprit = err.sender if err.sender is not None else msg.sender
                if culprit >= 0:
                    excluded[culprit] = f"{type(err).__name__}: {err}"
                    continue
                raise
            queue.extend(replies)
        if rnd.server.finished:
            break
        queue.extend(rnd.server.end_stage())
        if rnd.server.finished and not queue:
            break
    dropped = {c: s for c, s in (dropouts or {}).items() if c in rnd.clients}
    return RoundOutcome(
        result=rnd.result(),
        observation=rnd.server.observation(),
        traffic=traffic,
        dropped=dropped,
        excluded=excluded,
    )
