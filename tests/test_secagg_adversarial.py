"""Misbehaving servers and clients: each case raises a typed error and never yields a wrong sum."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_secagg_harness import Stepper, exact_inputs, expected_total, make

from securefed.fl.transport import run_round
from securefed.protocols import SERVER, ClientInput, Message
from securefed.protocols.errors import (
    DecodeError,
    IntegrityError,
    RoundAbortedError,
    UnexpectedMessageError,
)
from securefed.protocols.secagg import (
    ClientStage,
    DuplicateKeyError,
    ShareReleaseRefusedError,
    TooFewPeersError,
)
from securefed.protocols.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    Limits,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
)

N, D = 8, 6
LIMITS = Limits(N, D + 2, 32)


def _round(authenticated: bool = False, name: str = "secagg", seed: int = 0,
           **opts: object) -> tuple[dict[int, ClientInput], Stepper]:
    rng = np.random.default_rng(seed)
    inputs = exact_inputs(rng, N, D)
    agg = make(name, corrupt_fraction=0.0, authenticated=authenticated, **opts)
    return inputs, Stepper(agg.new_round(4, inputs))


def _to_unmasking(s: Stepper, authenticated: bool) -> None:
    for _ in range(4 if authenticated else 3):
        s.stage()


def _pending_for(s: Stepper, client: int) -> Message:
    return next(m for m in s.pending if m.recipient == client)


def _with_payload(m: Message, payload: bytes) -> Message:
    return dataclasses.replace(m, payload=payload)


@pytest.mark.parametrize("authenticated", [False, True])
def test_server_asking_for_both_shares_of_a_peer_is_refused(authenticated: bool) -> None:
    inputs, s = _round(authenticated)
    _to_unmasking(s, authenticated)
    m = _pending_for(s, 0)
    req = UnmaskRequest.decode(m.payload, LIMITS)
    client = s.rnd.clients[0]
    # one message naming peer 5 both as survivor (seed share) and dropped (key share)
    both = dataclasses.replace(req, dropped=(5,))
    with pytest.raises(ShareReleaseRefusedError, match="both"):
        client.receive(_with_payload(m, both.encode()))
    assert client.stage is ClientStage.AWAIT_UNMASK
    # asking for its own key share
    own = dataclasses.replace(req, survivors=tuple(c for c in req.survivors if c != 0), dropped=(0,))
    with pytest.raises(ShareReleaseRefusedError):
        client.receive(_with_payload(m, own.encode()))
    # the honest request is answered, after which a second request (now naming 5 dropped) is refused
    client.receive(m)
    assert client.stage is ClientStage.DONE
    second = dataclasses.replace(req, survivors=tuple(c for c in req.survivors if c != 5), dropped=(5,))
    with pytest.raises(UnexpectedMessageError):
        client.receive(_with_payload(m, second.encode()))


def test_survivor_list_other_than_the_signed_one_is_refused() -> None:
    """Semi-malicious server: tells client 0 that 5 dropped after everyone signed 5 as survivor."""
    _, s = _round(True)
    _to_unmasking(s, True)
    m = _pending_for(s, 0)
    req = UnmaskRequest.decode(m.payload, LIMITS)
    forged = dataclasses.replace(req, survivors=tuple(c for c in req.survivors if c != 5), dropped=(5,))
    with pytest.raises(ShareReleaseRefusedError, match="signed"):
        s.rnd.clients[0].receive(_with_payload(m, forged.encode()))
    tampered_sig = dataclasses.replace(req, signatures=((req.signatures[0][0], bytes(64)),) + req.signatures[1:])
    with pytest.raises(IntegrityError):
        s.rnd.clients[0].receive(_with_payload(m, tampered_sig.encode()))
    few = dataclasses.replace(req, signatures=req.signatures[:1])
    with pytest.raises(TooFewPeersError):
        s.rnd.clients[0].receive(_with_payload(m, few.encode()))


@pytest.mark.parametrize("name", ["secagg", "secagg+"])
def test_tampered_share_ciphertext_excludes_the_peer_and_keeps_the_sum_exact(name: str) -> None:
    extra: dict[str, object] = {"k": 6} if name == "secagg+" else {}
    inputs, s = _round(False, name, 3, **extra)
    s.stage()  # advertise

    def flip(replies: list[Message]) -> list[Message]:
        out = []
        for r in replies:
            if r.sender == 3:
                msg = ShareKeys.decode(r.payload, LIMITS)
                es = msg.shares[0]
                bad = bytearray(es.ciphertext)
                bad[20] ^= 1
                shares = (EncryptedShare(es.peer, bytes(bad)), *msg.shares[1:])
                r = _with_payload(r, ShareKeys(msg.round_index, shares).encode())
            out.append(r)
        return out

    s.stage(mutate=flip)
    while not s.rnd.server.finished:
        s.stage()
    res = s.rnd.result()
    assert 3 not in res.contributors and len(res.contributors) == N - 1
    assert res.measurements["excluded_by_peers"] == 1
    np.testing.assert_array_equal(res.total, expected_total(inputs, res.contributors))


def test_duplicate_public_key_excludes_the_copier_and_clients_refuse_duplicates() -> None:
    inputs, s = _round(seed=5)
    replies = s.client_replies()
    keys = {r.sender: r for r in replies}
    copied = AdvertiseKeys.decode(keys[1].payload, LIMITS)
    mine = AdvertiseKeys.decode(keys[2].payload, LIMITS)
    forged = dataclasses.replace(mine, mask_public=copied.mask_public)
    s.rnd.server.receive(keys[1])
    with pytest.raises(DuplicateKeyError) as err:
        s.rnd.server.receive(_with_payload(keys[2], forged.encode()))
    assert err.value.sender == 2
    for c, r in keys.items():
        if c not in (1, 2):
            s.rnd.server.receive(r)
    s.end()
    assert 2 not in {m.recipient for m in s.pending}
    # a malicious server forwarding a duplicated key is refused by the client
    m = _pending_for(s, 0)
    req = ShareKeysRequest.decode(m.payload, LIMITS)
    p1 = next(p for p in req.peers if p.client == 1)
    dup = dataclasses.replace(req, peers=tuple(dataclasses.replace(p, enc_public=p1.mask_public) if p.client == 3 else p
                                               for p in req.peers))
    with pytest.raises(DuplicateKeyError):
        s.rnd.clients[0].receive(_with_payload(m, dup.encode()))
    s.stage()
    while not s.rnd.server.finished:
        s.stage()
    res = s.rnd.result()
    assert 2 not in res.contributors
    np.testing.assert_array_equal(res.total, expected_total(inputs, res.contributors))


def test_replayed_out_of_stage_and_other_round_messages_are_refused() -> None:
    rng = np.random.default_rng(9)
    inputs = exact_inputs(rng, N, D)
    agg = make("secagg", corrupt_fraction=0.0)
    old = Stepper(agg.new_round(1, inputs))
    old_keys = old.client_replies()
    s = Stepper(agg.new_round(2, inputs))
    replies = s.client_replies()
    with pytest.raises(UnexpectedMessageError, match="round"):
        s.rnd.server.receive(old_keys[0])  # a round-1 message replayed into round 2
    s.rnd.server.receive(replies[0])
    with pytest.raises(UnexpectedMessageError) as err:
        s.rnd.server.receive(replies[0])  # replay within the stage
    assert err.value.sender == replies[0].sender
    for r in replies[1:]:
        s.rnd.server.receive(r)
    s.end()
    share_replies = s.client_replies()
    with pytest.raises(UnexpectedMessageError):
        s.rnd.server.receive(replies[1])  # AdvertiseKeys in the share_keys stage
    s.to_server(share_replies)
    s.end()
    # a server message replayed to a client after it moved on
    adv = old.pending[0]
    with pytest.raises(UnexpectedMessageError):
        old.rnd.clients[adv.recipient].receive(adv)
        old.rnd.clients[adv.recipient].receive(adv)


def test_tampered_unmask_share_aborts_instead_of_returning_a_wrong_sum() -> None:
    _, s = _round(seed=2)
    _to_unmasking(s, False)
    replies = s.client_replies()
    r0 = next(r for r in replies if r.sender == 0)
    resp = UnmaskResponse.decode(r0.payload, LIMITS)
    (peer, share), *rest = resp.seed_shares
    bad = dataclasses.replace(resp, seed_shares=((peer, (share + 1) % (2**256)), *rest))
    s.to_server([_with_payload(r0, bad.encode()) if r is r0 else r for r in replies])
    with pytest.raises(RoundAbortedError, match="commitment|inconsistent"):
        s.end()
    with pytest.raises(RoundAbortedError):
        s.rnd.result()


def test_tampered_key_share_of_a_dropped_client_aborts() -> None:
    _, s = _round(seed=4)
    s.stage()
    s.stage()
    s.stage(skip=frozenset({6}))  # client 6 shared its keys, then dropped
    replies = s.client_replies()
    r0 = next(r for r in replies if r.sender == 0)
    resp = UnmaskResponse.decode(r0.payload, LIMITS)
    assert [p for p, _ in resp.key_shares] == [6]
    bad = dataclasses.replace(resp, key_shares=((6, (resp.key_shares[0][1] + 7) % (2**256)),))
    s.to_server([_with_payload(r0, bad.encode()) if r is r0 else r for r in replies])
    with pytest.raises(RoundAbortedError, match="masking key|inconsistent"):
        s.end()


def test_forged_signatures_exclude_the_sender() -> None:
    _, s = _round(True, seed=6)
    replies = s.client_replies()
    r = replies[3]
    msg = AdvertiseKeys.decode(r.payload, LIMITS)
    forged = dataclasses.replace(msg, signature=bytes(64))
    with pytest.raises(IntegrityError) as err:
        s.rnd.server.receive(_with_payload(r, forged.encode()))
    assert err.value.sender == r.sender
    unsigned = dataclasses.replace(msg, signature=b"")
    with pytest.raises(DecodeError):
        s.rnd.server.receive(_with_payload(r, unsigned.encode()))


class _Garbler:
    """Wraps a client and truncates its masked input (a peer sending garbage)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.party_id = inner.party_id

    def receive(self, message: Message) -> list[Message]:
        out = self.inner.receive(message)
        return [_with_payload(m, m.payload[:-3]) if m.stage == "masked_input" else m for m in out]


