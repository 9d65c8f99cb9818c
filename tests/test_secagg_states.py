"""Exhaustive stage-transition tests: every (stage, message kind) pair, client and server.

A pair in the transition table is accepted and advances the party; every
other pair raises ``UnexpectedMessageError`` and leaves the party unchanged.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_secagg_harness import Stepper, exact_inputs, make

from securefed.protocols import SERVER, Message
from securefed.protocols.errors import LocalProtocolError, RoundAbortedError, UnexpectedMessageError
from securefed.protocols.secagg import (
    ClientStage,
    ServerStage,
    client_transitions,
    server_transitions,
)
from securefed.protocols.secagg.messages import STAGE_OF, Kind, peek_kind
from securefed.protocols.secagg.server import ACCEPTS

N, D = 6, 3


def _catalog() -> dict[Kind, Message]:
    """One well-formed message of every kind, from a separate authenticated round."""
    agg = make("secagg", authenticated=True, corrupt_fraction=0.0)
    s = Stepper(agg.new_round(99, exact_inputs(np.random.default_rng(0), N, D)))
    seen: dict[Kind, Message] = {}
    while not s.rnd.server.finished:
        for m in s.pending:
            seen.setdefault(peek_kind(m.payload), m)
        for m in s.stage():
            seen.setdefault(peek_kind(m.payload), m)
    assert set(seen) == set(Kind)
    return seen


CATALOG = _catalog()


def _stepper(authenticated: bool) -> Stepper:
    agg = make("secagg", authenticated=authenticated, corrupt_fraction=0.0)
    return Stepper(agg.new_round(3, exact_inputs(np.random.default_rng(1), N, D)))


def _client_at(authenticated: bool, stage: ClientStage) -> tuple[Stepper, Message | None]:
    """A round whose client 0 is in ``stage``; returns the pending server message for it, if any."""
    s = _stepper(authenticated)
    while s.rnd.clients[0].stage is not stage:
        s.stage()
    pending = next((m for m in s.pending if m.recipient == 0), None)
    return s, pending


def _client_cases() -> list[tuple[bool, ClientStage, Kind]]:
    """Every (variant, stage, kind) whose stage occurs in that variant's transition table."""
    out = []
    for authenticated in (False, True):
        table = client_transitions(authenticated)
        reachable = {s for s, _ in table} | set(table.values())
        out += [(authenticated, st, k) for st, k in itertools.product(ClientStage, Kind) if st in reachable]
    return out


def _server_cases() -> list[tuple[bool, ServerStage, Kind]]:
    out = []
    for authenticated in (False, True):
        nxt = server_transitions(authenticated)
        reachable = set(nxt) | set(nxt.values()) | {ServerStage.ABORTED}
        if not authenticated:
            reachable.discard(ServerStage.CONSISTENCY_CHECK)
        out += [(authenticated, st, k) for st, k in itertools.product(ServerStage, Kind) if st in reachable]
    return out


def test_the_case_lists_cover_every_stage() -> None:
    # Stages outside a variant are left out of the parametrizations below (not skipped);
    # every stage must still occur in at least one variant.
    assert {st for _, st, _ in _client_cases()} == set(ClientStage)
    assert {st for _, st, _ in _server_cases()} == set(ServerStage)


@pytest.mark.parametrize(("authenticated", "stage", "kind"), _client_cases())
def test_client_transition_table_is_exhaustive(authenticated: bool, stage: ClientStage, kind: Kind) -> None:
    table = client_transitions(authenticated)
    s, pending = _client_at(authenticated, stage)
    client = s.rnd.clients[0]
    if (stage, kind) in table:
        assert pending is not None and peek_kind(pending.payload) is kind
        client.receive(pending)
        assert client.stage is table[(stage, kind)]
    else:
        ref = CATALOG[kind]
        msg = Message(SERVER, 0, STAGE_OF[kind], ref.payload)
        with pytest.raises(UnexpectedMessageError):
            client.receive(msg)
        assert client.stage is stage


def _server_at(authenticated: bool, stage: ServerStage) -> Stepper:
    s = _stepper(authenticated) if stage is not ServerStage.IDLE else None
    if s is None:
        agg = make("secagg", authenticated=authenticated, corrupt_fraction=0.0)
        rnd = agg.new_round(3, exact_inputs(np.random.default_rng(1), N, D))
        st = Stepper.__new__(Stepper)
        st.rnd, st.pending = rnd, []
        return st
    if stage is ServerStage.ABORTED:
        with pytest.raises(RoundAbortedError):
            s.stage(skip=frozenset(range(N)))  # nobody advertises keys
        return s
    while s.rnd.server.server_stage is not stage:
        s.stage()
    return s


@pytest.mark.parametrize(("authenticated", "stage", "kind"), _server_cases())
def test_server_accepts_exactly_one_kind_per_stage(authenticated: bool, stage: ServerStage, kind: Kind) -> None:
    s = _server_at(authenticated, stage)
    server = s.rnd.server
    if ACCEPTS.get(stage) is kind:
        reply = next(m for m in s.client_replies() if peek_kind(m.payload) is kind)
        server.receive(reply)
        with pytest.raises(UnexpectedMessageError):
            server.receive(reply)  # the same message twice
    else:
        ref = CATALOG[kind]
        with pytest.raises(UnexpectedMessageError) as err:
            server.receive(Message(1, SERVER, STAGE_OF[kind], ref.payload))
        assert err.value.sender == 1
    assert server.server_stage is stage


def test_server_stage_order_and_misuse() -> None:
    for authenticated in (False, True):
        s = _stepper(authenticated)
        seen = [s.rnd.server.server_stage]
        with pytest.raises(LocalProtocolError):
            s.rnd.server.start()
        while not s.rnd.server.finished:
            s.stage()
            seen.append(s.rnd.server.server_stage)
        expect = [ServerStage.ADVERTISE_KEYS, ServerStage.SHARE_KEYS, ServerStage.MASKED_INPUT]
        expect += [ServerStage.CONSISTENCY_CHECK] if authenticated else []
        expect += [ServerStage.UNMASKING, ServerStage.DONE]
        assert seen == expect
        with pytest.raises(LocalProtocolError):
            s.rnd.server.end_stage()
    agg = make("secagg", corrupt_fraction=0.0)
    rnd = agg.new_round(0, exact_inputs(np.random.default_rng(0), N, D))
    with pytest.raises(LocalProtocolError):
        rnd.server.end_stage()
