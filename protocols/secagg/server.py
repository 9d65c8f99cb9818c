"""The SecAgg / SecAgg+ server: a sans-I/O state machine.

Stages (:class:`ServerStage`) advance only in :meth:`SecAggServer.end_stage`,
along :func:`server_transitions`; in each stage the server accepts exactly one
message kind (:data:`ACCEPTS`) from exactly the clients that completed the
previous stage, once each. Any other message raises a
:class:`~securefed.protocols.errors.RemoteProtocolError` naming the sender and
leaves the server unchanged, so a transport excludes that client and the
protocol treats it as a dropout.

Per-case handling of bad input (docs/secure-aggregation.md has the table):

* malformed, truncated, oversized, replayed, out-of-stage or wrong-round
  message: the sender is excluded (typed error with ``sender``);
* a public key already advertised by another client: the later advertiser is
  excluded (:class:`.errors.DuplicateKeyError`);
* a bad signature (authenticated variant): the signer is excluded;
* a bundle a client could not authenticate: the client reports the peer in
  ``MaskedInput.rejected`` and the server drops that peer's masked input,
  recovering its masking key instead (it is treated as a dropout);
* shares that reconstruct a seed not matching its SHA-256 commitment, or a key
  not matching the advertised public key: the round aborts
  (:class:`~securefed.protocols.errors.RoundAbortedError`), it never returns a
  wrong sum;
* fewer than ``t`` live share holders for any client still needed: the round
  aborts *before* the server asks for anything more, so an abort reveals
  nothing beyond what honest clients had already sent.

At the end of every stage the server checks that each client it will still
need has at least ``t`` live holders of its shares (Bonawitz et al. 2017 abort
when survivors fall below ``t``; SecAgg+ applies the rule per neighbourhood).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from enum import Enum

import numpy as np

from ..base import SERVER, AggregateResult, Message, ServerObservation, ServerParty
from ..errors import (
    DecodeError,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundAbortedError,
    UnexpectedMessageError,
)
from ..primitives import kex, shamir, sign
from .config import TAIL_ENTRIES, SecAggConfig, Stopwatch
from .errors import DuplicateKeyError
from .keys import (
    advertise_message,
    consistency_message,
    mask_context,
    pair_negated,
    seed_commitment,
)
from .masking import MaskStream, apply_masks, sum_into
from .messages import (
    STAGE_OF,
    AdvertiseKeys,
    AdvertiseRequest,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    Kind,
    Limits,
    MaskedInput,
    MaskedInputRequest,
    PeerKeys,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    peek_kind,
)
from .params import GraphParameters, NeighbourGraph


class ServerStage(Enum):
    IDLE = "idle"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


#: The one client message kind each collecting stage accepts.
ACCEPTS: dict[ServerStage, Kind] = {
    ServerStage.ADVERTISE_KEYS: Kind.ADVERTISE_KEYS,
    ServerStage.SHARE_KEYS: Kind.SHARE_KEYS,
    ServerStage.MASKED_INPUT: Kind.MASKED_INPUT,
    ServerStage.CONSISTENCY_CHECK: Kind.CONSISTENCY_SIGNATURE,
    ServerStage.UNMASKING: Kind.UNMASK_RESPONSE,
}


def server_transitions(authenticated: bool) -> dict[ServerStage, ServerStage]:
    """Stage -> next stage taken by :meth:`SecAggServer.start` / :meth:`SecAggServer.end_stage`."""
    return {
        ServerStage.IDLE: ServerStage.ADVERTISE_KEYS,
        ServerStage.ADVERTISE_KEYS: ServerStage.SHARE_KEYS,
        ServerStage.SHARE_KEYS: ServerStage.MASKED_INPUT,
        ServerStage.MASKED_INPUT: ServerStage.CONSISTENCY_CHECK if authenticated else ServerStage.UNMASKING,
        ServerStage.CONSISTENCY_CHECK: ServerStage.UNMASKING,
        ServerStage.UNMASKING: ServerStage.DONE,
    }


class SecAggServer(ServerParty):
    """The server of one round over ``clients`` whose updates have ``dim`` entries."""

    party_id = SERVER

    def __init__(
        self,
        round_index: int,
        clients: tuple[int, ...],
        dim: int,
        config: SecAggConfig,
        *,
        directory: Mapping[int, bytes] | None = None,
    ) -> None:
        if config.authenticated and directory is None:
            raise ValueError("the authenticated variant needs the PKI directory")
        self.timings = Stopwatch()
        self._round = round_index
        self._clients = tuple(sorted(clients))
        self._dim = dim
        self._cfg = config
        self._directory = dict(directory or {})
        self._params: GraphParameters = config.parameters(len(self._clients))
        self._t = self._params.threshold
        self._graph = NeighbourGraph(self._clients, self._params.k, os.urandom(32))
        self._limits = Limits(len(self._clients), dim + TAIL_ENTRIES, config.encoder.modulus_bits)
        self._next = server_transitions(config.authenticated)
        self._stage = ServerStage.IDLE
        self._handlers: dict[Kind, Callable[[int, bytes], None]] = {
            Kind.ADVERTISE_KEYS: self._on_keys,
            Kind.SHARE_KEYS: self._on_shares,
            Kind.MASKED_INPUT: self._on_masked,
            Kind.CONSISTENCY_SIGNATURE: self._on_signature,
            Kind.UNMASK_RESPONSE: self._on_unmask,
        }
        self._transcript: list[Message] = []
        self._keys: dict[int, AdvertiseKeys] = {}
        self._seen_keys: set[bytes] = set()
        self._shares: dict[int, ShareKeys] = {}
        self._forwarded: dict[int, frozenset[int]] = {}
        self._masked: dict[int, MaskedInput] = {}
        self._survivors: tuple[int, ...] = ()
        self._masked_with: dict[int, frozenset[int]] = {}
        self._needed_keys: frozenset[int] = frozenset()
        self._excluded: frozenset[int] = frozenset()
        self._signatures: dict[int, bytes] = {}
        self._asked: dict[int, UnmaskRequest] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._result: AggregateResult | None = None
        self._aggregate: np.ndarray | None = None

    # -- ServerParty API -------------------------------------------------------

    @property
    def stage(self) -> str:
        return self._stage.value

    @property
    def server_stage(self) -> ServerStage:
        return self._stage

    @property
    def parameters(self) -> GraphParameters:
        return self._params

    @property
    def graph(self) -> NeighbourGraph:
        return self._graph

    @property
    def finished(self) -> bool:
        return self._stage is ServerStage.DONE

    def start(self) -> list[Message]:
        if self._stage is not ServerStage.IDLE:
            raise LocalProtocolError(f"round already started (stage {self._stage.value})")
        req = AdvertiseRequest(
            self._round,
            self._clients,
            self._params.k,
            self._t,
            self._limits.length,
            self._cfg.encoder.modulus_bits,
            self._graph.seed,
        ).encode()
        self._stage = self._next[ServerStage.IDLE]
        return [Message(SERVER, c, STAGE_OF[Kind.ADVERTISE_REQUEST], req) for c in self._clients]

    def receive(self, message: Message) -> list[Message]:
        sender = message.sender
        kind_expected = ACCEPTS.get(self._stage)
        if kind_expected is None:
            raise UnexpectedMessageError(f"server: no message expected in stage {self._stage.value}", sender=sender)
        try:
            kind = peek_kind(message.payload)
        except DecodeError as err:
            err.sender = sender
            raise
        if kind is not kind_expected or message.stage != STAGE_OF[kind]:
            raise UnexpectedMessageError(
                f"server: {kind.name} (stage label {message.stage!r}) in stage {self._stage.value}", sender=sender
            )
        if sender not in self._expected_senders():
            raise UnexpectedMessageError(
                f"server: client {sender} is not expected to send in stage {self._stage.value}", sender=sender
            )
        try:
            self._handlers[kind](sender, message.payload)
        except RemoteProtocolError as err:
            if err.sender is None:
                err.sender = sender
            raise
        self._transcript.append(message)
        return []

    def _expected_senders(self) -> set[int] | frozenset[int]:
        s = self._stage
        if s is ServerStage.ADVERTISE_KEYS:
            return set(self._clients) - set(self._keys)
        if s is ServerStage.SHARE_KEYS:
            return set(self._keys) - set(self._shares)
        if s is ServerStage.MASKED_INPUT:
            return set(self._shares) - set(self._masked)
        if s is ServerStage.CONSISTENCY_CHECK:
            return set(self._survivors) - set(self._signatures)
        if s is ServerStage.UNMASKING:
            return set(self._asked) - set(self._responses)
        return set()

    def _check_round(self, round_index: int, sender: int) -> None:
        if round_index != self._round:
            raise UnexpectedMessageError(f"message for round {round_index} in round {self._round}", sender=sender)

    def end_stage(self) -> list[Message]:
        handlers = {
            ServerStage.ADVERTISE_KEYS: self._end_keys,
            ServerStage.SHARE_KEYS: self._end_shares,
            ServerStage.MASKED_INPUT: self._end_masked,
            ServerStage.CONSISTENCY_CHECK: self._end_consistency,
            ServerStage.UNMASKING: self._end_unmask,
        }
        handler = handlers.get(self._stage)
        if handler is None:
            raise LocalProtocolError(f"no stage to end in {self._stage.value}")
        try:
            out = handler()
        except RoundAbortedError:
            self._stage = ServerStage.ABORTED
            raise
        self._stage = self._next[self._stage]
        return out

    def _abort(self, why: str) -> RoundAbortedError:
        return RoundAbortedError(f"round {self._round} aborted in stage {self._stage.value}: {why}")

    def _require_holders(self, live: set[int], needed: dict[int, set[int]], what: str) -> None:
        for client, holders in needed.items():
            have = len(holders & live)
            if have < self._t:
                raise self._abort(f"{what} of client {client}: {have} live share holders, threshold {self._t}")

    # -- AdvertiseKeys -----------------------------------------------------------

    def _on_keys(self, sender: int, payload: bytes) -> None:
        msg = AdvertiseKeys.decode(payload, self._limits)
        self._check_round(msg.round_index, sender)
        if self._cfg.authenticated:
            if sender not in self._directory:
                raise IntegrityError(f"client {sender} has no key in the PKI directory", sender=sender)
            signed = advertise_message(
                self._cfg.protocol, self._round, sender, msg.enc_public, msg.mask_public, msg.commitment
            )
            sign.verify(self._directory[sender], signed, msg.signature)
        elif msg.signature:
            raise DecodeError("unexpected signature in the unauthenticated variant", sender=sender)
        if msg.enc_public == msg.mask_public or {msg.enc_public, msg.mask_public} & self._seen_keys:
            raise DuplicateKeyError(f"client {sender} advertised a public key that is already in use", sender=sender)
        kex.check_public(msg.enc_public)
        kex.check_public(msg.mask_public)
        self._keys[sender] = msg
        self._seen_keys |= {msg.enc_public, msg.mask_public}

    def _end_keys(self) -> list[Message]:
        live = set(self._keys)
        if not live:
            raise self._abort("no client advertised keys")
        g = self._graph
        self._require_holders(live, {c: set(g.holders(c)) for c in live}, "neighbourhood")
        out = []
        for c in sorted(live):
            peers = tuple(
                PeerKeys(j, k.enc_public, k.mask_public, k.commitment, k.signature)
                for j in sorted(g.neighbours(c) & live)
                for k in (self._keys[j],)
            )
            out.append(Message(SERVER, c, STAGE_OF[Kind.SHARE_KEYS_REQUEST], ShareKeysRequest(self._round, peers).encode()))
        return out

    # -- ShareKeys -----------------------------------------------------------------

    def _on_shares(self, sender: int, payload: bytes) -> None:
        msg = ShareKeys.decode(payload, self._limits)
        self._check_round(msg.round_index, sender)
        expect = self._graph.neighbours(sender) & set(self._keys)
        got = {s.peer for s in msg.shares}
        if got != expect:
            raise UnexpectedMessageError(
                f"client {sender} sent bundles for {sorted(got)}, expected its live neighbours {sorted(expect)}",
                sender=sender,
            )
        self._shares[sender] = msg

    def _end_shares(self) -> list[Message]:
        live = set(self._shares)
        if not live:
            raise self._abort("no client shared its keys")
        g = self._graph
        self._require_holders(live, {c: set(g.holders(c)) for c in live}, "neighbourhood")
        inbox: dict[int, list[EncryptedShare]] = {c: [] for c in live}
        for sender in sorted(live):
            for es in self._shares[sender].shares:
                if es.peer in inbox:
                    inbox[es.peer].append(EncryptedShare(sender, es.ciphertext))
        out = []
        for c in sorted(live):
            items = tuple(sorted(inbox[c], key=lambda e: e.peer))
            self._forwarded[c] = frozenset(e.peer for e in items)
            payload = MaskedInputRequest(self._round, items).encode()
            out.append(Message(SERVER, c, STAGE_OF[Kind.MASKED_INPUT_REQUEST], payload))
        return out

    # -- MaskedInputCollection --------------------------------------------------------

    def _on_masked(self, sender: int, payload: bytes) -> None:
        msg = MaskedInput.decode(payload, self._limits)
        self._check_round(msg.round_index, sender)
        stray = set(msg.rejected) - self._forwarded[sender]
        if stray:
            raise UnexpectedMessageError(f"client {sender} rejected bundles it never received: {sorted(stray)}", sender=sender)
        self._masked[sender] = msg

    def _seed_holders(self, live: set[int]) -> dict[int, set[int]]:
        """Survivor -> the live clients holding a valid share of its self-mask seed."""
        out = {i: {i} & live for i in self._survivors}
        for v in live:
            for i in self._masked_with.get(v, frozenset()):
                if i in out:
                    out[i].add(v)
        return out

    def _key_holders(self, live: set[int]) -> dict[int, set[int]]:
        """Needed dropped client -> the live clients holding a valid share of its masking key."""
        out: dict[int, set[int]] = {j: set() for j in self._needed_keys}
        for v in live:
            for j in self._masked_with.get(v, frozenset()):
                if j in out:
                    out[j].add(v)
        return out

    def _end_masked(self) -> list[Message]:
        uploaded = set(self._masked)
        # A peer whose bundle a survivor could not authenticate is excluded: the
        # survivor did not mask with it, so its own masks cannot cancel.
        excluded = {j for i in uploaded for j in self._masked[i].rejected}
        survivors = uploaded - excluded
        if not survivors:
            raise self._abort("no masked input to aggregate")
        masked_with = {i: self._forwarded[i] - set(self._masked[i].rejected) for i in survivors}
        needed = {j for i in survivors for j in masked_with[i]} - survivors
        g = self._graph
        self._require_holders(survivors, {i: set(g.holders(i)) for i in survivors}, "neighbourhood")
        # commit
        self._survivors = tuple(sorted(survivors))
        self._excluded = frozenset(excluded & uploaded)
        self._masked_with = masked_with
        self._needed_keys = frozenset(needed)
        self._require_holders(survivors, self._seed_holders(survivors), "self-mask seed")
        self._require_holders(survivors, self._key_holders(survivors), "masking key")
        if self._cfg.authenticated:
            req = ConsistencyRequest(self._round, self._survivors).encode()
            return [Message(SERVER, c, STAGE_OF[Kind.CONSISTENCY_REQUEST], req) for c in self._survivors]
        return self._unmask_requests(set(self._survivors))

    # -- ConsistencyCheck ------------------------------------------------------------

    def _on_signature(self, sender: int, payload: bytes) -> None:
        msg = ConsistencySignature.decode(payload, self._limits)
        self._check_round(msg.round_index, sender)
        signed = consistency_message(self._cfg.protocol, self._round, self._survivors)
        sign.verify(self._directory[sender], signed, msg.signature)
        self._signatures[sender] = msg.signature

    def _end_consistency(self) -> list[Message]:
        live = set(self._signatures)
        g = self._graph
        self._require_holders(live, {v: set(g.holders(v)) for v in live}, "consistency signatures")
        self._require_holders(live, self._seed_holders(live), "self-mask seed")
        self._require_holders(live, self._key_holders(live), "masking key")
        return self._unmask_requests(live)

    def _unmask_requests(self, ask: set[int]) -> list[Message]:
        survivors = set(self._survivors)
        out = []
        for v in sorted(ask):
            dropped = tuple(sorted(self._masked_with[v] - survivors))
            sigs: tuple[tuple[int, bytes], ...] = ()
            if self._cfg.authenticated:
                sigs = tuple((s, self._signatures[s]) for s in sorted(self._graph.holders(v) & set(self._signatures)))
            req = UnmaskRequest(self._round, self._survivors, dropped, sigs)
            self._asked[v] = req
            out.append(Message(SERVER, v, STAGE_OF[Kind.UNMASK_REQUEST], req.encode()))
        return out

    # -- Unmasking ---------------------------------------------------------------------

    def _on_unmask(self, sender: int, payload: bytes) -> None:
        msg = UnmaskResponse.decode(payload, self._limits)
        self._check_round(msg.round_index, sender)
        req = self._asked[sender]
        want_seeds = (self._masked_with[sender] | {sender}) & set(req.survivors)
        if {p for p, _ in msg.seed_shares} != want_seeds or tuple(p for p, _ in msg.key_shares) != req.dropped:
            raise UnexpectedMessageError(f"client {sender} answered with shares other than those asked for", sender=sender)
        self._responses[sender] = msg

    def _end_unmask(self) -> list[Message]:
        live = set(self._responses)
        self._require_holders(live, self._seed_holders(live), "self-mask seed")
        self._require_holders(live, self._key_holders(live), "masking key")
        seed_shares: dict[int, dict[int, int]] = {i: {} for i in self._survivors}
        key_shares: dict[int, dict[int, int]] = {j: {} for j in self._needed_keys}
        for v in sorted(live):
            r = self._responses[v]
            for i, share in r.seed_shares:
                seed_shares[i][v + 1] = share
            for j, share in r.key_shares:
                if j in key_shares:
                    key_shares[j][v + 1] = share
        protocol = self._cfg.protocol
        streams: list[MaskStream] = []
        with self.timings("shamir"):
            for i in self._survivors:
                seed = self._reconstruct(seed_shares[i], f"self-mask seed of client {i}")
                if seed_commitment(protocol, self._round, i, seed) != self._keys[i].commitment:
                    raise self._abort(f"the reconstructed self-mask seed of client {i} fails its commitment")
                streams.append(MaskStream(seed, negate=True))
            dropped_keys = {}
            for j in sorted(self._needed_keys):
                raw = self._reconstruct(key_shares[j], f"masking key of client {j}")
                try:
                    sk = kex.private_from_bytes(raw)
                except (DecodeError, ValueError) as err:
                    raise self._abort(f"reconstructed masking key of client {j} is invalid: {err}") from err
                if kex.public_bytes(sk) != self._keys[j].mask_public:
                    raise self._abort(f"the reconstructed masking key of client {j} does not match its public key")
                dropped_keys[j] = sk
        with self.timings("key_agreement"):
            ctx = mask_context(protocol, self._round)
            for j, sk in dropped_keys.items():
                for i in self._survivors:
                    if j in self._masked_with[i]:
                        seed = kex.agree(sk, self._keys[i].mask_public, ctx, j, i)
                        # survivor i added -PRG if i > j, +PRG otherwise; remove it.
                        streams.append(MaskStream(seed, negate=not pair_negated(i, j)))
        length, bits = self._limits.length, self._cfg.encoder.modulus_bits
        total = np.zeros(length, dtype=self._cfg.encoder.dtype)
        with self.timings("summation"):
            sum_into(total, [self._masked[i].vector for i in self._survivors], modulus_bits=bits, threads=self._cfg.threads)
        with self.timings("mask_regeneration"):
            apply_masks(total, streams, modulus_bits=bits, threads=self._cfg.threads)
        self._finish(total)
        return []

    def _reconstruct(self, shares: dict[int, int], what: str) -> bytes:
        try:
            return shamir.reconstruct(shares, self._t)
        except IntegrityError as err:
            raise self._abort(f"{what}: {err}") from err

    def _finish(self, total: np.ndarray) -> None:
        enc = self._cfg.encoder
        d = self._dim
        values = enc.decode_sum(total[:d])
        weight = float(enc.decode_sum(total[d : d + 1])[0]) / enc.clip
        clipped = int(total[d + 1])
        self._aggregate = values
        survivors = self._survivors
        self._result = AggregateResult(
            total=values,
            total_weight=weight,
            contributors=survivors,
            measurements={
                "protocol": self._cfg.protocol,
                "graph": "complete" if self._params.complete else "harary",
                "clients": len(self._clients),
                "contributors": len(survivors),
                "dropped": len(self._clients) - len(survivors),
                "excluded_by_peers": len(self._excluded),
                "k": self._params.k,
                "threshold": self._t,
                "modulus_bits": enc.modulus_bits,
                "scale_bits": enc.scale_bits,
                "clip": enc.clip,
                "clipped_entries": clipped,
                "reconstructed_seeds": len(survivors),
                "reconstructed_keys": len(self._needed_keys),
                "authenticated": int(self._cfg.authenticated),
            },
        )

    def result(self) -> AggregateResult:
        if self._result is None:
            raise RoundAbortedError(f"round not finished (stage {self._stage.value})")
        return self._result

    def observation(self) -> ServerObservation:
        """Everything the server holds: masked vectors, every accepted message, the sum."""
        res = self._result
        return ServerObservation(
            protocol=self._cfg.protocol,
            contributors=res.contributors if res else (),
            aggregate=res.total if res else None,
            total_weight=res.total_weight if res else None,
            masked_updates={i: m.vector for i, m in self._masked.items()},
            transcript=tuple(self._transcript),
        )