def test_transport_excludes_a_client_sending_garbage_and_the_round_completes() -> None:
    rng = np.random.default_rng(8)
    inputs = exact_inputs(rng, N, D)
    agg = make("secagg+", corrupt_fraction=0.0, k=4)
    rnd = agg.new_round(0, inputs)
    rnd.clients = {**rnd.clients, 5: _Garbler(rnd.clients[5])}
    out = run_round(rnd, agg.stages)
    assert 5 in out.excluded and "DecodeError" in out.excluded[5]
    assert 5 not in out.result.contributors
    np.testing.assert_array_equal(out.result.total, expected_total(inputs, out.result.contributors))


def test_client_rejects_messages_not_from_the_server() -> None:
    _, s = _round()
    m = s.pending[0]
    with pytest.raises(UnexpectedMessageError):
        s.rnd.clients[m.recipient].receive(dataclasses.replace(m, sender=1))
    with pytest.raises(UnexpectedMessageError):
        s.rnd.clients[m.recipient].receive(dataclasses.replace(m, stage="unmasking"))
    assert SERVER == m.sender


def test_small_order_public_key_excludes_the_advertiser() -> None:
    _, s = _round(seed=7)
    replies = s.client_replies()
    r = replies[2]
    msg = AdvertiseKeys.decode(r.payload, LIMITS)
    for bad_key in (bytes(32), (1).to_bytes(32, "little")):  # u = 0 and u = 1 have small order
        with pytest.raises(DecodeError) as err:
            s.rnd.server.receive(_with_payload(r, dataclasses.replace(msg, mask_public=bad_key).encode()))
        assert err.value.sender == r.sender
